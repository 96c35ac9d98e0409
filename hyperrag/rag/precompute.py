"""Fill a KV store with every document of a corpus, ahead of queries; resumable (the command line
is :mod:`hyperrag.precompute`).

Documents already stored are skipped (the key is a content address), so a rerun after an
interruption only does what is left. Entries appear whole or not at all (``fs://`` writes a
temporary file and renames it; ``lm://`` and ``redis://`` store one value per request) and
every load checks the frame and CRC32C anyway; by default a rerun also verifies each entry it
skips (read + checksum, no decode: about 1 GB/s), so a damaged one is rewritten now rather than
recomputed at query time. Exit status: 0 when every document is stored, 1 otherwise.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from hyperrag.common.memory import return_freed_memory
from hyperrag.kv.store import KVStore, StoreUnavailable
from hyperrag.rag.batch_runner import length_batches
from hyperrag.rag.rerank import Reranker

Progress = Callable[[int, int], None]


@dataclass
class PrecomputeReport:
    docs: int = 0  # distinct documents in the corpus
    encoded: int = 0  # encoded and stored by this run
    skipped: int = 0  # already in the store (and valid, when verified)
    replaced: int = 0  # stored entries found damaged or unreadable, encoded again
    tokens: int = 0  # document tokens encoded by this run
    bytes: int = 0  # bytes written by this run
    seconds: float = 0.0
    encode_seconds: float = 0.0  # model time alone
    failed: int = 0  # encoded but not in the store at the end (store down); computed at query time
    verified: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def docs_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds else 0.0

    @property
    def complete(self) -> bool:
        return self.failed == 0 and self.skipped + self.encoded == self.docs

    def to_dict(self) -> dict:
        return {**asdict(self), "docs_per_s": self.docs_per_s, "complete": self.complete}

    def summary(self, codec: str, where: str) -> str:
        """The one line a command prints at the end of a run."""
        per_token = self.bytes / self.tokens if self.tokens else 0
        return (f"{self.docs} docs: {self.encoded} encoded, {self.skipped} already stored"
                f"{' (verified)' if self.verified else ''}, {self.replaced} damaged entries replaced, "
                f"{self.failed} not stored; {self.tokens} tokens, {self.bytes / 2**20:.1f} MiB "
                f"({per_token:.0f} B/token, {codec}); {self.docs_per_s:.2f} docs/s into {where}")


def progress_bar(total: int, desc: str, **opts):
    """A tqdm bar (``opts`` go to tqdm) and the ``progress(done, total)`` callback that moves it."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="doc", **opts)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return bar, progress


def precompute(reranker: Reranker, store: KVStore, texts: Sequence[str], progress: Progress | None = None,
               batch_size: int | None = None, verify: bool = True) -> PrecomputeReport:
    """Encode and store the KV of every text the store does not hold yet (or holds damaged).

    ``progress(done, total)`` is called after the scan and after every batch. If the store is
    down, entries wait in its retry queue; if that fills up, the run stops early (rerun it when
    the store is back: it resumes)."""
    unique = list(dict.fromkeys(texts))
    report = PrecomputeReport(docs=len(unique), verified=verify)
    t0 = time.perf_counter()
    corrupt0, dropped0 = store.stats.corrupt, store.stats.dropped
    todo = []
    for text in unique:
        try:
            present = store.check(text) if verify else store.contains(text, durable=True)
        except StoreUnavailable as err:
            present = False
            if str(err) not in report.warnings:
                report.warnings.append(str(err))
        if not present:
            todo.append(text)
    report.skipped = len(unique) - len(todo)
    report.replaced = store.stats.corrupt - corrupt0
    if progress:
        progress(report.skipped, len(unique))
    # Length-sorted batches keep padding low while encoding.
    batches = length_batches([reranker.doc_tokens(t) for t in todo], batch_size or reranker.batch_size)
    for batch in batches:
        if store.stats.dropped > dropped0:
            report.warnings.append("the store is unavailable and its retry queue is full: stopped early; "
                                   "run precompute again when the store is back (it resumes)")
            break
        texts_batch = [todo[i] for i in batch]
        t1 = time.perf_counter()
        kvs = reranker.encode_docs(texts_batch)
        report.encode_seconds += time.perf_counter() - t1
        for text, kv in zip(texts_batch, kvs):
            report.bytes += store.put(text, kv)
            report.encoded += 1
            report.tokens += kv.shape[3]
        del kvs
        return_freed_memory()  # the batch's KVs: ~0.9 GB kept over the shipped corpus without it
        if progress:
            progress(report.skipped + report.encoded, len(unique))
    if not store.flush(timeout_s=max(60.0, 4 * store.timeout_s)):
        report.warnings.append(f"{store.pending} entries were not written when precompute ended "
                               "(store unavailable); they are computed at query time")
    report.failed = store.pending + (store.stats.dropped - dropped0) + (len(todo) - report.encoded)
    report.warnings += [w for w in store.take_warnings() if w not in report.warnings]
    report.seconds = time.perf_counter() - t0
    return report


def plan_lines(reranker: Reranker, texts: Sequence[str], store: KVStore) -> list[str]:
    """What the run will cost, said before it starts: bytes and time (:mod:`hyperrag.kv.planner`),
    and a warning when an ``fs://`` store's disk has less room than that (what is already stored
    is skipped, so a resumed run needs less)."""
    import shutil

    from hyperrag.kv.planner import format_bytes, format_duration, plan_corpus

    plan = plan_corpus(reranker, texts, store.codec)
    lines = [f"plan: {plan.human()}; about {format_duration(plan.precompute_s)} on one 2-core worker like the measured "
             "one (python -m hyperrag.kv.planner for more workers)"]
    if store.folder is not None:
        free = shutil.disk_usage(store.folder).free
        if free < plan.total_bytes:
            lines.append(f"warning: the store's disk has {format_bytes(free)} free, less than the "
                         f"{format_bytes(plan.total_bytes)} the corpus needs in {plan.codec} (entries already "
                         "stored are skipped): documents that do not fit are computed at query time")
    return lines
