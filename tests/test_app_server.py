"""The app launched on 127.0.0.1 in a subprocess, driven through gradio_client.

One question in every mode, the side-by-side endpoint, an upload through HTTP, clear errors for
bad input, and 8 concurrent clients that must get the answers of a sequential run.
"""
from __future__ import annotations

import atexit
import re
import threading
import time
from pathlib import Path

import pytest

from hyperrag import ui
from hyperrag.rag.rerank import FP32_SCORE_BOUND
from scripts.drive_app import AppProcess, launch_app

QUESTIONS = [
    "What is the original meaning of the word Norman?",
    "When was the Duchy of Normandy founded?",
    "Who was the duke in the battle of Hastings?",
    "What religion were the Normans?",
    "What is the atomic number of oxygen?",
    "Who discovered oxygen?",
    "What is the most abundant element in the Earth's crust?",
    "What color is liquid oxygen?",
]
_APPS: dict[str, AppProcess] = {}


def shared_app(corpus_dir: Path, root: Path) -> AppProcess:
    """One app per test session on the tiny corpus (fp32 store: reuse equals full prefill)."""
    key = str(corpus_dir)
    if key not in _APPS:
        root.mkdir(parents=True, exist_ok=True)
        app = launch_app(["--corpus", str(corpus_dir), "--store-url", f"fs://{root / 'kv'}", "--codec", "fp32",
                          "--top-k", "3", "--top-n", "1", "--batch-size", "4", "--max-new-tokens", "8",
                          "--concurrency", "4"], root / "data", root / "app.log")
        atexit.register(app.stop)
        from gradio_client import Client

        # The page answers at once; wait until the models are loaded (the first event blocks on them).
        Client(app.url, verbose=False).predict("Shipped corpus", None, "fp32", api_name="/select_corpus")
        _APPS[key] = app
    return _APPS[key]


@pytest.fixture(scope="module")
def app(tiny_corpus_dir, tmp_path_factory):
    return shared_app(tiny_corpus_dir, tmp_path_factory.getbasetemp() / "app-server")


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False)


def test_listens_on_loopback_only(app):
    port = f"{app.port:04X}"
    listening = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 + Path("/proc/net/tcp6").read_text().splitlines()[1:]]
    local = [row[1] for row in listening if row[3] == "0A" and row[1].endswith(":" + port)]  # 0A: LISTEN
    assert local == ["0100007F:" + port], local  # 127.0.0.1 only, no 0.0.0.0 / :: socket


def test_one_question_in_each_mode(client):
    """The side-by-side endpoint (the reader over the retriever's order, over full-prefill and over
    KV-reuse reranking) and /ask for the prefix-cached mode."""
    summary, banner, *columns = client.predict(QUESTIONS[0], 3, 1, api_name="/compare")
    assert "faster than full prefill" in summary and "Same ranking ✓" in summary  # fp32: exact reuse
    assert len(columns) == 3 * len(ui.COMPARE_MODES) and all(a.startswith("**Answer:**") for a in columns[0::3])
    assert all("total" in t for t in columns[1::3]) and "KV load" in columns[7]
    assert "Read from" in columns[3 * ui.COMPARE_MODES.index("reader_kv")]
    frames = {mode: frame["data"] for mode, frame in zip(ui.COMPARE_MODES, columns[2::3])}
    assert all(len(rows) == 3 for rows in frames.values())
    document = ui.DOC_COLUMNS.index("document")
    assert [row[document] for row in frames["reader_kv"]] == [row[document] for row in frames["reader_full"]]
    prefix = client.predict(QUESTIONS[0], "prefix", 3, 1, "", api_name="/ask")
    assert prefix["mode"] == "prefix" and prefix["answer"]
    assert set(prefix["timings"]) >= {"retrieve", "kv_load", "rerank", "generate", "total"}
    assert [d["id"] for d in prefix["docs"]] == [row[document] for row in frames["reader_full"]]
    assert [d["rank"] for d in prefix["docs"]] == [1, 2, 3]


def test_upload_through_http_stays_in_data_folder(app, client, tmp_path):
    from gradio_client import handle_file

    (tmp_path / "rhine notes.txt").write_text("The Rhine flows from the Swiss Alps to the North Sea.")
    (tmp_path / "Amazon.md").write_text("The Amazon rainforest is a moist broadleaf tropical rainforest.")
    files = [handle_file(str(tmp_path / "rhine notes.txt")), handle_file(str(tmp_path / "Amazon.md"))]
    out = client.predict("Upload my own", files, api_name="/prepare")
    info = out[0]
    key = re.search(r"upload ([0-9a-f]{12}) \(2 docs\)", info).group(1)
    assert "KV caches:** 2 encoded" in info
    data = Path(app.log_path).parent / "data"
    # the uploaded files under sanitized names, and the passages ingested from them
    assert sorted(p.name for p in (data / "uploads" / key).iterdir() if not p.name.startswith(".")) == \
        ["Amazon.md", "docs.jsonl", "rhine_notes.txt"]
    assert list((data / "gradio").rglob("rhine notes.txt"))  # Gradio's own upload cache is in the data folder too
    r = client.predict("Where does the Rhine flow to?", "reuse", 2, 1, key, api_name="/ask")
    assert r["corpus"] == key and r["docs"][0]["id"] == "rhine-notes-1" and not r["warnings"]


def test_bad_input_gives_clear_errors(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    (tmp_path / "docs.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "b" "text": "y"}\n')
    with pytest.raises(AppError, match=r"docs.jsonl:2: bad JSON"):
        client.predict("Upload my own", [handle_file(str(tmp_path / "docs.jsonl"))], api_name="/prepare")
    with pytest.raises(AppError, match="question is empty"):
        client.predict("  ", 3, 1, api_name="/compare")
    with pytest.raises(AppError, match="unknown mode"):
        client.predict("Who?", "turbo", 3, 1, "", api_name="/ask")


@pytest.mark.slow  # the batcher's answers-as-alone is test_batching's; one question per mode over HTTP stays in
def test_eight_concurrent_clients_get_sequential_answers(app, client):
    """8 users at once, different questions (reuse mode): same answers, rankings and scores as one
    user asking them in turn, no errors, memory bounded; their questions are batched together."""
    from gradio_client import Client

    jobs = [(q, "reuse") for q in QUESTIONS]

    def ask(c, question, mode):
        r = c.predict(question, mode, 3, 1, "", api_name="/ask")
        return r["answer"], [d["id"] for d in r["docs"]], [d["score"] for d in r["docs"]]

    sequential = [ask(client, q, m) for q, m in jobs]
    rss_before, peak_before = app.rss_mb(), app.peak_rss_mb()
    clients = [Client(app.url, verbose=False) for _ in jobs]
    results: dict[int, object] = {}

    def user(i: int) -> None:
        try:
            results[i] = ask(clients[i], *jobs[i])
        except Exception as err:  # recorded, asserted below
            results[i] = err

    t0 = time.perf_counter()
    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    wall = time.perf_counter() - t0
    errors = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert not errors and len(results) == len(jobs)
    # Questions asked at once share batches (hyperrag.workbench.batcher): the same answers and rankings,
    # scores within the documented fp32 bound (other batch shapes round differently).
    for (answer, ranked, scores), (answer0, ranked0, scores0) in zip((results[i] for i in range(len(jobs))), sequential):
        assert (answer, ranked) == (answer0, ranked0)
        assert max(abs(a - b) for a, b in zip(scores, scores0)) <= FP32_SCORE_BOUND
    peak_after = app.peak_rss_mb()
    print(f"\n8 concurrent clients: {wall:.1f} s, RSS {rss_before:.0f} MB before, peak {peak_before:.0f} -> "
          f"{peak_after:.0f} MB")
    assert peak_after - rss_before < 1024  # bounded: shared model and buffers, no per-request copies
    assert "Traceback" not in app.log()
