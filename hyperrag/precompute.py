"""Fill a KV store with every document of a corpus, ahead of queries; resumable.

    python -m hyperrag.precompute --corpus DIR --store URL --codec C

Documents already in the store are skipped (the key is a content address), so a rerun after
an interruption only does what is left; entries are written whole or detected as bad on load.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from hyperrag.kv.store import KVStore, StoreUnavailable
from hyperrag.rerank import Reranker, length_batches

Progress = Callable[[int, int], None]


@dataclass
class PrecomputeReport:
    docs: int = 0  # documents in the corpus
    encoded: int = 0  # encoded and stored by this run
    skipped: int = 0  # already in the store
    tokens: int = 0  # document tokens encoded by this run
    bytes: int = 0  # bytes written by this run
    seconds: float = 0.0
    failed: int = 0  # encoded but not stored (store down); they will be computed at query time
    warnings: list[str] = field(default_factory=list)

    @property
    def docs_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "docs_per_s": self.docs_per_s}


def precompute(reranker: Reranker, store: KVStore, texts: Sequence[str], progress: Progress | None = None,
               batch_size: int | None = None) -> PrecomputeReport:
    """Encode and store the KV of every text the store does not hold yet."""
    unique = list(dict.fromkeys(texts))
    report = PrecomputeReport(docs=len(unique))
    t0 = time.perf_counter()
    try:
        todo = [t for t in unique if not store.contains(t)]
    except StoreUnavailable as err:
        report.warnings.append(str(err))
        todo = unique
    report.skipped = len(unique) - len(todo)
    if progress:
        progress(report.skipped, len(unique))
    # Length-sorted batches keep padding low while encoding.
    batches = length_batches([reranker.doc_tokens(t) for t in todo], batch_size or reranker.batch_size)
    for batch in batches:
        texts_batch = [todo[i] for i in batch]
        for text, kv in zip(texts_batch, reranker.encode_docs(texts_batch)):
            try:
                report.bytes += store.put(text, kv)
                report.encoded += 1
                report.tokens += kv.shape[3]
            except StoreUnavailable as err:
                report.failed += 1
                if str(err) not in report.warnings:
                    report.warnings.append(str(err))
        if progress:
            progress(report.skipped + report.encoded + report.failed, len(unique))
    try:
        if not store.flush():
            report.warnings.append("some writes were still in flight when precompute ended")
    except StoreUnavailable as err:
        report.warnings.append(str(err))
    report.seconds = time.perf_counter() - t0
    return report


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    from hyperrag.pipeline import Engine
    from hyperrag.settings import add_cli_args, settings_from_args

    parser = argparse.ArgumentParser(prog="python -m hyperrag.precompute", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", dest="store_url", default=None, help="KV store URL (see --store-url)")
    add_cli_args(parser, skip=("store_url",))
    settings = settings_from_args(parser.parse_args(argv))
    engine = Engine.load(settings, with_generator=False)
    bar = tqdm(total=len(engine.corpus.docs), desc="precompute", unit="doc")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    report = engine.precompute(progress)
    bar.close()
    per_token = report.bytes / report.tokens if report.tokens else 0
    print(f"{report.docs} docs: {report.encoded} encoded, {report.skipped} already stored, {report.failed} failed; "
          f"{report.tokens} tokens, {report.bytes / 2**20:.1f} MiB ({per_token:.0f} B/token, {settings.codec}); "
          f"{report.docs_per_s:.2f} docs/s into {settings.store_url}")
    for warning in report.warnings:
        print("warning:", warning)
    engine.close()


if __name__ == "__main__":
    main()
