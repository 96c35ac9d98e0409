"""An installed wheel carries the shipped corpus and adapter, and the settings' defaults find them
there as they do in a checkout; training checkpoints and index caches stay out of the wheel."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from hyperrag.common.settings import SHIPPED_ADAPTER, SHIPPED_CORPUS, Settings, corpus_out
from tests.conftest import REPO

SHIPPED_FILES = ["hyperrag/shipped/squad-dev-mini/docs.jsonl", "hyperrag/shipped/squad-dev-mini/queries.jsonl",
                 "hyperrag/shipped/hyperrag-lora/adapter_model.safetensors",
                 "hyperrag/shipped/hyperrag-lora/adapter_config.json", "hyperrag/shipped/hyperrag-lora/hyperrag.json",
                 "hyperrag/shipped/kv-calibration/docs.jsonl", "hyperrag/shipped/kv-calibration/queries.jsonl",
                 "hyperrag/shipped/ui/logo.svg", "hyperrag/shipped/ui/style.css"]


def test_checkout_defaults_are_the_shipped_folders():
    s = Settings()
    assert s.folder("corpus") == SHIPPED_CORPUS and (SHIPPED_CORPUS / "docs.jsonl").is_file()
    assert s.folder("adapter") == SHIPPED_ADAPTER and (SHIPPED_ADAPTER / "adapter_model.safetensors").is_file()


def test_corpora_folder_reaches_the_shipped_corpus():
    """corpora/ is where corpora live in a checkout; its squad-dev-mini is a relative link, so a fresh
    clone anywhere reaches the shipped corpus (what the wheel carries) without a copy."""
    link = REPO / "corpora" / "squad-dev-mini"
    assert link.is_symlink() and os.readlink(link) == "../hyperrag/shipped/squad-dev-mini"
    assert (link / "docs.jsonl").samefile(SHIPPED_CORPUS / "docs.jsonl")
    assert (link / "queries.jsonl").samefile(SHIPPED_CORPUS / "queries.jsonl")
    assert corpus_out("Frédéric_Chopin notes") == Path("corpora/frederic-chopin-notes")


def test_wheel_carries_the_shipped_corpus_and_adapter(tmp_path):
    from hyperrag.model.loading import adapter_hash

    src = tmp_path / "src"  # built from a copy, so the checkout gets no build/ or egg-info
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "hyperrag", src / "hyperrag", ignore=shutil.ignore_patterns("__pycache__"))
    for leftover in ("shipped/hyperrag-lora/checkpoint/state.pt", "shipped/squad-dev-mini/.cache/index.ids.json"):
        (src / "hyperrag" / leftover).parent.mkdir(parents=True, exist_ok=True)
        (src / "hyperrag" / leftover).write_text("{}")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("hyperrag-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(SHIPPED_FILES) <= names
    assert not [n for n in names if "/checkpoint" in n or "/.cache/" in n]
    # It says what it carries: Apache-2.0 code and CC BY-SA 4.0 data, with the data's attribution.
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0 AND CC-BY-SA-4.0" in meta
    assert {"LICENSE", "hyperrag/shipped/squad-dev-mini/README.md", "hyperrag/shipped/kv-calibration/README.md"} <= {
        n.split("/licenses/", 1)[1] for n in names if "/licenses/" in n}

    site = tmp_path.resolve() / "site"  # the wheel unpacked is what an install puts in site-packages
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import hyperrag.common.settings as m; s = m.Settings(); "
             "print(m.__file__, s.folder('corpus'), s.folder('adapter'), m.corpus_out('mine').resolve(), sep='\\n')")
    out = subprocess.run([sys.executable, "-c", probe], env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    installed = site / "hyperrag"
    assert [Path(p) for p in out] == [installed / "common" / "settings.py", installed / "shipped" / "squad-dev-mini",
                                      installed / "shipped" / "hyperrag-lora", tmp_path / "corpora" / "mine"]
    # The store key depends on the adapter's content, not its folder: an install reads a checkout's KV.
    assert adapter_hash(installed / "shipped" / "hyperrag-lora") == adapter_hash(SHIPPED_ADAPTER)
