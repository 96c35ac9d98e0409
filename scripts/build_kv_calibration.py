"""Rebuild the KV calibration set (hyperrag/shipped/kv-calibration) from SQuAD v1.1 train.

    ./run.sh python scripts/build_kv_calibration.py [--out FOLDER]

Eight train articles that the shipped adapter neither trained nor validated on (its
``hyperrag.json`` lists both), the first five paragraphs of each and four of their questions:
the quantized codecs' Hessian-aware rounding weighs KV errors by the queries these questions
send (:mod:`hyperrag.rag.kv_rounding`). Never dev questions: those are what quality is measured on.
"""
from __future__ import annotations

import argparse
import json
import random

from hyperrag.common.settings import SHIPPED, SHIPPED_ADAPTER, Settings
from hyperrag.data.squad import articles_to_corpus, load_squad, write_corpus

ARTICLES, PARAGRAPHS, QUESTIONS = 8, 5, 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(SHIPPED / "kv-calibration"))
    args = parser.parse_args()
    meta = json.loads((SHIPPED_ADAPTER / "hyperrag.json").read_text())
    used = set(meta["train_articles"]) | set(meta["val_articles"])
    articles = [a for a in load_squad("train", Settings.from_env().cache_dir) if a["title"] not in used]
    rng = random.Random(0)
    chosen = sorted(rng.sample(articles, ARTICLES), key=lambda a: a["title"])
    docs, queries = [], []
    for article in chosen:
        a_docs, a_queries = articles_to_corpus([{**article, "paragraphs": article["paragraphs"][:PARAGRAPHS]}])
        docs += a_docs
        queries += rng.sample(a_queries, QUESTIONS)
    write_corpus(args.out, docs, queries)
    print(f"wrote {len(docs)} paragraphs and {len(queries)} questions of {', '.join(a['title'] for a in chosen)} to {args.out}")


if __name__ == "__main__":
    main()
