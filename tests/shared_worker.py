"""A second reranker worker, in its own process, for the shared-store test.

    python -m tests.shared_worker --job JOB.json --out RESULT.json

JOB: {"stores": [URL, ...], "settings": {...Settings fields...}, "questions": [{"question": q,
"docs": [text, ...]}, ...]}. For each store: open it the way the engine does (settings ->
load_reranker -> open_store), score every question in reuse mode, and report the scores, how
many documents had to be encoded, the warnings and the store's counters.
"""
from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    job = json.loads(open(args.job, encoding="utf-8").read())

    from hyperrag.rag.runtime import load_reranker, open_store
    from hyperrag.common.settings import Settings

    results = {}
    reranker = None
    for url in job["stores"]:
        settings = Settings.from_env(**{**job["settings"], "store_url": url})
        reranker = reranker or load_reranker(settings)
        store = open_store(settings, reranker)
        runs = [reranker.score(q["question"], q["docs"], "reuse", store) for q in job["questions"]]
        results[url] = {
            "identity": reranker.kv_identity,
            "scores": [r.scores for r in runs],
            "encoded_docs": sum(r.encoded_docs for r in runs),
            "warnings": [w for r in runs for w in r.warnings] + store.take_warnings(),
            "stats": store.describe(),
        }
        store.close()
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
