"""Rebuild the shipped corpus (hyperrag/shipped/squad-dev-mini) from SQuAD v1.1 dev (whole articles, all their questions),
or build another corpus of whole SQuAD articles, e.g. the adapter's held-out train articles.

    python scripts/build_squad_mini.py [--out FOLDER]     # default corpora/squad-dev-mini: the link to the shipped folder
    python scripts/build_squad_mini.py --split train --articles "Frédéric_Chopin,Madrasa,Canadian_football"
                                                          # -> corpora/squad-train-frederic-chopin-madrasa-canadian-football
"""
from __future__ import annotations

import argparse
from hyperrag.common.settings import Settings, corpus_out
from hyperrag.data.squad import articles_to_corpus, load_squad, write_corpus

# Nine whole articles of varied topics: 309 paragraphs, 1,607 questions.
ARTICLES = (
    "Normans", "Steam_engine", "Oxygen", "Amazon_rainforest", "Black_Death",
    "Geology", "Prime_number", "Rhine", "Ctenophora",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="corpus folder (default: corpora/squad-dev-mini, the link to the "
                        "shipped corpus, for the default articles; corpora/squad-<split>-<articles> otherwise)")
    parser.add_argument("--split", choices=("dev", "train"), default="dev", help="SQuAD v1.1 split")
    parser.add_argument("--articles", default=",".join(ARTICLES), help="comma-separated article titles")
    args = parser.parse_args()
    wanted = args.articles.split(",")
    shipped = args.split == "dev" and tuple(wanted) == ARTICLES
    args.out = args.out or corpus_out("squad-dev-mini" if shipped else f"squad-{args.split}-{'-'.join(wanted)}")
    articles = [a for a in load_squad(args.split, Settings.from_env().cache_dir) if a["title"] in wanted]
    missing = set(wanted) - {a["title"] for a in articles}
    if missing:
        raise SystemExit(f"SQuAD {args.split} has no article titled {', '.join(sorted(missing))}")
    docs, queries = articles_to_corpus(articles)
    write_corpus(args.out, docs, queries)
    print(f"wrote {len(docs)} documents and {len(queries)} questions to {args.out}")


if __name__ == "__main__":
    main()
