import argparse

import pytest

from hyperrag.settings import Settings, add_cli_args, settings_from_args


def test_defaults_env_and_cli_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HYPERRAG_TOP_K", "30")
    monkeypatch.setenv("HYPERRAG_CODEC", "int8")
    monkeypatch.setenv("HYPERRAG_CACHE_DIR", str(tmp_path))
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    s = settings_from_args(parser.parse_args(["--codec", "int4", "--top-n", "5"]))
    assert (s.top_k, s.codec, s.top_n) == (30, "int4", 5)
    assert s.store_url == f"fs://{tmp_path}/kv"
    assert Settings().top_k == 20


def test_bad_values_are_clear(monkeypatch):
    monkeypatch.setenv("HYPERRAG_TOP_K", "many")
    with pytest.raises(ValueError, match="HYPERRAG_TOP_K='many' is not a valid int"):
        Settings.from_env()
    with pytest.raises(ValueError, match="top_n must be >= 1"):
        Settings(top_n=0)
