"""Split KV-reuse rerank time into a part per question token and a fixed part, for the README.

    ./run.sh python scripts/reuse_fixed_cost.py [--repeats 5] [--json out.json]

Why: the token-ratio limit assumes rerank cost proportional to the tokens run; reuse also pays
per question for reading the candidates' caches and for every op of the forward, however few
tokens it runs. The same 20 candidates (the retriever's top-20 for a shipped question, their KV
in an in-memory store, fp16 as by default) are reranked with questions of several lengths,
interleaved; a least-squares line through the medians gives ms per token and the fixed part.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hyperrag.rag.pipeline import Engine  # noqa: E402
from hyperrag.common.settings import Settings  # noqa: E402

WORDS = ("what is the name of the city where the river meets the sea and who built the first bridge "
         "there in the old days of the empire").split()


def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Slope and intercept of the least-squares line through (xs, ys)."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    settings = Settings.from_env(store_url="memory://")
    engine = Engine.load(settings, with_generator=False)
    reranker, corpus = engine.reranker, engine.corpus
    question = corpus.queries[0].question
    docs = [corpus.by_id[doc_id].text for doc_id, _ in engine.retrieve(question, 20)]
    reranker.score(question, docs, "reuse", engine.store)  # encodes and stores the 20 caches
    questions = [" ".join(WORDS[:n]) for n in (1, 6, 14, 20, 26)]
    times: dict[int, list[float]] = {}
    loads: list[float] = []
    for rep in range(args.repeats):
        for q in questions if rep % 2 else questions[::-1]:
            t0 = time.perf_counter()
            result = reranker.score(q, docs, "reuse", engine.store)
            times.setdefault(result.query_tokens, []).append((time.perf_counter() - t0) * 1e3)
            loads.append(result.load_s * 1e3)
    tokens = sorted(times)
    medians = [statistics.median(times[t]) for t in tokens]
    slope, fixed = line_fit([float(t) for t in tokens], medians)
    report = {"candidates": len(docs), "codec": settings.codec, "cpu_streams": settings.cpu_streams,
              "ms_by_query_tokens": dict(zip(tokens, medians)), "ms_per_token": slope, "fixed_ms": fixed,
              "kv_load_ms": statistics.median(loads)}
    for t, ms in zip(tokens, medians):
        print(f"  {t:3d} question+suffix tokens: {ms:7.1f} ms")
    print(f"  per token {slope:.1f} ms, fixed {fixed:.0f} ms (of which reading the caches "
          f"{report['kv_load_ms']:.0f} ms); fixed share at 20 tokens: {fixed / (fixed + 20 * slope):.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
