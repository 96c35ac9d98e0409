"""The figures in README.md and docs/*.md are what their records say, and a drifted one is caught."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from hyperrag import docs
from hyperrag.kv import planner
from hyperrag.model.loading import MODELS
from tests.conftest import REPO



@pytest.fixture
def copy(tmp_path) -> Path:
    """The pages and every record they name, outside the checkout."""
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    for record in {r for block in docs.BLOCKS.values() for r in block.records}:  # records outside docs/ too
        (tmp_path / record).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / record, tmp_path / record)
    return tmp_path


def test_check_passes_on_the_repository(capsys):
    assert docs.main(["check"]) == 0, capsys.readouterr().err
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in ("answers-dev-300", "bench-headline", "memory", "models", "tests-line"):
        assert f"<!-- render: {name} -->" in readme


def test_every_block_is_used_and_names_its_records():
    text = "".join(p.read_text(encoding="utf-8") for p in docs.pages(REPO))
    assert {m[2] for m in docs.MARKER.finditer(text)} == set(docs.BLOCKS)
    body = docs.rendered("bench-default", REPO)
    record = json.loads((REPO / "docs/bench/bench-default.json").read_text())
    assert docs.provenance("docs/bench/bench-default.json", record) in body  # the record's own date and CPU
    assert f"({record['machine']['date']}; {record['machine']['cpu']})" in body


def test_a_planted_mismatch_fails_and_render_repairs_it(copy, capsys):
    readme = copy / "README.md"
    text = readme.read_text(encoding="utf-8")
    block = text[text.index("<!-- render: answers-dev-300 -->"):]
    assert "0.674" in block[: block.index("<!-- /render -->")]
    readme.write_text(text.replace("0.674", "0.675", 1), encoding="utf-8")
    assert docs.main(["check", "--root", str(copy)]) == 1
    assert "README.md: block 'answers-dev-300': differs from its records" in capsys.readouterr().err
    assert docs.main(["render", "--root", str(copy)]) == 0
    assert readme.read_text(encoding="utf-8") == text
    assert docs.main(["check", "--root", str(copy)]) == 0


def test_a_changed_record_fails_the_check(copy, capsys):
    record = copy / "docs/memory/app-first-visit.json"
    data = json.loads(record.read_text())
    data["phases"][-1]["peak_rss_gb"] += 0.5  # the peak after the questions, shown in the table
    record.write_text(json.dumps(data))
    assert docs.main(["check", "--root", str(copy)]) == 1
    assert "block 'memory': differs from its records" in capsys.readouterr().err


def test_a_missing_record_fails_the_check(copy, capsys):
    (copy / "docs/eval/codecs-dev-300.json").unlink()
    assert docs.main(["check", "--root", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "block 'codecs-dev-300': record missing: docs/eval/codecs-dev-300.json" in err


def test_a_measured_constant_that_left_its_record_fails(copy, monkeypatch, capsys):
    assert planner.MEASURED_RECORD == "docs/bench/bench-default.json"
    monkeypatch.setattr(planner, "MEASURED_DOCS_PER_S", 3.67)
    assert docs.main(["check", "--root", str(copy)]) == 1
    measured = json.loads((copy / planner.MEASURED_RECORD).read_text())["storage"]["precompute_docs_per_s"]
    assert f"MEASURED_DOCS_PER_S = 3.67, but docs/bench/bench-default.json measured {measured:.2f}" in capsys.readouterr().err


def test_a_safety_margin_smaller_than_its_record_measured_fails(copy, monkeypatch, capsys):
    spec = MODELS["smollm2-135m"]
    fit = spec.memory
    assert fit.record == "docs/memory/app-first-visit.json"
    record = json.loads((copy / fit.record).read_text())
    held, peak = round(docs.margin_used_gib(record), 2), round(record["peak_rss_bytes"] / 1e9, 2)
    monkeypatch.setitem(MODELS, "smollm2-135m", replace(spec, memory=replace(fit, margin_gb=held - 0.1)))
    assert docs.main(["check", "--root", str(copy)]) == 1
    assert (f"MODELS['smollm2-135m'].memory.margin_gb = {held - 0.1} is less than the {held} that "
            f"docs/memory/app-first-visit.json measured") in capsys.readouterr().err
    monkeypatch.setitem(MODELS, "smollm2-135m", replace(spec, memory=replace(fit, budget_gb=peak - 0.1)))
    assert docs.main(["check", "--root", str(copy)]) == 1
    assert f"MODELS['smollm2-135m'].memory.budget_gb = {peak - 0.1} is less than the {peak}" in capsys.readouterr().err
