"""How the first stage scales: exact vs HNSW inner-product search over N synthetic vectors.

    python -m hyperrag.bench --scale 100000 [--json out.json]
    python -m hyperrag.scale 100000 [--m 32 --ef-search 128 --ef-construction 80]
    python -m hyperrag.scale --corpus DIR    # a real corpus's embeddings and its questions

The vectors are unit vectors drawn around random cluster centres (a clustered Gaussian, like
embeddings of a corpus of many topics), queries from the same distribution, so the nearest
neighbours are not all equally far and recall@k says something. :func:`scale_bench` reports,
for the exact ``IndexFlatIP`` and the ``IndexHNSWFlat`` that :mod:`hyperrag.rag.retrieval` uses
above :data:`~hyperrag.rag.retrieval.HNSW_MIN_VECTORS`: build seconds, index bytes, resident memory
(peak of the process and growth over the build), one-question query latency p50/p95 in ms, and
the HNSW index's recall@k against the exact one.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import TYPE_CHECKING

import faiss
import numpy as np

from hyperrag.rag import retrieval
from hyperrag.common.memory import peak_resident_bytes, resident_bytes

if TYPE_CHECKING:
    from hyperrag.common.settings import Settings


def synthetic(n: int, dim: int, seed: int = 0, queries: int = 0, clusters: int | None = None,
              spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` data and ``queries`` query unit vectors: random unit centres (about sqrt(n) of
    them, shared) plus Gaussian noise of norm ~``spread`` per vector, normalized. With spread
    1.0 a point's cosine to its own centre is about 0.7 and to another centre about 0, and a
    query's nearest neighbours sit at cosine ~0.55-0.6 (MiniLM's top hits on SQuAD are in
    that range): each query has a cluster of near neighbours that differ only by noise."""
    rng = np.random.default_rng(seed)
    clusters = clusters or max(1, int(np.sqrt(n)))
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, dim), dtype=np.float32)
        for start in range(0, count, 65_536):  # in blocks: no count x dim temporaries
            m = min(65_536, count - start)
            block = centres[rng.integers(0, clusters, m)]
            block += rng.standard_normal((m, dim), dtype=np.float32) * (spread / np.sqrt(dim))
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            out[start : start + m] = block
        return out

    return draw(n), draw(queries)


def corpus_vectors(folder: str, queries: int, settings: "Settings | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """A corpus's passage embeddings (from its saved index, built first if there is none) and
    up to ``queries`` of its questions embedded the same way: the real data for :func:`scale_bench`."""
    from hyperrag.data.corpus import load_corpus
    from hyperrag.model.loading import load_embedder
    from hyperrag.rag.retrieval import DenseIndex
    from hyperrag.common.settings import Settings

    s = settings or Settings.from_env()
    corpus = load_corpus(folder)
    if not corpus.queries:
        raise ValueError(f"{folder} has no queries.jsonl: its questions are what recall is measured on")
    embedder = load_embedder(s.embedder, s.cache_dir, s.device)
    index = DenseIndex.load_or_build(corpus, embedder, s.embedder, s.cache_dir).index
    questions = [q.question for q in corpus.queries[:queries]]
    return index.reconstruct_n(0, index.ntotal), embedder.encode(questions, normalize_embeddings=True, convert_to_numpy=True)


def _measure(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[dict, np.ndarray]:
    gc.collect()
    rss0 = resident_bytes()
    t0 = time.perf_counter()
    index.add(vectors)
    build = time.perf_counter() - t0
    grown = resident_bytes() - rss0
    index.search(queries[:5], k)  # warm up
    times, rows = [], np.empty((len(queries), k), dtype=np.int64)
    for i, q in enumerate(queries):  # one question at a time, like the engine
        t1 = time.perf_counter()
        _, r = index.search(q[None, :], k)
        times.append(time.perf_counter() - t1)
        rows[i] = r[0]
    ms = np.array(times) * 1e3
    return {"build_s": round(build, 3), "index_bytes": int(faiss.serialize_index(index).nbytes),
            "rss_growth_bytes": int(max(grown, 0)), "peak_rss_bytes": peak_resident_bytes(),
            "query_ms_p50": round(float(np.percentile(ms, 50)), 4),
            "query_ms_p95": round(float(np.percentile(ms, 95)), 4)}, rows


def scale_bench(n: int, dim: int = 384, k: int = 10, queries: int = 200, seed: int = 0,
                m: int | None = None, ef_search: int | None = None, ef_construction: int | None = None,
                data: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Build an exact and an HNSW index over ``n`` synthetic unit vectors of ``dim`` (or over
    ``data``: real vectors and queries, :func:`corpus_vectors`) and compare them on the queries
    (HNSW parameters default to :mod:`hyperrag.rag.retrieval`'s)."""
    m = m or retrieval.HNSW_M
    ef_search = ef_search or retrieval.HNSW_EF_SEARCH
    ef_construction = ef_construction or retrieval.HNSW_EF_CONSTRUCTION
    t0 = time.perf_counter()
    vectors, qs = data if data is not None else synthetic(n, dim, seed, queries)
    (n, dim), queries = vectors.shape, len(qs)
    if n < k:
        raise ValueError(f"need n >= k ({n} < {k})")
    data_s = time.perf_counter() - t0

    exact, truth = _measure(faiss.IndexFlatIP(dim), vectors, qs, k)
    hnsw_index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    hnsw_index.hnsw.efConstruction = ef_construction
    hnsw_index.hnsw.efSearch = ef_search
    hnsw, found = _measure(hnsw_index, vectors, qs, k)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, found)]))
    hnsw.update({"recall_at_k": round(recall, 4), "M": m, "efSearch": ef_search, "efConstruction": ef_construction})
    return {"n": n, "dim": dim, "k": k, "queries": queries, "seed": seed, "data_s": round(data_s, 3),
            "data": "real" if data is not None else "synthetic",
            "vector_bytes": int(vectors.nbytes), "faiss_threads": faiss.omp_get_max_threads(),
            "engine_choice": "hnsw" if n >= retrieval.HNSW_MIN_VECTORS else "exact",
            "hnsw_min_vectors": retrieval.HNSW_MIN_VECTORS, "exact": exact, "hnsw": hnsw}


def sweep_ef(n: int, ef_values=(16, 32, 64, 96, 128, 192, 256), dim: int = 384, k: int = 10, queries: int = 200,
             seed: int = 0, m: int | None = None, ef_construction: int | None = None,
             data: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict]:
    """Recall@k and latency of one HNSW graph at several efSearch values (one build), over
    synthetic vectors or ``data`` (:func:`corpus_vectors`)."""
    m = m or retrieval.HNSW_M
    vectors, qs = data if data is not None else synthetic(n, dim, seed, queries)
    dim = vectors.shape[1]
    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors)
    _, truth = flat.search(qs, k)
    index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction or retrieval.HNSW_EF_CONSTRUCTION
    t0 = time.perf_counter()
    index.add(vectors)
    build = time.perf_counter() - t0
    out = []
    for ef in ef_values:
        index.hnsw.efSearch = ef
        times, hits = [], 0
        for q, t in zip(qs, truth):
            t1 = time.perf_counter()
            _, r = index.search(q[None, :], k)
            times.append(time.perf_counter() - t1)
            hits += len(set(r[0]) & set(t))
        ms = np.array(times) * 1e3
        out.append({"M": m, "efConstruction": index.hnsw.efConstruction, "efSearch": ef, "build_s": round(build, 2),
                    "recall_at_k": hits / (k * len(qs)), "p50_ms": round(float(np.percentile(ms, 50)), 4),
                    "p95_ms": round(float(np.percentile(ms, 95)), 4)})
    return out


def format_report(r: dict) -> str:
    lines = [f"N={r['n']:,} ({r.get('data', 'synthetic')}) dim={r['dim']} k={r['k']} queries={r['queries']} faiss threads={r['faiss_threads']} "
             f"(the engine uses {r['engine_choice']} at this size; HNSW from {r['hnsw_min_vectors']:,})"]
    for name in ("exact", "hnsw"):
        x = r[name]
        extra = (f"  recall@{r['k']} {x['recall_at_k']:.4f} (M={x['M']}, efSearch={x['efSearch']}, "
                 f"efConstruction={x['efConstruction']})") if name == "hnsw" else ""
        lines.append(f"{name:6} build {x['build_s']:8.2f} s  index {x['index_bytes'] / 2**20:8.1f} MiB  "
                     f"RSS +{x['rss_growth_bytes'] / 2**20:7.1f} MiB (peak {x['peak_rss_bytes'] / 2**20:,.0f} MiB)  "
                     f"query p50 {x['query_ms_p50']:.3f} ms p95 {x['query_ms_p95']:.3f} ms{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperrag.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", type=int, nargs="?", default=100_000, help="synthetic vectors (ignored with --corpus)")
    parser.add_argument("--corpus", default=None, help="measure a corpus folder's own embeddings and questions instead")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--m", type=int, default=None)
    parser.add_argument("--ef-search", type=int, default=None)
    parser.add_argument("--ef-construction", type=int, default=None)
    parser.add_argument("--sweep", action="store_true", help="one HNSW build, recall/latency at several efSearch")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    data = corpus_vectors(args.corpus, args.queries) if args.corpus else None
    if args.sweep:
        result = sweep_ef(args.n, dim=args.dim, queries=args.queries, m=args.m, ef_construction=args.ef_construction,
                          data=data)
        for row in result:
            print(row)
    else:
        result = scale_bench(args.n, args.dim, queries=args.queries, m=args.m, ef_search=args.ef_search,
                             ef_construction=args.ef_construction, data=data)
        print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
