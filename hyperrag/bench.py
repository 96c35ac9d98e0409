"""Headless benchmark: baseline and KV-reuse RAG side by side, in one process.

    python -m hyperrag.bench [--queries 24] [--top-k 20] [--codec fp16] [--json out.json] [--html out.html]
    python -m hyperrag.bench --quick                       # about a minute on 2 CPU cores
    python -m hyperrag.bench --codecs fp32,fp16,int8,int4 --frontier --queries 8
    python -m hyperrag.bench --http http://127.0.0.1:8080 --clients 8 --requests 64   # a running service

Every sampled question is asked in every mode (retrieval only, baseline = full-prefill rerank,
prefix-cached rerank, KV reuse, and with an adapter set the zero-shot base model in reuse mode)
with the same retrieved candidates, the mode order rotating per question (interleaved A/B) so
that drift on a noisy machine hits every mode alike. Model load,
index build and precompute are timed separately and never count in query timings. By default the
document KV goes to a temporary fs:// store that is deleted at the end (the user's store is
never touched); --store uses a given one.

What it reports (stdout table, --json, --html): reranker pairs/s per mode and the speedups
against the token-ratio limit (prefix+doc+query+suffix)/(query+suffix); end-to-end queries/s
and per-stage latency; quality (recall@1/5, MRR@10, NDCG@10, EM, F1) per mode and reuse-vs-full
score error and ranking agreement; storage (bytes/token, total, precompute docs/s, KV load GB/s);
the static batch layout against per-query concatenation; with --codecs a codec sweep; with
--frontier the quality-vs-throughput points of every configuration measured.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from hyperrag.kv.planner import estimate, memory_budget_gb, plan_corpus
from hyperrag.model.geometry import KVGeometry
from hyperrag.rag.metrics import latency_summary
from hyperrag.rag.modes import E2E_KEYS, MODE_TABLE, MODES


log = logging.getLogger("hyperrag.bench")

DEFAULT_QUERIES = 24
QUICK = {"queries": 3, "top_k": 8, "top_n": 2, "max_new_tokens": 8, "precompute": "candidates", "layout_repeats": 2}


# -- command line -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from hyperrag.common.settings import add_cli_args

    parser = argparse.ArgumentParser(prog="python -m hyperrag.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--queries", type=int, default=None,
                       help=f"questions sampled (with --seed) from the corpus's gold queries "
                            f"(default {DEFAULT_QUERIES}; --quick: {QUICK['queries']})")
    bench.add_argument("--store", dest="store_url", default=None,
                       help="KV store URL (fs://DIR, memory://, lm://HOST:PORT, redis://HOST:PORT); "
                            "default: a temporary fs:// folder deleted at the end")
    bench.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")
    bench.add_argument("--scale", type=int, default=None, metavar="N",
                       help="only the retrieval scale bench (hyperrag.scale): exact vs HNSW index over N synthetic "
                            "vectors, build s, RSS, query p50/p95, recall@10; prints it (and --json) and stops")
    bench.add_argument("--html", dest="html_path", default=None,
                       help="write a self-contained HTML report (plotly figures, inline plotly.js) here")
    bench.add_argument("--quick", action="store_true",
                       help=f"a run of about a minute: {QUICK['queries']} queries, top-k {QUICK['top_k']}, "
                            f"top-n {QUICK['top_n']}, answers of {QUICK['max_new_tokens']} tokens, precompute "
                            "only the candidates of the sampled queries (explicit flags still win)")
    bench.add_argument("--codecs", default="",
                       help="comma-separated codec sweep, e.g. fp16,int8,int4 (fp32 bf16 too): bytes/token, "
                            "score error and ranking agreement against fp32 full prefill, pairs/s; a quantized "
                            "codec rounds as --kv-rounding says, or as its suffix asks (int4:nearest, int4:hessian)")
    bench.add_argument("--frontier", action="store_true",
                       help="add the quality-vs-throughput points of every configuration measured")
    bench.add_argument("--precompute", choices=("all", "candidates"), default=None,
                       help="documents to precompute: the whole corpus (default) or only the retrieved "
                            "candidates of the sampled queries (--quick default)")
    bench.add_argument("--layout-repeats", type=int, default=None,
                       help="timed repeats per query of the static-layout vs concatenation fill (default 3)")
    bench.add_argument("--threads", type=int, default=None,
                       help="torch intra-op threads (default: torch's choice, usually one per core)")
    bench.add_argument("--render", metavar="JSON", default=None,
                       help="measure nothing: print the table of a saved --json result and write its --html")
    bench.add_argument("--no-generate", action="store_true",
                       help="skip answer generation (e2e rows then measure retrieve + rerank only)")
    bench.add_argument("--no-zero-shot", action="store_true",
                       help="skip the zero-shot row (the base model without the adapter, reuse mode, its "
                            "document KV held in memory), which runs by default when an adapter is set")
    bench.add_argument("--serve", action="store_true",
                       help="add the concurrency run: --clients clients ask the bench questions at once through the "
                            "request batcher (hyperrag.workbench.batcher), against one client asking them in turn (serve block)")
    bench.add_argument("--clients", type=int, default=8, help="concurrent clients of --serve or --http (default 8)")
    bench.add_argument("--http", metavar="URL", default=None,
                       help="only the HTTP load test (hyperrag.bench_http) of the service running at URL (python -m "
                            "hyperrag.serve, started with the same engine flags): first-vs-second request, then "
                            "--clients clients sending --requests /v1/rerank requests; rankings checked against this process")
    bench.add_argument("--requests", type=int, default=64, help="requests of the --http load run (default 64)")
    bench.add_argument("--http-time-limit", type=float, default=600.0,
                       help="seconds after which the --http load run starts no more requests (default 600)")
    bench.add_argument("--token-file", default=None, help="--http: file with the service's bearer token")
    add_cli_args(parser, skip=("store_url",))
    return parser


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill bench defaults (and --quick's) for whatever was not given explicitly."""
    quick = args.quick
    if args.queries is None:
        args.queries = QUICK["queries"] if quick else DEFAULT_QUERIES
    if quick:
        for name in ("top_k", "top_n", "max_new_tokens"):
            if getattr(args, name) is None:
                setattr(args, name, QUICK[name])
    if args.precompute is None:
        args.precompute = QUICK["precompute"] if quick else "all"
    if args.layout_repeats is None:
        args.layout_repeats = QUICK["layout_repeats"] if quick else 3
    if args.queries < 1:
        raise SystemExit("--queries must be >= 1")
    if args.clients < 1:
        raise SystemExit("--clients must be >= 1")
    from hyperrag.rag.kv_rounding import parse_codec

    args.codec_list = [c.strip() for c in args.codecs.split(",") if c.strip()]
    for entry in args.codec_list:
        try:
            parse_codec(entry)
        except ValueError as err:
            raise SystemExit(f"--codecs: {err}") from None
    return args


# -- queries ------------------------------------------------------------------------------------

def bench_questions(corpus, n: int, seed: int) -> tuple[list[dict], str]:
    """``n`` questions: the corpus's gold sample when it has one, else document openings (no quality)."""
    picked = corpus.sample_queries(n, seed)
    if picked:
        return [{"id": q.id, "question": q.question, "query": q} for q in picked], "gold"
    docs = random.Random(seed).sample(corpus.docs, min(n, len(corpus.docs)))
    out = []
    for d in docs:
        words = re.split(r"\s+", d.text.strip())[:12]
        out.append({"id": f"pseudo-{d.id}", "question": " ".join(words), "query": None})
    return out, "pseudo (first words of sampled documents; no gold: quality not measured)"


# -- measurements -------------------------------------------------------------------------------

def storage_block(engine, texts: Sequence[str], report, load_stats: dict) -> dict:
    """Bytes and tokens of what precompute stored (or would store, for already-stored docs)."""
    reranker, codec = engine.reranker, engine.store.codec
    tokens = [reranker.doc_tokens(t) for t in texts]
    written = report.encoded == report.docs and report.docs > 0
    total = report.bytes if written else plan_corpus(reranker, texts, codec).total_bytes  # the store's own format
    dec = reranker.decoder
    block = {
        "codec": codec.name, "docs": len(texts), "tokens": sum(tokens), "bytes": total,
        "bytes_per_token": total / sum(tokens) if tokens else 0.0,
        "payload_bytes_per_token": codec.bytes_per_token(dec.n_layers, dec.n_kv_heads, dec.head_dim),
        "bytes_source": "written" if written else "estimated (documents were already stored)",
        "precompute_docs_per_s": report.docs_per_s, "precompute_s": report.seconds,
        "precompute_tokens_per_s": report.tokens / report.seconds if report.seconds else 0.0,
        "encoded": report.encoded, "skipped": report.skipped, "failed": report.failed,
        "load_gb_per_s": load_stats.get("gb_per_s", 0.0), "load_bytes": load_stats.get("bytes", 0),
        "loads": load_stats.get("hits", 0), "misses": load_stats.get("misses", 0),
        "cpu_tier_gb": engine.store.hot_cache_gb, "cpu_tier_loads": load_stats.get("hot_hits", 0),
        "store": engine.store.scheme, "prefix_tokens": reranker.runner.prefix_len,
        "prefix_bytes_once": codec.nbytes(KVGeometry.of(reranker).shape(reranker.runner.prefix_len)),
    }
    return block


def query_first_block(engine, questions: list[dict], candidate_texts: list[list[str]], progress=None) -> dict:
    """The strongest prefix-caching baseline, side by side with reuse: the usual query-first
    prompt ``[instruction][question][document][suffix]`` with ``[instruction][question]``
    computed once per question and shared by its candidates (what vLLM's automatic prefix
    caching gives), so only each document's tokens run. Same model, same candidates; the two
    alternate per question, so drift hits both alike."""
    from hyperrag.rag.query_first import QueryFirstScorer
    from hyperrag.rag.metrics import latency_summary

    scorer, reranker = QueryFirstScorer(engine.reranker), engine.reranker
    first_s: list[float] = []
    reuse_s: list[float] = []
    pairs = 0
    for i, (q, texts) in enumerate(zip(questions, candidate_texts)):
        runs = [(first_s, lambda: scorer.score(q["question"], texts, cached=True)),
                (reuse_s, lambda: reranker.score(q["question"], texts, "reuse", engine.store))]
        for times, fn in runs[i % 2:] + runs[: i % 2]:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        pairs += len(texts)
        if progress:
            progress(1)
    return {"query_first_cached": {"queries": len(first_s), "pairs": pairs, "pairs_per_s": pairs / sum(first_s),
                                   **latency_summary(first_s)},
            "speedup_vs_query_first_cached": sum(first_s) / sum(reuse_s),
            "query_first_note": "query-first prompt, [instruction][question] KV computed once per question and "
                                "shared by its candidates; speedup measured against reuse in the same pass "
                                f"(reuse {pairs / sum(reuse_s):.1f} pairs/s there)"}


def measure_layout(engine, candidate_texts: list[list[str]], n_query: int, repeats: int, progress=None) -> dict:
    """Filling the batch buffer for each query's candidates: copies into the static layout's
    preallocated rows vs padding + concatenating per-document caches (``concat_layout``).

    ``copy``: from already-decoded document KVs (the layout difference alone); ``load``: straight
    from the store (static: decode into the row; concat: decode into a new tensor, then concat)."""
    import torch

    from hyperrag.model.layout import concat_layout

    reranker, store = engine.reranker, engine.store
    layout = reranker.runner.layout
    static_s, concat_s, static_load_s, concat_load_s = [], [], [], []
    buffers_mb = []
    for i, texts in enumerate(candidate_texts):
        texts = texts[: layout.max_batch]
        lens = [reranker.doc_tokens(t) for t in texts]
        kvs = []
        for t, n in zip(texts, lens):
            kv = torch.empty(KVGeometry.of(reranker).shape(n), dtype=reranker.decoder.dtype, device=reranker.decoder.device)
            if not store.load_into(t, kv):
                kv = reranker.encode_docs([t])[0]
            kvs.append(kv)
        for rep in range(repeats):
            # alternate which goes first, so neither always runs on a warm cache
            order = ("static", "concat") if (i + rep) % 2 == 0 else ("concat", "static")
            for which in order:
                t0 = time.perf_counter()
                if which == "static":
                    for r, kv in enumerate(kvs):
                        layout.doc_view(r, lens[r]).copy_(kv)
                    static_s.append(time.perf_counter() - t0)
                else:
                    buf, _ = concat_layout(reranker.runner.prefix_kv, kvs, n_query)
                    concat_s.append(time.perf_counter() - t0)
                    buffers_mb.append(buf.nbytes / 2**20)
                    del buf
        order = ("static", "concat") if i % 2 == 0 else ("concat", "static")
        for which in order:
            t0 = time.perf_counter()
            if which == "static":
                for r, (t, n) in enumerate(zip(texts, lens)):
                    store.load_into(t, layout.doc_view(r, n))
                static_load_s.append(time.perf_counter() - t0)
            else:
                fresh = []
                for t, n in zip(texts, lens):
                    kv = torch.empty(KVGeometry.of(reranker).shape(n), dtype=reranker.decoder.dtype, device=reranker.decoder.device)
                    store.load_into(t, kv)
                    fresh.append(kv)
                buf, _ = concat_layout(reranker.runner.prefix_kv, fresh, n_query)
                concat_load_s.append(time.perf_counter() - t0)
                del buf, fresh
        del kvs
        if progress:
            progress(1)
    mean = lambda xs: sum(xs) / len(xs) * 1e3 if xs else 0.0  # noqa: E731
    static_ms, concat_ms = mean(static_s), mean(concat_s)
    return {
        "static_ms": static_ms, "concat_ms": concat_ms,
        "ratio": concat_ms / static_ms if static_ms else 0.0, "saved_ms": concat_ms - static_ms,
        "static_load_ms": mean(static_load_s), "concat_load_ms": mean(concat_load_s),
        "load_ratio": mean(concat_load_s) / mean(static_load_s) if static_load_s and mean(static_load_s) else 0.0,
        "queries": len(candidate_texts), "repeats": repeats,
        "docs_per_query": sum(min(len(t), layout.max_batch) for t in candidate_texts) / max(len(candidate_texts), 1),
        "static_buffer_mb": layout.kv.nbytes / 2**20, "concat_buffer_mb_mean": sum(buffers_mb) / len(buffers_mb) if buffers_mb else 0.0,
        "note": "ms per query to fill the batch buffer with the candidates' document KV (excludes the model run)",
    }


def codec_sweep(engine, codecs: list[str], questions: list[dict], candidate_texts: list[list[str]],
                reference: dict[str, dict[str, float]], gold: dict[str, list[str]], all_texts: Sequence[str],
                progress=None) -> list[dict]:
    """Reuse scoring with each codec on the same candidates; errors against fp32 full prefill.

    Each candidate's exact KV (compute dtype: read from the main store if it is fp32, else
    encoded again) is encoded by every codec and held in memory (``LocalKV``: the LMCache round
    trip is the same for every codec and the main reuse row measures it); the codec order
    rotates per query so drift hits every codec alike."""
    union = list(dict.fromkeys(t for texts in candidate_texts for t in texts))
    sources, rows = _codec_sources(engine, codecs, union, all_texts)
    references = _score_codecs(engine, codecs, questions, candidate_texts, reference, gold, sources, rows, progress)
    sources.clear()
    return _codec_rows(engine.reranker.decoder, codecs, rows, references)


def _codec_sources(engine, codecs: list[str], union: list[str], all_texts: Sequence[str]) -> tuple[dict, dict]:
    """Per codec: an in-memory source holding every candidate's KV through it, and its row so
    far (encode time, bytes per token, the corpus's bytes)."""
    import gc

    from hyperrag.kv.local import LocalKV
    from hyperrag.rag.kv_rounding import codec_for

    reranker, s = engine.reranker, engine.settings
    dec = reranker.decoder
    corpus_tokens = [reranker.doc_tokens(t) for t in all_texts]
    sources = {name: LocalKV(codec_for(name, s.kv_rounding, reranker, s.cache_dir)) for name in codecs}
    encode_s = dict.fromkeys(codecs, 0.0)
    for text, kv in _exact_kvs(engine, union):  # one document at a time when the store is exact
        for name, source in sources.items():
            start = time.perf_counter()
            source.put(text, kv)
            encode_s[name] += time.perf_counter() - start
        del kv
    gc.collect()
    rows = {}
    for name in codecs:
        codec = sources[name].codec
        payload = sum(codec.nbytes(KVGeometry.of(reranker).shape(n)) for n in corpus_tokens)
        rows[name] = {"spec": codec.spec, "encode_ms_per_doc": 1e3 * encode_s[name] / max(len(union), 1),
                      "bytes_per_token": codec.bytes_per_token(dec.n_layers, dec.n_kv_heads, dec.head_dim),
                      "bytes": payload, "tokens": sum(corpus_tokens), "records": [], "secs": 0.0, "load_s": 0.0,
                      "pairs": 0, "ndcg": [], "encoded": 0, "held_bytes": sources[name].nbytes}
    return sources, rows


def _score_codecs(engine, codecs: list[str], questions: list[dict], candidate_texts: list[list[str]],
                  reference: dict[str, dict[str, float]], gold: dict[str, list[str]], sources: dict, rows: dict,
                  progress=None) -> list[dict]:
    """Every question's candidates scored in reuse mode from each codec's source (the order
    rotating per question) into ``rows``; returns the fp32 full-prefill reference records."""
    from hyperrag.rag.metrics import ndcg_at_k
    from hyperrag.rag.rerank import fuse_scores

    reranker, top_n = engine.reranker, engine.settings.top_n
    references = []
    for i, (q, texts) in enumerate(zip(questions, candidate_texts)):
        order = codecs[i % len(codecs):] + codecs[: i % len(codecs)]
        ids = q["candidate_ids"]
        ref = reference[q["id"]]
        references.append({"query_id": q["id"], "scores": ref, "ranked_ids": sorted(ids, key=lambda d: -ref[d]),
                           "top_n": top_n})
        for name in order:
            res = reranker.score(q["question"], texts, "reuse", sources[name])
            # the engine's ranking score: reranker + w x cosine (w = 0 without a fusion weight)
            scores = dict(zip(ids, fuse_scores(res.scores, q["candidate_cosine"], engine.runtime.retrieval_weight)))
            rank = sorted(ids, key=lambda d: -scores[d])
            row = rows[name]
            row["secs"] += res.load_s + res.compute_s
            row["load_s"] += res.load_s  # LocalKV: loading is decoding into the batch rows
            row["pairs"] += res.pairs
            row["encoded"] += res.encoded_docs
            row["records"].append({"query_id": q["id"], "scores": scores, "ranked_ids": rank})
            if gold.get(q["id"]):
                row["ndcg"].append(ndcg_at_k(rank, gold[q["id"]], 10))
        if progress:
            progress(1)
    return references


def _codec_rows(dec, codecs: list[str], rows: dict, references: list[dict]) -> list[dict]:
    """The sweep's output rows: sizes against fp32 and fp16, agreement with the reference, speed."""
    from hyperrag.kv.codec import get_codec
    from hyperrag.rag.metrics import agreement

    fp32_bpt = get_codec("fp32").bytes_per_token(dec.n_layers, dec.n_kv_heads, dec.head_dim)
    fp16_bpt = get_codec("fp16").bytes_per_token(dec.n_layers, dec.n_kv_heads, dec.head_dim)
    out = []
    for name in codecs:
        r = rows[name]
        out.append({
            "codec": name, "spec": r["spec"], "encode_ms_per_doc": r["encode_ms_per_doc"],
            "bytes_per_token": r["bytes_per_token"], "bytes": r["bytes"], "tokens": r["tokens"],
            "compression_vs_fp32": fp32_bpt / r["bytes_per_token"],
            "fraction_of_fp16": r["bytes_per_token"] / fp16_bpt,
            **agreement(references, r["records"]),
            "pairs_per_s": r["pairs"] / r["secs"] if r["secs"] else 0.0,
            "decode_share": r["load_s"] / r["secs"] if r["secs"] else 0.0,
            "ndcg@10": sum(r["ndcg"]) / len(r["ndcg"]) if r["ndcg"] else None,
            "queries": len(r["records"]), "pairs": r["pairs"], "encoded_docs": r["encoded"],
            "held_bytes": r["held_bytes"],
        })
    return out


def _exact_kvs(engine, texts: list[str]):
    """Yield ``(text, kv)`` with each document's KV in the compute dtype: read one at a time
    from the main store when its codec is exact (fp32), else encoded again in batches (a sweep
    must quantize exact values, not fp16 ones)."""
    import torch

    reranker = engine.reranker
    exact = engine.store.codec.name == "fp32" and reranker.decoder.dtype == torch.float32
    step = reranker.batch_size
    for first in range(0, len(texts), step):
        chunk = texts[first : first + step]
        kvs: list = [None] * len(chunk)
        if exact:
            for i, t in enumerate(chunk):
                kv = torch.empty(KVGeometry.of(reranker).shape(reranker.doc_tokens(t)), dtype=torch.float32,
                                 device=reranker.decoder.device)
                if engine.store.load_into(t, kv):
                    kvs[i] = kv
        missing = [i for i, kv in enumerate(kvs) if kv is None]
        if missing:
            for i, kv in zip(missing, reranker.encode_docs([chunk[i] for i in missing])):
                kvs[i] = kv
        for t, kv in zip(chunk, kvs):
            yield t, kv
        del kvs


def serve_block(engine, questions: list[str], clients: int, mode: str) -> dict:
    """``clients`` concurrent clients, each asking its share of ``questions`` back to back through
    the request batcher, against one client asking them all in turn through the same batcher;
    answers and rankings compared between the two runs."""
    import concurrent.futures as cf

    from hyperrag.workbench.batcher import Batcher

    settings = engine.settings
    batcher = Batcher(settings.batch_window_ms, max(settings.batch_requests, clients), settings.queue_size)

    def timed(ask_all) -> tuple[list, float]:
        t0 = time.perf_counter()
        results = ask_all()
        return results, time.perf_counter() - t0

    def client(share: list[int]) -> list[tuple[int, Any]]:
        return [(i, batcher.ask(engine, questions[i], mode)) for i in share]

    try:
        alone, alone_s = timed(lambda: [batcher.ask(engine, q, mode) for q in questions])
        groups_before = batcher.stats.groups
        with cf.ThreadPoolExecutor(clients) as pool:
            done, together_s = timed(lambda: [r for part in pool.map(client, [list(range(c, len(questions), clients))
                                                                           for c in range(clients)]) for r in part])
        groups = batcher.stats.groups - groups_before
    finally:
        batcher.close()
    together = [r for _, r in sorted(done, key=lambda pair: pair[0])]

    def latency(results: list) -> dict:
        return latency_summary([r.timings["total"] for r in results])

    sequential = {"sequential_queries_per_s": len(questions) / alone_s,
                  **{f"sequential_{k}": v for k, v in latency(alone).items()}}
    return {
        "clients": clients, "mode": mode, "queries": len(questions), "queries_per_s": len(questions) / together_s,
        **latency(together), **sequential,
        "speedup": alone_s / together_s, "mean_group": len(questions) / groups if groups else 0.0,
        "mean_queue_ms": sum(r.timings["queue"] for r in together) / len(together) * 1000,
        "identical_answers": sum(a.answer == b.answer for a, b in zip(alone, together)) / len(questions),
        "identical_rankings": sum(a.ranked_ids == b.ranked_ids for a, b in zip(alone, together)) / len(questions),
        "window_ms": settings.batch_window_ms,
    }


def frontier_points(results: dict) -> list[dict]:
    """Quality vs throughput of every configuration measured (e2e: queries/s; rerank: pairs/s)."""
    e2e, quality, rerank = results.get("e2e", {}), results.get("quality", {}), results.get("rerank", {})
    codec = results.get("config", {}).get("codec", "")
    points = []
    labels = {m.e2e_key: m.label + (f" {codec}" if m.rerank == "reuse" else "")  # stored KV: name its codec
              for m in MODE_TABLE if m.e2e_key != "prefix_cached"}
    for key, label in labels.items():
        if key in e2e and key in quality:
            points.append({"label": label, "kind": "e2e", "queries_per_s": e2e[key]["queries_per_s"],
                           "ndcg@10": quality[key]["ndcg@10"], "f1": quality[key].get("f1")})
    for m in MODE_TABLE:  # the trained reranker's rows (the zero-shot reference is an e2e point)
        q = quality.get(m.e2e_key)
        if m.rerank_key in rerank and m.name != "zero_shot" and q:
            label = f"rerank {m.rerank_key.replace('_', ' ')}" + (f" {codec}" if m.rerank == "reuse" else "")
            points.append({"label": label, "kind": "rerank", "pairs_per_s": rerank[m.rerank_key]["pairs_per_s"],
                           "ndcg@10": q["ndcg@10"], "f1": q.get("f1")})
    for row in results.get("codecs", []):
        if row.get("ndcg@10") is not None:
            points.append({"label": f"rerank reuse {row['codec']} (sweep)", "kind": "rerank",
                           "pairs_per_s": row["pairs_per_s"], "ndcg@10": row["ndcg@10"], "f1": None})
    return points


def _peak_rss_gb() -> float:
    """This process's peak resident memory so far, GB."""
    from hyperrag.common.memory import peak_resident_bytes

    return round(peak_resident_bytes() / 2**30, 3)


def machine_info(engine) -> dict:
    import torch

    from hyperrag.model.kernels import cpu_model

    cpu = cpu_model()
    # date and cpu: what `python -m hyperrag.docs` prints beside the tables it writes from this record
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu if cpu != "unknown" else platform.processor() or cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "device": str(engine.reranker.decoder.device), "dtype": str(engine.reranker.decoder.dtype).replace("torch.", ""),
            "python": platform.python_version(), "platform": platform.platform(),
            "linear": engine.reranker.llm.kernels, "streams": engine.reranker.stream_choice}
    if torch.cuda.is_available() and engine.reranker.decoder.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(engine.reranker.decoder.device)
    for module in ("transformers", "lmcache"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a version string is optional
            pass
    info["loadavg_start"] = _loadavg()
    return info


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


# -- the run ------------------------------------------------------------------------------------

class _Run:
    """One benchmark run's state, filled phase by phase (:func:`run` calls them in order)."""

    def __init__(self, args: argparse.Namespace):
        from hyperrag.common.settings import settings_from_args

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        self.args = args
        self.tmp = None
        if args.store_url is None:
            self.tmp = tempfile.TemporaryDirectory(prefix="hyperrag-bench-kv-")
            args.store_url = f"fs://{self.tmp.name}"
        self.settings = settings_from_args(args)
        self.bar_opts = {"file": sys.stderr, "dynamic_ncols": True, "leave": False}
        self.wall0 = time.perf_counter()
        self.setup: dict[str, float] = {}
        self.memory: dict[str, float] = {}  # phase -> peak RSS so far (GB)
        self.warnings: list[str] = []
        self.engine = self.zero_shot = None

    def bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="q", **self.bar_opts)

    def load(self) -> None:
        """The engine on the corpus, and the questions with their retrieved candidates."""
        from hyperrag.data.corpus import load_corpus
        from hyperrag.rag.pipeline import Engine
        from hyperrag.rag.precompute import progress_bar

        args, settings = self.args, self.settings
        t0 = time.perf_counter()
        self.corpus = corpus = load_corpus(settings.folder("corpus"))
        bar, progress = progress_bar(len(corpus.docs), "index (embed)", **self.bar_opts)
        with bar:
            self.engine = Engine.load(settings, corpus=corpus, with_generator=not args.no_generate, progress=progress)
        self.setup["load_s"] = time.perf_counter() - t0
        self.memory["load"] = _peak_rss_gb()
        self.machine = machine_info(self.engine)
        self.questions, self.query_source = bench_questions(corpus, args.queries, settings.seed)
        if not corpus.queries:
            print(f"note: {corpus.root} has no gold queries (queries.jsonl): using document openings as "
                  "questions; the quality block is skipped", file=sys.stderr)
        self.top_k, self.top_n = settings.top_k, min(settings.top_n, settings.top_k)
        for q in self.questions:
            hits = self.engine.retrieve(q["question"], self.top_k)
            q["candidate_ids"], q["candidate_cosine"] = [d for d, _ in hits], [c for _, c in hits]
        self.candidate_texts = [[corpus.by_id[d].text for d in q["candidate_ids"]] for q in self.questions]

    def precompute(self) -> None:
        """The documents' KV (the corpus's, or the candidates'), timed apart."""
        from hyperrag.rag.precompute import plan_lines, precompute, progress_bar

        engine = self.engine
        if self.args.precompute == "all":
            self.texts = [d.text for d in self.corpus.docs]
        else:
            self.texts = list(dict.fromkeys(t for ts in self.candidate_texts for t in ts))
        for line in plan_lines(engine.reranker, self.texts, engine.store):
            print(line, file=sys.stderr)
        bar, progress = progress_bar(len(self.texts), "precompute", **self.bar_opts)
        with bar:
            self.report = precompute(engine.reranker, engine.store, self.texts, progress)
        self.setup["precompute_s"] = self.report.seconds
        self.memory["precompute"] = _peak_rss_gb()
        self.warnings += self.report.warnings

    def choose_modes(self) -> None:
        """Every mode that can run; the zero-shot reference (base model, no adapter, its own
        in-memory KV, precomputed apart) when there is an adapter and it is not turned off."""
        from hyperrag.rag.precompute import precompute, progress_bar
        from hyperrag.workbench.operations import runnable_modes

        engine = self.engine
        with_zero_shot = bool(self.settings.adapter and not self.args.no_zero_shot)
        self.modes = runnable_modes(reader=engine.reader is not None, zero_shot=with_zero_shot)
        if with_zero_shot:
            union = list(dict.fromkeys(t for ts in self.candidate_texts for t in ts))
            need = plan_corpus(engine.reranker, union, engine.store.codec).payload_bytes
            self.zero_shot = engine.zero_shot(hot_cache_gb=need * 1.25 / 1e9 + 0.05)
            bar, progress = progress_bar(len(union), "precompute zero-shot", **self.bar_opts)
            with bar:
                zs_report = precompute(self.zero_shot.reranker, self.zero_shot.store, union, progress)
            self.setup["zero_shot_precompute_s"] = zs_report.seconds
            self.memory["zero_shot"] = _peak_rss_gb()

    def ask(self, question: str, mode: str, **kw):
        from hyperrag.workbench.operations import route

        target, engine_mode = route(mode, lambda: self.engine, lambda: self.zero_shot)
        return target.ask(question, engine_mode, **kw)

    def generates(self, mode: str) -> bool:
        return mode != "prefix" and not self.args.no_generate

    def warm_up(self) -> None:
        """One question through every mode, not timed."""
        t0 = time.perf_counter()
        for mode in self.modes:
            self.ask(self.questions[0]["question"], mode, generate=self.generates(mode))
        self.setup["warmup_s"] = time.perf_counter() - t0
        self.memory["warmup"] = _peak_rss_gb()

    def query_loop(self) -> None:
        """Every mode on every question, the order rotating per question; the store's load
        figures over the loop."""
        from hyperrag.report import record_from_result

        engine, modes = self.engine, self.modes
        stats0 = dict(vars(engine.store.stats))
        self.warnings += engine.store.take_warnings()
        self.records: list[dict] = []
        self.same_candidates = True
        encoded_at_query_time = 0
        self.loads: list[float] = []
        bar = self.bar(len(self.questions), "queries")
        for i, q in enumerate(self.questions):
            for mode in modes[i % len(modes):] + modes[: i % len(modes)]:
                generate = self.generates(mode)
                result = self.ask(q["question"], mode, top_k=self.top_k, top_n=self.top_n, generate=generate)
                if sorted(result.ranked_ids) != sorted(q["candidate_ids"]):
                    self.same_candidates = False
                rec = record_from_result(result, q["query"], q["id"], generated=generate)
                rec["mode"] = mode
                self.records.append(rec)
                encoded_at_query_time += rec.get("encoded_docs", 0) if MODES[mode].rerank == "reuse" else 0
                self.warnings += [w for w in result.warnings if w not in self.warnings]
            bar.update(1)
            self.loads.append(_loadavg())
        bar.close()
        stats1 = vars(engine.store.stats)
        load_bytes = stats1["load_bytes"] - stats0["load_bytes"]
        load_s = stats1["load_s"] - stats0["load_s"]
        self.load_stats = {"bytes": load_bytes, "gb_per_s": load_bytes / load_s / 1e9 if load_s else 0.0,
                           "hits": stats1["hits"] - stats0["hits"], "misses": stats1["misses"] - stats0["misses"],
                           "hot_hits": stats1["hot_hits"] - stats0["hot_hits"]}
        if encoded_at_query_time:
            self.warnings.append(f"{encoded_at_query_time} document KV(s) were missing from the store at query time "
                                 "and computed inside the reuse timings")

    def summarize(self) -> dict:
        """The result dict of the query loop: config, setup, the records' summary, storage,
        planner, machine."""
        from hyperrag.report import summarize

        args, settings, engine, corpus = self.args, self.settings, self.engine, self.corpus
        results: dict[str, Any] = {
            "config": {
                "corpus": corpus.name, "corpus_path": str(corpus.root), "corpus_docs": len(corpus.docs),
                "queries": len(self.questions), "query_source": self.query_source, "top_k": self.top_k,
                "top_n": self.top_n, "codec": settings.codec, "kv_rounding": settings.kv_rounding,
                "store": settings.store_url if self.tmp is None else "fs://<temporary folder>",
                "store_temporary": self.tmp is not None, "batch_size": settings.batch_size, "seed": settings.seed,
                "cpu_streams": engine.reranker.runner.rows.size,
                "model": settings.model, "adapter": settings.adapter, "dtype": settings.dtype,
                "memory_budget_gb": memory_budget_gb(settings.memory_budget_gb, settings.model),
                "max_new_tokens": settings.max_new_tokens, "max_doc_tokens": settings.max_doc_tokens,
                "generate": not args.no_generate, "quick": args.quick, "precompute": args.precompute,
                "codecs": args.codec_list, "same_candidates_every_mode": self.same_candidates,
                "mode_order": "rotating per question: " + ", ".join(self.modes),
                "zero_shot": "base model without the adapter, no score fusion, reuse mode, document KV in memory"
                             if "zero_shot" in self.modes else "not run (no adapter, or --no-zero-shot)",
            },
            "setup": self.setup,
            **summarize(self.records),
        }
        results["rerank"]["note"] = ("full = baseline rerank (whole prompt per pair, candidates grouped by "
                                     "length); prefix_cached = shared instruction KV cached; reuse = stored "
                                     "document KV, question+suffix run per pair")
        results["storage"] = storage_block(engine, self.texts, self.report, self.load_stats)
        mean_tokens = results["storage"]["tokens"] / max(results["storage"]["docs"], 1)
        corpus_estimate = estimate(len(corpus.docs), round(mean_tokens), engine.store.codec,
                                   KVGeometry.of(engine.reranker)).total_bytes
        results["planner"] = {"label": f"planner: {len(corpus.docs)} docs x {mean_tokens:.0f} tokens "
                                       f"({settings.codec})", "bytes": corpus_estimate,
                              "docs": len(corpus.docs), "tokens_per_doc": mean_tokens}
        results["machine"] = machine = self.machine
        if self.loads:
            machine["loadavg_queries"] = sum(self.loads) / len(self.loads)
            # the bench's own threads count in the load average (each reranker row stream runs up to
            # torch's thread count): warn only when others added to it
            own = (machine.get("threads") or 1) * engine.reranker.runner.rows.size
            if machine["loadavg_queries"] > max(machine.get("cores") or 1, own) + 0.75:
                self.warnings.append(f"the machine was busy during the queries (load average "
                                     f"{machine['loadavg_queries']:.1f} on {machine.get('cores')} cores): absolute "
                                     "timings are inflated; ratios hold better since modes are interleaved per question")
        return results

    def measure_more(self, results: dict) -> None:
        """What the query loop does not measure: the query-first baseline, the static layout,
        the codec sweep, concurrent clients."""
        args, engine, questions = self.args, self.engine, self.questions
        bar = self.bar(len(questions), "query-first cached")
        results["rerank"].update(query_first_block(engine, questions, self.candidate_texts, progress=bar.update))
        bar.close()
        self.memory["queries"] = _peak_rss_gb()
        n_query = results["rerank"].get("mean_query_tokens") or 24
        bar = self.bar(len(questions), "layout")
        results["layout"] = measure_layout(engine, self.candidate_texts, round(n_query), args.layout_repeats,
                                           progress=bar.update)
        bar.close()
        if args.codec_list:
            reference = {rec["query_id"]: rec["scores"] for rec in self.records if rec["mode"] == "baseline"}
            gold = {q["id"]: list(q["query"].doc_ids) for q in questions if q["query"] is not None}
            bar = self.bar(len(questions), "codecs")
            results["codecs"] = codec_sweep(engine, args.codec_list, questions, self.candidate_texts, reference, gold,
                                            [d.text for d in self.corpus.docs], progress=bar.update)
            bar.close()
            sweep_encoded = sum(r["encoded_docs"] for r in results["codecs"])
            if sweep_encoded:
                self.warnings.append(f"codec sweep: {sweep_encoded} document KV(s) missing from the sweep stores")
            self.memory["codecs"] = _peak_rss_gb()  # the sweep holds a store (and CPU tier) per codec
        if args.serve:
            mode = "reader_kv" if engine.reader is not None and not args.no_generate else "reuse"
            print(f"serve: {args.clients} clients vs one, {len(questions)} questions, {mode}", file=sys.stderr)
            results["serve"] = serve_block(engine, [q["question"] for q in questions], args.clients, mode)
            self.memory["serve"] = _peak_rss_gb()

    def finish(self, results: dict) -> dict:
        self.memory["end"] = _peak_rss_gb()
        results["memory"] = {"peak_rss_gb_after": self.memory}
        if self.args.frontier:
            results["frontier"] = frontier_points(results)
        self.warnings += self.engine.store.take_warnings()
        results["machine"]["loadavg_end"] = _loadavg()
        self.setup["bench_wall_s"] = time.perf_counter() - self.wall0
        results["warnings"] = list(dict.fromkeys(self.warnings))
        results["records"] = self.records
        return results

    def close(self) -> None:
        if self.zero_shot is not None:
            self.zero_shot.close()
        if self.engine is not None:
            self.engine.close()
        if self.tmp is not None:
            self.tmp.cleanup()


def run(args: argparse.Namespace) -> dict:
    """The whole benchmark for resolved options; returns the result dict."""
    bench = _Run(args)
    try:
        bench.load()
        bench.precompute()
        bench.choose_modes()
        bench.warm_up()
        bench.query_loop()
        results = bench.summarize()
        bench.measure_more(results)
        return bench.finish(results)
    finally:
        bench.close()


def _tier_note(storage: dict) -> str:
    """How many loads the in-process CPU tier served (reports older than this field: nothing)."""
    if "cpu_tier_gb" not in storage:
        return ""
    served = storage["cpu_tier_loads"] / storage["loads"] if storage.get("loads") else 0.0
    return f" ({served:.0%} of loads from the {storage['cpu_tier_gb']:.2f} GB CPU tier)"


def print_table(results: dict, out=None) -> None:
    from hyperrag.report import ratio_rows

    out = out or sys.stdout
    cfg = results.get("config", {})
    print(f"\nHyperRAG bench: {cfg.get('corpus')} ({cfg.get('corpus_docs')} docs), {cfg.get('queries')} queries, "
          f"top-k {cfg.get('top_k')}, top-n {cfg.get('top_n')}, codec {cfg.get('codec')}, "
          f"{results.get('machine', {}).get('device')} x{results.get('machine', {}).get('threads')} threads", file=out)
    linear = results.get("machine", {}).get("linear")
    if isinstance(linear, dict) and linear.get("small"):
        figures = "; ".join(f"{size}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in f.items())
                            for size, f in (linear.get("figures_ms") or {}).items())
        print(f"  projections: {linear['small']} for reuse-sized calls, {linear['large']} for prefill-sized, "
              f"{linear.get('head', linear['small'])} for the output head "
              f"({linear.get('source', '')}{'; ' + figures if figures else ''})", file=out)
    streams = results.get("machine", {}).get("streams")
    if isinstance(streams, dict) and "small_stream_threads" in streams:
        figures = ", ".join(f"{n} thread(s) {ms:.1f} ms" for n, ms in (streams.get("figures_ms") or {}).items())
        print(f"  reuse row streams: {streams['small_stream_threads']} OpenMP thread(s) each "
              f"({streams.get('source', '')}{'; a reuse-shaped batch: ' + figures if figures else ''})", file=out)
    rows = ratio_rows(results)
    width = max(len(r[0]) for r in rows)
    for what, value, target in rows:
        print(f"  {what:<{width}}  {value:>22}  {('target ' + target) if target else ''}", file=out)
    st = results.get("storage", {})
    if st:
        print(f"  storage: {st['docs']} docs, {st['tokens']} tokens, {st['bytes'] / 2**20:.1f} MiB "
              f"({st['bytes_per_token']:.0f} B/token, {st['codec']}); precompute {st['precompute_docs_per_s']:.2f} docs/s; "
              f"KV load {st['load_gb_per_s']:.2f} GB/s{_tier_note(st)}", file=out)
    q = results.get("quality", {})
    if any(m in q for m in E2E_KEYS):
        print("  quality        recall@1 recall@5  mrr@10 ndcg@10      em      f1", file=out)
        for m in E2E_KEYS:
            if m in q:
                print(f"  {m:<14}" + "".join(f"{q[m].get(k) if q[m].get(k) is not None else float('nan'):8.3f}"
                                             for k in ("recall@1", "recall@5", "mrr@10", "ndcg@10", "em", "f1")), file=out)
    elif q.get("note"):
        print(f"  quality: {q['note']}", file=out)
    for row in results.get("codecs", []):
        ndcg = row.get("ndcg@10")
        print(f"  codec {row['codec']:>5}: {row['bytes_per_token']:8.0f} B/token ({row['fraction_of_fp16']:.3f} of fp16), "
              f"max/mean |diff| {row['max_abs_score_diff']:.2g}/{row['mean_abs_score_diff']:.2g}, identical rankings "
              f"{row['ranking_agreement']:.0%}, same top-n {row['top_n_agreement']:.0%}, NDCG@10 "
              f"{ndcg if ndcg is not None else float('nan'):.3f}, {row['pairs_per_s']:.1f} pairs/s, decode "
              f"{row['decode_share']:.1%} of reuse time", file=out)
    peaks = (results.get("memory") or {}).get("peak_rss_gb_after") or {}
    if peaks:
        print("  peak RSS after " + ", ".join(f"{k} {v:.2f} GB" for k, v in peaks.items()), file=out)
    s = results.get("setup", {})
    print(f"  (excluded from timings: load {s.get('load_s', 0):.1f} s, precompute {s.get('precompute_s', 0):.1f} s, "
          f"warm-up {s.get('warmup_s', 0):.1f} s)", file=out)
    for w in results.get("warnings", []):
        print(f"  warning: {w}", file=out)


def check_results(results: dict) -> list[str]:
    """Problems with a result dict: missing schema keys, non-finite or non-positive numbers."""
    from hyperrag.report import finite_numbers

    problems = []
    required = {
        "config": [], "machine": ["cpu", "threads", "torch", "device"],
        "rerank": ["full", "prefix_cached", "reuse", "speedup_vs_full", "speedup_vs_prefix_cached", "token_ratio_limit",
                   "query_first_cached", "speedup_vs_query_first_cached"],
        "e2e": ["retrieval_only", "baseline", "reuse"],
        "storage": ["codec", "docs", "tokens", "bytes", "bytes_per_token", "precompute_docs_per_s", "load_gb_per_s"],
    }
    if results.get("config", {}).get("adapter") and results.get("config", {}).get("generate"):
        required["e2e"] = required["e2e"] + ["retrieval_reader", "reader_full", "reader_kv", "reader_speedup"]
        required["quality"] = ["retrieval_reader", "reader_full", "reader_kv", "reader_kv_minus_retrieval_reader"]
    for key, subkeys in required.items():
        if key not in results:
            problems.append(f"missing {key}")
            continue
        problems += [f"missing {key}.{k}" for k in subkeys if k not in results[key]]
    for path, value in finite_numbers({k: v for k, v in results.items() if k != "records"}):
        if not math.isfinite(value):
            problems.append(f"{path} is not finite: {value}")
    return problems


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = resolve_options(parser.parse_args(argv))
    if args.scale:
        from hyperrag.scale import format_report, scale_bench

        results = scale_bench(args.scale)
        print(format_report(results))
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(results, indent=1) + "\n")
            print(f"  JSON: {args.json_path}")
        return results
    if args.http:
        return http_main(args, sys.argv[1:] if argv is None else argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        args.json_path = None if args.json_path == args.render else args.json_path
    else:
        results = run(args)
    records = results.pop("records", [])
    print_table(results)
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**results, "records": records}, indent=1, default=str) + "\n")
        print(f"  JSON: {path}")
    if args.html_path:
        from hyperrag.figures import html_report

        path = Path(args.html_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(html_report(results), encoding="utf-8")
        print(f"  HTML: {path}")
    results["records"] = records
    return results


def http_main(args: argparse.Namespace, argv: list[str]) -> dict:
    """``--http URL``: the HTTP load test alone (:mod:`hyperrag.bench_http`), printed and, with
    --json, written as ``{"http": ..., "machine": ...}``."""
    from hyperrag.bench_http import http_bench
    from hyperrag.common.settings import settings_from_args
    from hyperrag.data.corpus import load_corpus
    from hyperrag.serve.limits import read_token

    if args.requests < 1:
        raise SystemExit("--requests must be >= 1")
    from hyperrag.rag.pipeline import Engine

    with tempfile.TemporaryDirectory(prefix="hyperrag-bench-http-") as tmp:
        # The reference's own store: --store keeps it between runs (never give it the service's).
        settings = settings_from_args(args).replace(store_url=args.store_url or f"fs://{tmp}", hot_cache_gb=0.0)
        corpus = load_corpus(settings.folder("corpus"))
        questions, _ = bench_questions(corpus, args.queries, settings.seed)
        engine = Engine.load(settings, corpus=corpus, with_generator=False)
        try:
            block = http_bench(args.http, engine, [q["question"] for q in questions], args.clients, args.requests,
                               read_token(args.token_file), args.http_time_limit)
        finally:
            engine.close()
    cold = block["first_vs_second"]
    print(f"http {block['url']}: {block['clients']} clients, {block['requests']} requests: "
          f"{block['queries_per_s']:.2f} queries/s, p50 {block['p50_ms']:.0f} ms, p95 {block['p95_ms']:.0f} ms, "
          f"{block['errors']} errors, KV reused {block['kv_reused_fraction']:.2f}, "
          f"identical rankings {block['identical_rankings']:.2f}")
    if "speedup" in cold:
        print(f"  first vs second request: {cold['first_p50_ms']:.0f} ms -> {cold['second_p50_ms']:.0f} ms "
              f"(x{cold['speedup']:.1f}; first computed {cold['first_kv_computed_fraction']:.2f} of its documents)")
    from hyperrag.model.kernels import cpu_model

    results = {"http": block, "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_end": _loadavg()},
               "command": "python -m hyperrag.bench " + " ".join(argv)}
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"  JSON: {path}")
    return results


if __name__ == "__main__":
    main()
