import argparse

import pytest

from hyperrag.common.settings import Settings, add_cli_args, settings_from_args


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
    with pytest.raises(ValueError, match="kv_rounding must be one of hessian, nearest, got 'gptq'"):
        Settings(kv_rounding="gptq")


def test_missing_folders_name_the_setting_to_give(monkeypatch, tmp_path):
    """A missing corpus or adapter folder (a mistyped path; a package built without its shipped
    data) is reported with the path and the variable and flag to set, before anything loads.
    (That the defaults exist in a checkout and in a wheel: tests/test_packaging.py.)"""
    missing = tmp_path / "site-packages" / "hyperrag" / "shipped" / "squad-dev-mini"
    monkeypatch.setattr(Settings.__dataclass_fields__["corpus"], "default", str(missing))  # a default that is gone
    with pytest.raises(FileNotFoundError) as err:
        Settings(corpus=str(missing)).folder("corpus")
    assert str(missing) in str(err.value) and "the default" in str(err.value)
    assert "HYPERRAG_CORPUS or --corpus" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"does not exist: set HYPERRAG_ADAPTER or --adapter to .*''"):
        Settings(adapter=str(tmp_path / "no-adapter")).folder("adapter")

    from hyperrag.rag.pipeline import Engine

    with pytest.raises(FileNotFoundError, match="HYPERRAG_CORPUS"):  # before any model loads
        Engine.load(Settings(corpus=str(missing), cache_dir=str(tmp_path)))


def test_readme_settings_table_names_every_setting():
    """The README's settings table is how users find a setting: none may be missing from it."""
    import dataclasses
    import re

    from tests.conftest import REPO

    table = {name for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `")
             for name in re.findall(r"`(\w+)`", line.split("|")[1])}
    missing = [f.name for f in dataclasses.fields(Settings) if f.name not in table]
    assert not missing, f"README settings table lacks {missing}"
