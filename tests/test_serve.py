"""The HTTP service (hyperrag.serve) on the real model and the tiny corpus, over real HTTP (uvicorn
in a thread, httpx): the rerank APIs equal the engine's ranking, a second request reuses every
document's KV, the answer API reads, and bad input gets its status and message while the service
keeps serving and the store stays unchanged."""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import re
import threading
import time
import uuid

import httpx
import pytest

from hyperrag.rag.rerank import FP32_SCORE_BOUND
from hyperrag.serve.app import create_app
from hyperrag.serve.service import Service, probability
from hyperrag.workbench.batcher import Batcher
from tests.servers import free_port, redis_server, wait_until  # noqa: F401 - fixture

TOKEN = "test-token-" + "x" * 20
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.contextmanager
def serving(app):
    """``app`` on a free 127.0.0.1 port in a thread; its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, 30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def service(tiny_engine):
    svc = Service(tiny_engine, Batcher(window_ms=5, max_group=8, queue_size=16))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    with serving(create_app(service, TOKEN)) as url, httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
        yield c


def store_files(engine) -> dict[str, int]:
    """Every file under the fs:// store's folder, with its size (after pending writes land)."""
    engine.store.flush()
    root = engine.store.folder
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def docs_of(engine, n: int) -> list[str]:
    return [d.text for d in engine.corpus.docs[:n]]


def test_rerank_equals_the_engine_and_the_second_request_reuses_every_document(client, tiny_engine, tmp_path):
    question = tiny_engine.corpus.queries[0].question
    # A text never seen (computed on the first request), one whose text looks like a path (it
    # must only ever be hashed into the store's folder), and corpus paragraphs.
    docs = [f"Unseen paragraph {uuid.uuid4().hex}: the Normans settled in Normandy.",
            "../../../../" + str(tmp_path / "escaped"), *docs_of(tiny_engine, 6)]
    reference = tiny_engine.reranker.score(question, docs, "full").scores
    order = sorted(range(len(docs)), key=lambda i: -reference[i])
    before = set(store_files(tiny_engine))

    first = client.post("/v1/rerank", json={"query": question, "documents": [docs[0], *({"text": d} for d in docs[1:])],
                                            "return_documents": True})
    assert first.status_code == 200, first.text
    body = first.json()
    assert [r["index"] for r in body["results"]] == order
    for r in body["results"]:
        assert r["relevance_score"] == pytest.approx(probability(reference[r["index"]]), abs=FP32_SCORE_BOUND)
        assert r["document"]["text"] == docs[r["index"]]
    meta = body["meta"]
    assert meta["kv_computed"] >= 2 and meta["kv_reused"] + meta["kv_computed"] == len(docs)
    assert meta["truncated"] == [] and meta["timings_ms"]["total"] > 0

    second = client.post("/rerank", json={"query": question, "texts": docs, "raw_scores": True, "return_text": False})
    assert second.status_code == 200, second.text
    assert [r["index"] for r in second.json()] == order
    for r in second.json():
        assert r["score"] == pytest.approx(reference[r["index"]], abs=FP32_SCORE_BOUND) and "text" not in r
    assert (second.headers["X-KV-Reused"], second.headers["X-KV-Computed"]) == (str(len(docs)), "0")

    third = client.post("/v1/rerank", json={"query": question, "documents": docs, "top_n": 2}).json()
    assert [r["index"] for r in third["results"]] == order[:2] and "document" not in third["results"][0]
    assert third["meta"]["kv_reused"] == len(docs) and third["meta"]["kv_computed"] == 0

    written = set(store_files(tiny_engine)) - before  # content addresses inside the store, nothing else
    assert len(written) >= 2 and not (tmp_path / "escaped").exists()
    assert all(re.fullmatch(r"hyperrag@[0-9a-f@-]+@uint8\.data", w) for w in written), written  # LMCache keys


def test_a_long_document_is_cut_and_the_response_says_so(client, tiny_engine):
    long_doc = "The Normans came from Normandy. " * 200  # ~1,400 tokens, over max_doc_tokens (448)
    body = client.post("/v1/rerank", json={"query": "Where did the Normans come from?",
                                           "documents": ["Oxygen is a gas.", long_doc]}).json()
    assert body["meta"]["truncated"] == [1]
    assert any("cut to that length" in w for w in body["meta"]["warnings"])


def test_answer_from_sent_documents_and_from_the_corpus(client, tiny_engine):
    query = tiny_engine.corpus.queries[0]
    docs = docs_of(tiny_engine, 6)
    sent = client.post("/v1/answer", json={"query": query.question, "documents": docs, "top_n": 2})
    assert sent.status_code == 200, sent.text
    body = sent.json()
    assert body["answer"] and len(body["ranking"]) == len(docs)
    source = body["source"]
    assert source["index"] in [r["index"] for r in body["ranking"][:2]]
    if source["start"] >= 0:
        assert docs[source["index"]][source["start"]:source["end"]].strip() in body["answer"]
    corpus = client.post("/v1/answer", json={"query": query.question})
    assert corpus.status_code == 200, corpus.text
    body = corpus.json()
    assert body["answer"] and body["source"]["doc_id"] in tiny_engine.corpus.by_id
    assert {"retrieve", "rerank", "generate", "total"} <= set(body["timings_ms"])


def test_health_and_metrics(client):
    health = httpx.get(f"{client.base_url}/health")  # open without the token
    assert health.status_code == 200 and health.json()["store"]["answers"] is True
    client.post("/v1/rerank", json={"query": "Who?", "documents": ["The Normans."]})
    text = client.get("/metrics").text
    for needle in ('hyperrag_requests_total{route="/v1/rerank",status="200"}', "hyperrag_request_seconds_bucket",
                   "hyperrag_batch_requests_count", 'hyperrag_kv_documents_total{kv="reused"}',
                   "hyperrag_kv_store_put_bytes_total", "hyperrag_queue_depth"):
        assert needle in text, needle


BAD_INPUT = [
    # (what, request keyword arguments, status, words in the message)
    ("empty query", {"json": {"query": "", "documents": ["a"]}}, 422, "query"),
    ("blank query", {"json": {"query": "   ", "documents": ["a"]}}, 422, "the query is empty"),
    ("no documents", {"json": {"query": "Who?", "documents": []}}, 422, "documents"),
    ("10,000 documents", {"json": {"query": "Who?", "documents": ["a document"] * 10_000}}, 422, "at most 1000"),
    ("10 MB body", {"content": json.dumps({"query": "Who?", "documents": ["x" * 10 * 2**20]}),
                    "headers": {"content-type": "application/json"}}, 413, "larger than 4 MB"),
    ("non-UTF-8 JSON", {"content": b'{"query": "caf\xe9?", "documents": ["a"]}',
                        "headers": {"content-type": "application/json"}}, 422, "malformed request"),
    ("not JSON", {"content": b'{"query": ', "headers": {"content-type": "application/json"}}, 422, "JSON"),
    ("wrong types", {"json": {"query": ["Who?"], "documents": "a", "top_n": "two"}}, 422, "query"),
    ("a top_n of 0", {"json": {"query": "Who?", "documents": ["a"], "top_n": 0}}, 422, "top_n"),
    ("no token", {"json": {"query": "Who?", "documents": ["a"]}, "headers": {"Authorization": ""}}, 401, "no bearer token"),
    ("a wrong token", {"json": {"query": "Who?", "documents": ["a"]}, "headers": {"Authorization": "Bearer nope"}},
     401, "wrong bearer token"),
]


def test_bad_input_gets_its_status_and_message_and_changes_nothing(client, tiny_engine):
    ok = {"query": "Who ruled Normandy?", "documents": docs_of(tiny_engine, 3)}
    assert client.post("/v1/rerank", json=ok).status_code == 200
    before = store_files(tiny_engine)
    for what, kwargs, status, words in BAD_INPUT:
        reply = client.post("/v1/rerank", **kwargs)
        assert reply.status_code == status, (what, reply.status_code, reply.text[:300])
        assert words in reply.json()["error"], (what, reply.json())
        if status == 401:
            assert reply.headers["WWW-Authenticate"] == "Bearer"
        assert client.post("/v1/rerank", json=ok).status_code == 200, what  # still serving
    tei = client.post("/rerank", json={"query": "Who?", "texts": "not a list"})
    assert tei.status_code == 422 and "texts" in tei.json()["error"]
    assert store_files(tiny_engine) == before


def test_a_full_queue_answers_429_with_retry_after(tiny_engine):
    """Queue of one: with the model held busy, the first request runs (blocked), the second waits
    in the queue, the third is turned away; both others are answered once the model is free."""
    svc = Service(tiny_engine, Batcher(window_ms=0, max_group=1, queue_size=1))
    ok = {"query": "Who ruled Normandy?", "documents": docs_of(tiny_engine, 2)}
    runs = lambda: svc.metrics.registry.get_sample_value("hyperrag_batch_requests_count") or 0  # noqa: E731
    try:
        with serving(create_app(svc)) as url, httpx.Client(base_url=url, timeout=120) as c, cf.ThreadPoolExecutor(2) as pool:
            assert c.post("/v1/rerank", json=ok).status_code == 200  # stored: the rest computes nothing
            before = store_files(tiny_engine)
            with tiny_engine.reranker.runner.lock:
                first = pool.submit(c.post, "/v1/rerank", json=ok)
                assert wait_until(lambda: runs() == 2, 30)  # the worker took it and waits for the model
                second = pool.submit(c.post, "/v1/rerank", json=ok)
                assert wait_until(lambda: svc.batcher.depth == 1, 30)
                third = c.post("/v1/rerank", json=ok)
                assert third.status_code == 429 and third.headers["Retry-After"] == "1"
                assert "busy" in third.json()["error"]
            assert first.result().status_code == 200 and second.result().status_code == 200
            assert c.post("/v1/rerank", json=ok).status_code == 200
            assert store_files(tiny_engine) == before
    finally:
        svc.close()


@pytest.mark.slow
@pytest.mark.servers
def test_two_ray_serve_replicas_share_document_kv_through_redis(redis_server, tiny_corpus_dir, cache_dir):
    """A local Ray of 2 CPUs, two replicas, one real Redis: the documents the first request
    computed are reused by every later request, whichever replica answers it."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from hyperrag.common.settings import Settings
    from hyperrag.serve.ray_serve import deploy

    settings = Settings.from_env(corpus=str(tiny_corpus_dir), cache_dir=cache_dir, store_url=redis_server.url,
                                 codec="fp32", dtype="float32", top_k=6, top_n=2, batch_size=6, max_new_tokens=12,
                                 hot_cache_gb=0.0)  # no CPU tier: every load is a Redis read
    docs = [f"Unseen paragraph {uuid.uuid4().hex} about the Normans." for _ in range(3)]
    docs += [json.loads(line)["text"] for line in (tiny_corpus_dir / "docs.jsonl").read_text().splitlines()[:5]]
    ask = {"query": "Who were the Normans?", "documents": docs}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        url = deploy(settings, TOKEN, replicas=2, port=free_port())
        with httpx.Client(base_url=url, headers=AUTH, timeout=300) as c:
            first = c.post("/v1/rerank", json=ask)
            assert first.status_code == 200, first.text
            assert first.json()["meta"]["kv_computed"] == len(docs)
            order = [r["index"] for r in first.json()["results"]]
            replicas = {first.headers["X-HyperRAG-Replica"]}
            for _ in range(30):  # Ray routes each request to one of two idle replicas at random
                reply = c.post("/v1/rerank", json=ask)
                assert reply.status_code == 200, reply.text
                meta = reply.json()["meta"]
                assert (meta["kv_reused"], meta["kv_computed"]) == (len(docs), 0)
                assert [r["index"] for r in reply.json()["results"]] == order
                replicas.add(reply.headers["X-HyperRAG-Replica"])
                if len(replicas) == 2:
                    break
            assert len(replicas) == 2, replicas
            assert c.get("/health").json()["store"]["answers"] is True
            assert c.post("/v1/rerank", json=ask, headers={"Authorization": ""}).status_code == 401
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_http_bench_drives_the_service(client, service, tiny_engine):
    from hyperrag.bench_http import http_bench

    questions = [q.question for q in tiny_engine.corpus.queries[:2]]
    block = http_bench(str(client.base_url), tiny_engine, questions, clients=2, requests=4, token=TOKEN, time_limit_s=120)
    assert (block["clients"], block["requests"], block["errors"], block["unfinished"]) == (2, 4, 0, 0)
    assert block["identical_rankings"] == 1.0 and block["kv_reused_fraction"] == 1.0  # the reference stored them
    assert block["queries_per_s"] > 0 and block["p95_ms"] >= block["p50_ms"] > 0
    assert block["first_vs_second"]["questions"] == 2 and block["documents_per_request"] == tiny_engine.settings.top_k
