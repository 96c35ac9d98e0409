"""Measure the KV store for the issue note: one run, tables on stdout (and JSON with --json).

    ./run.sh python scripts/measure_store.py [--questions 8] [--top-k 20] [--json out.json]

- codecs: stored bytes/token (codec + frame, at the measured mean document length), max and
  mean |score - fp32 score| over real reranker batches (SQuAD questions, their retriever top-k
  from the shipped corpus), full-ranking and top-3 agreement with fp32, decode ms/doc;
- precompute: documents/s and tokens/s into an fs:// store (fp16), model time included;
- load: GB/s of stored bytes through ``KVStore.load_many`` in batches of the reranker's size
  (fetch + frame/CRC check + decode into the static batch buffer) per backend (fs, lm, redis, memory), cold (a fresh store, no CPU
  tier: every read goes to the backend; for fs:// the OS page cache is warm) and hot (served
  by the in-process CPU tier), fp16, plus fs:// per codec.

Starts its own lmcache_server and redis-server on free 127.0.0.1 ports (skipped if missing).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from hyperrag.data.corpus import load_corpus
    from hyperrag.kv.codec import CODECS, get_codec
    from hyperrag.kv.planner import plan_corpus
    from hyperrag.model.geometry import KVGeometry
    from hyperrag.kv.store import KVStore
    from hyperrag.model.loading import load_embedder
    from hyperrag.rag.runtime import load_reranker
    from hyperrag.rag.precompute import precompute
    from hyperrag.rag.retrieval import DenseIndex
    from hyperrag.common.settings import Settings
    from tests.servers import Server, lmcache_server_binary

    s = Settings.from_env(dtype="float32")
    corpus = load_corpus(s.corpus)
    embedder = load_embedder(s.embedder, s.cache_dir, s.device)
    index = DenseIndex.load_or_build(corpus, embedder, s.embedder, s.cache_dir)
    reranker = load_reranker(s)
    step = max(1, len(corpus.queries) // args.questions)
    queries = corpus.queries[::step][: args.questions]
    batches = [(q.question, [corpus.by_id[d].text for d, _ in index.search(q.question, args.top_k)]) for q in queries]
    union = list(dict.fromkeys(t for _, docs in batches for t in docs))
    tokens = [reranker.doc_tokens(t) for t in union]
    print(f"{len(queries)} questions x top-{args.top_k}: {len(union)} documents, mean {sum(tokens) / len(tokens):.0f} "
          f"tokens (max {max(tokens)}); model {s.model}, fp32 compute, {args.threads} threads", flush=True)
    out: dict = {"questions": len(queries), "top_k": args.top_k, "docs": len(union),
                 "mean_tokens": sum(tokens) / len(tokens)}
    tmp = Path(tempfile.mkdtemp(prefix="measure-store-"))
    servers = []
    try:
        # -- precompute (into fs://, fp32 so the exact KV can be read back for the codec table) --
        pre_url = f"fs://{tmp / 'pre'}"
        store = KVStore(pre_url, get_codec("fp32"), reranker.kv_identity, hot_cache_gb=0)
        report = precompute(reranker, store, union)
        store.close()
        out["precompute"] = {"docs": report.encoded, "seconds": report.seconds, "docs_per_s": report.docs_per_s,
                             "tokens_per_s": report.tokens / report.seconds, "encode_seconds": report.encode_seconds,
                             "bytes_fp32": report.bytes}
        print(f"\nprecompute: {report.encoded} docs in {report.seconds:.1f} s = {report.docs_per_s:.2f} docs/s, "
              f"{report.tokens / report.seconds:.0f} tokens/s (model {report.encode_seconds:.1f} s), "
              f"{report.bytes / 1e6:.0f} MB as fp32", flush=True)
        store = KVStore(pre_url, get_codec("fp32"), reranker.kv_identity, hot_cache_gb=0)
        kvs = {}
        for text in union:  # exact fp32 KV, read back through the store
            kvs[text] = torch.empty(KVGeometry.of(reranker).shape(reranker.doc_tokens(text)))
            assert store.load_into(text, kvs[text])
        store.close()

        # -- codecs: bytes/token and score error against fp32 ---------------------------------
        class Exact:
            def load_into(self, text, o):
                o.copy_(kvs[text])
                return True

        reference = [reranker.score(q, docs, "reuse", Exact()).scores for q, docs in batches]
        geometry = KVGeometry.of(reranker)
        rows = []
        for name, codec in CODECS.items():
            mem = KVStore("memory://", codec, reranker.kv_identity,
                          hot_cache_gb=plan_corpus(reranker, union, codec).total_bytes * 1.2 / 2**30 + 0.1)
            for text, kv in kvs.items():
                mem.put(text, kv)
            diffs, same, top3 = [], 0, 0
            for (q, docs), ref in zip(batches, reference):
                scores = reranker.score(q, docs, "reuse", mem).scores
                diffs += [abs(a - b) for a, b in zip(scores, ref)]
                rank = sorted(range(len(docs)), key=lambda i: -scores[i])
                ref_rank = sorted(range(len(docs)), key=lambda i: -ref[i])
                same += rank == ref_rank
                top3 += set(rank[:3]) == set(ref_rank[:3])
            mem.close()
            sample = next(iter(kvs.values()))
            payload = codec.encode(sample)
            target = torch.empty_like(sample)
            t0 = time.perf_counter()
            for _ in range(20):
                codec.decode_into(payload, tuple(sample.shape), target)
            decode_ms = (time.perf_counter() - t0) / 20 * 1e3
            plan = plan_corpus(reranker, union, codec)
            rows.append({"codec": name, "spec": codec.spec, "bytes_per_token": plan.bytes_per_token,
                         "payload_bytes_per_token_256": codec.bytes_per_token(geometry.layers, geometry.kv_heads, geometry.head_dim),
                         "max_score_err": max(diffs), "mean_score_err": sum(diffs) / len(diffs),
                         "ranking_identical": f"{same}/{len(batches)}", "top3_identical": f"{top3}/{len(batches)}",
                         "decode_ms_per_doc": decode_ms, "decode_tokens": sample.shape[3]})
        out["codecs"] = rows
        print("\n| codec | format | B/token (stored) | vs fp16 | max abs score err | mean abs err | ranking = fp32 | top-3 = fp32 | decode ms/doc |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        fp16 = next(r for r in rows if r["codec"] == "fp16")["bytes_per_token"]
        for r in rows:
            print(f"| {r['codec']} | {r['spec']} | {r['bytes_per_token']:,.0f} | {fp16 / r['bytes_per_token']:.2f}x | "
                  f"{r['max_score_err']:.2g} | {r['mean_score_err']:.2g} | {r['ranking_identical']} | {r['top3_identical']} | "
                  f"{r['decode_ms_per_doc']:.2f} ({r['decode_tokens']} tok) |", flush=True)

        # -- load GB/s per backend --------------------------------------------------------------
        urls = {"fs": f"fs://{tmp / 'load'}", "memory": "memory://"}
        if lmcache_server_binary():
            servers.append(Server("lm").start())
            urls["lm"] = servers[-1].url
        if shutil.which("redis-server"):
            servers.append(Server("redis").start())
            urls["redis"] = servers[-1].url
        layout = reranker.runner.layout
        lens = {t: kvs[t].shape[3] for t in union}
        fits = [t for t in union if lens[t] <= layout.max_slots]

        def load_all(st) -> tuple[float, int]:
            t0 = time.perf_counter()
            nbytes0 = st.stats.load_bytes
            for first in range(0, len(fits), layout.max_batch):  # batches, as the reranker loads
                chunk = fits[first : first + layout.max_batch]
                assert all(st.load_many(chunk, [layout.doc_view(r, lens[t]) for r, t in enumerate(chunk)])), chunk
            return time.perf_counter() - t0, st.stats.load_bytes - nbytes0

        loads = []
        hot_gb = plan_corpus(reranker, union, get_codec("fp32")).total_bytes * 1.2 / 2**30 + 0.1
        for scheme, codec in [("fs", "fp16"), ("lm", "fp16"), ("redis", "fp16"), ("memory", "fp16"),
                              ("fs", "fp32"), ("fs", "int8"), ("fs", "int4")]:
            if scheme not in urls:
                continue
            url = urls[scheme] if scheme != "fs" else f"{urls['fs']}-{codec}"
            stored = get_codec(codec)
            writer = KVStore(url, stored, reranker.kv_identity, hot_cache_gb=hot_gb if scheme == "memory" else 0)
            t0 = time.perf_counter()
            for text in fits:
                writer.put(text, kvs[text])
            assert writer.flush(120)
            write_s = time.perf_counter() - t0
            if scheme == "memory":
                cold_s, cold_b = float("nan"), 0
                load_all(writer)  # memory:// is the CPU tier itself
                hot_s, hot_b = load_all(writer)
                writer.close()
            else:
                writer.close()
                cold = KVStore(url, stored, reranker.kv_identity, hot_cache_gb=0)
                cold_s, cold_b = load_all(cold)
                cold.close()
                hot = KVStore(url, stored, reranker.kv_identity, hot_cache_gb=hot_gb)
                load_all(hot)  # first pass promotes into the CPU tier
                hot_s, hot_b = load_all(hot)
                hot.close()
            row = {"backend": scheme, "codec": codec, "docs": len(fits), "write_s": write_s,
                   "cold_gb_per_s": cold_b / cold_s / 1e9 if cold_b else None, "cold_ms_per_doc": cold_s / len(fits) * 1e3,
                   "hot_gb_per_s": hot_b / hot_s / 1e9, "hot_ms_per_doc": hot_s / len(fits) * 1e3,
                   "bytes": hot_b}
            loads.append(row)
            print(f"  measured {scheme}/{codec}", flush=True)
        out["loads"] = loads
        print("\n| backend | codec | cold GB/s | cold ms/doc | hot GB/s | hot ms/doc | write (incl. encode) s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in loads:
            cold = f"{r['cold_gb_per_s']:.2f}" if r["cold_gb_per_s"] else "n/a"
            cold_ms = f"{r['cold_ms_per_doc']:.2f}" if r["cold_gb_per_s"] else "n/a"
            print(f"| {r['backend']} | {r['codec']} | {cold} | {cold_ms} | {r['hot_gb_per_s']:.2f} | "
                  f"{r['hot_ms_per_doc']:.2f} | {r['write_s']:.2f} |")
        print(f"\n({len(fits)} documents per pass, {sum(lens[t] for t in fits) / len(fits):.0f} tokens mean; GB/s counts "
              "stored bytes; 'cold' = fresh store without CPU tier, OS page cache warm for fs://)")
    finally:
        for server in servers:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
