"""Rebuild the shipped corpus (hyperrag/shipped/squad-dev-mini) from SQuAD v1.1 dev (whole articles, all their questions).

    python scripts/build_squad_mini.py [--out FOLDER]
"""
from __future__ import annotations

import argparse
from hyperrag.settings import SHIPPED_CORPUS, Settings
from hyperrag.squad import articles_to_corpus, load_squad, write_corpus

# Nine whole articles of varied topics: 309 paragraphs, 1,607 questions.
ARTICLES = (
    "Normans", "Steam_engine", "Oxygen", "Amazon_rainforest", "Black_Death",
    "Geology", "Prime_number", "Rhine", "Ctenophora",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(SHIPPED_CORPUS))
    args = parser.parse_args()
    articles = [a for a in load_squad("dev", Settings.from_env().cache_dir) if a["title"] in ARTICLES]
    assert len(articles) == len(ARTICLES), "SQuAD dev no longer has the expected articles"
    docs, queries = articles_to_corpus(articles)
    write_corpus(args.out, docs, queries)
    print(f"wrote {len(docs)} documents and {len(queries)} questions to {args.out}")


if __name__ == "__main__":
    main()
