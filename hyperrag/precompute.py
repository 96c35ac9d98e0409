"""Fill a KV store with every document of a corpus, ahead of queries; resumable.

    python -m hyperrag.precompute --corpus DIR --store URL --codec C [--no-verify]
    python -m hyperrag.precompute --ray [ADDRESS] [--workers W] --store redis://HOST:PORT ...

Documents already stored are skipped (the key is a content address), so a rerun after an
interruption only does what is left; by default a rerun also verifies each entry it skips.
Exit status: 0 when every document is stored, 1 otherwise (2: bad arguments).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from hyperrag.common.settings import Settings, add_cli_args, settings_from_args
from hyperrag.data.corpus import load_corpus
from hyperrag.kv.urls import redact_url
from hyperrag.rag.precompute import plan_lines, precompute, progress_bar
from hyperrag.rag.ray_precompute import precompute_ray
from hyperrag.rag.runtime import load_reranker, open_store


def run_ray(settings: Settings, texts: Sequence[str], address: str | None, workers: int | None, verify: bool) -> int:
    """``python -m hyperrag.precompute --ray``: a tqdm bar, a summary line; 0 when all is stored."""
    bar, progress = progress_bar(len(texts), "precompute (ray)")
    try:
        report = precompute_ray(settings, texts, address, workers, progress=progress, verify=verify)
    except ValueError as err:
        print("error:", err)
        return 2
    finally:
        bar.close()
    print(report.summary(settings.codec, f"{redact_url(settings.store_url)} on Ray"))
    for warning in report.warnings:
        print("warning:", warning)
    return 0 if report.complete else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperrag.precompute", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", dest="store_url", default=None, help="KV store URL (same as --store-url)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip documents already stored without reading them back")
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="fan the documents out to Ray workers (a local Ray without ADDRESS); needs a shared store")
    parser.add_argument("--workers", type=int, default=None, help="--ray: actors (default: one per cluster CPU)")
    add_cli_args(parser, skip=("store_url",))
    parser.add_argument("--store-url", dest="store_url", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    corpus = load_corpus(settings.folder("corpus"))
    if args.ray is not None:  # hyperrag.rag.ray_precompute: same entries, written by a pool of Ray actors
        return run_ray(settings, [d.text for d in corpus.docs], args.ray or None, args.workers, args.verify)
    reranker = load_reranker(settings)  # only what keys and fills the store: no index, no generator
    # Writes go through to the backend: a CPU tier (resident memory) would only hold copies.
    texts = [d.text for d in corpus.docs]
    store = open_store(settings if settings.store_url.startswith("memory://") else settings.replace(hot_cache_gb=0.0),
                       reranker, texts)
    for line in plan_lines(reranker, texts, store):
        print(line)
    bar, progress = progress_bar(len(texts), "precompute")
    try:
        report = precompute(reranker, store, texts, progress, verify=args.verify)
    finally:
        bar.close()
        store.close()
    print(report.summary(settings.codec, redact_url(store.url)))
    for warning in report.warnings:
        print("warning:", warning)
    return 0 if report.complete else 1


if __name__ == "__main__":
    sys.exit(main())
