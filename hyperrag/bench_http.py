"""Load test of a running HyperRAG service over HTTP (``python -m hyperrag.bench --http URL``).

The bench's questions (the corpus's gold sample, ``--queries``, ``--seed``) each with their
retrieved candidates (``--top-k``) as the documents of a ``/v1/rerank`` request:

1. reference: the same rankings in this process (:func:`hyperrag.rag.texts.rerank_texts`, the
   KV stored first and loaded as the service loads it; the bench uses a temporary store), so ``identical_rankings`` checks
   the service against the engine; the service's ``/health`` must report the same KV identity
   (model, adapter, template, dtype, limits) and codec, else the run stops;
2. first vs second: one client sends each question twice in a row: the first request computes
   the documents the service has not seen, the second finds them all in its store;
3. load: ``--clients`` clients send ``--requests`` requests (the questions in turn), bounded by
   ``--http-time-limit`` seconds; latency is the client's (network, queue, model).
Writes ``http: {clients, requests, queries_per_s, p50_ms, p95_ms, errors, kv_reused_fraction,
identical_rankings, ...}``.
"""
from __future__ import annotations

import concurrent.futures as cf
import statistics
import threading
import time
from typing import Sequence

import httpx

from hyperrag.rag.metrics import latency_summary

REQUEST_TIMEOUT_S = 300.0


class ServiceMismatch(RuntimeError):
    """The service keys its KV differently from this process: its rankings are not comparable."""


def _post(client: httpx.Client, query: str, docs: Sequence[str]) -> tuple[float, dict | None, str]:
    """(seconds, body or None, error) of one /v1/rerank request."""
    t0 = time.perf_counter()
    try:
        reply = client.post("/v1/rerank", json={"query": query, "documents": list(docs)})
    except httpx.HTTPError as err:
        return time.perf_counter() - t0, None, f"{type(err).__name__}: {err}"
    seconds = time.perf_counter() - t0
    if reply.status_code != 200:
        return seconds, None, f"HTTP {reply.status_code}: {reply.text[:200]}"
    return seconds, reply.json(), ""


def _order(body: dict) -> list[int]:
    return [r["index"] for r in body["results"]]


def reference_rankings(engine, questions: Sequence[str]) -> tuple[list[list[str]], list[list[int]], dict]:
    """Each question's candidate texts (the engine's ``top_k``) and their ranking by the
    in-process engine in reuse mode, their KV stored first (as the service answers a warm
    request); the engine's KV identity and codec."""
    from hyperrag.rag.precompute import precompute
    from hyperrag.rag.texts import rerank_texts

    texts = [[engine.corpus.by_id[d].text for d, _ in engine.retrieve(q, engine.settings.top_k)] for q in questions]
    precompute(engine.reranker, engine.store, [t for ts in texts for t in ts])
    rankings = rerank_texts(engine.reranker, engine.store, list(zip(questions, texts)))
    identity = {"kv_identity": engine.reranker.kv_identity, "codec": engine.store.codec.spec}
    return texts, [r.order for r in rankings], identity


def first_vs_second(client: httpx.Client, questions: Sequence[str], texts: Sequence[Sequence[str]]) -> dict:
    """Each question twice in a row from one client: documents computed, then all reused."""
    first, second, computed, docs, errors = [], [], 0, 0, 0
    for q, ts in zip(questions, texts):
        (s1, b1, e1), (s2, b2, e2) = _post(client, q, ts), _post(client, q, ts)
        if e1 or e2:
            errors += 1
            continue
        first.append(s1)
        second.append(s2)
        computed += b1["meta"]["kv_computed"]
        docs += len(ts)
    if not first:
        return {"errors": errors}
    return {"questions": len(first), "first_p50_ms": statistics.median(first) * 1e3,
            "second_p50_ms": statistics.median(second) * 1e3, "speedup": sum(first) / sum(second),
            "first_kv_computed_fraction": computed / docs, "errors": errors}


def load_run(url: str, headers: dict, questions: Sequence[str], texts: Sequence[Sequence[str]],
             reference: Sequence[Sequence[int]], clients: int, requests: int, time_limit_s: float) -> dict:
    """``clients`` threads share ``requests`` requests (question ``i % len(questions)`` for request
    ``i``); none starts after ``time_limit_s``."""
    counter, lock = iter(range(requests)), threading.Lock()
    deadline = time.perf_counter() + time_limit_s
    records: list[tuple[int, float, dict | None, str]] = []

    def client_loop() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S) as client:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                q = i % len(questions)
                seconds, body, error = _post(client, questions[q], texts[q])
                with lock:
                    records.append((q, seconds, body, error))

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: client_loop(), range(clients)))
    wall = time.perf_counter() - t0
    ok = [(q, s, b) for q, s, b, e in records if not e]
    reused = sum(b["meta"]["kv_reused"] for _, _, b in ok)
    docs = sum(len(texts[q]) for q, _, _ in ok)
    summary = latency_summary([s for _, s, _ in ok])
    return {"clients": clients, "requests": len(records), "queries_per_s": len(ok) / wall if wall else 0.0,
            "p50_ms": summary["p50_ms"], "p95_ms": summary["p95_ms"], "mean_ms": summary["mean_ms"],
            "errors": len(records) - len(ok), "error_examples": list(dict.fromkeys(e for *_, e in records if e))[:3],
            "kv_reused_fraction": reused / docs if docs else 0.0,
            "identical_rankings": sum(_order(b) == list(reference[q]) for q, _, b in ok) / len(ok) if ok else 0.0,
            "unfinished": requests - len(records), "seconds": wall}


def http_bench(url: str, engine, questions: Sequence[str], clients: int, requests: int, token: str = "",
               time_limit_s: float = 600.0) -> dict:
    """The whole HTTP bench against the service at ``url``, ``engine`` (an in-process
    :class:`~hyperrag.rag.pipeline.Engine` with the service's settings) as the reference; the
    ``http`` block."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = url.rstrip("/")
    health = httpx.get(f"{url}/health", timeout=30).json()
    texts, reference, identity = reference_rankings(engine, questions)
    served = {"kv_identity": health.get("kv_identity"), "codec": health.get("store", {}).get("codec")}
    if served != identity:
        raise ServiceMismatch(f"the service at {url} keys its KV as {served}, this process as {identity}: start "
                              "both with the same model, adapter, dtype, codec and limits (flags or HYPERRAG_*)")
    with httpx.Client(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S) as client:
        cold = first_vs_second(client, questions, texts)
    run = load_run(url, headers, questions, texts, reference, clients, requests, time_limit_s)
    return {**run, "first_vs_second": cold, "url": url, "questions": len(questions),
            "documents_per_request": statistics.mean(len(t) for t in texts), "replica_of_health": health.get("replica"),
            "store": health.get("store", {}).get("url"), "time_limit_s": time_limit_s}
