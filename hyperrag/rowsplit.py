"""A reranker batch's rows run as concurrent streams of ops on CPU.

Why: on CPU a batch is a chain of ops, each split over torch's intra-op threads and each with
serial parts (Python dispatch, small elementwise ops, the threads meeting at the op's end). Two
threads that each run an interleaved half of the rows keep the cores busy through the other's
serial parts. On the 2-core CI machine that made full prefill 23% and KV reuse 15% faster
(scores within 1e-4). Giving each stream a single OpenMP thread instead was slower (+3% full,
-4.5% reuse): the two halves do not finish together and a core sits idle. Each stream thread
gets its own OpenMP team; ``hyperrag/__init__`` shortens OpenMP's idle spin so those teams do
not keep the cores busy after a batch.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
from typing import Callable, Sequence, TypeVar

MIN_ROWS_PER_STREAM = 2  # a stream of one row is too thin to pay for the hand-off

T = TypeVar("T")


class RowStreams:
    """Runs a function over interleaved row slices of a batch, one slice per stream."""

    def __init__(self, streams: int):
        self.size = max(1, streams)
        self._pool = cf.ThreadPoolExecutor(self.size, "hyperrag-rows") if self.size > 1 else None

    def slices(self, n_rows: int) -> list[slice]:
        """Interleaved slices (rows sorted by length give every stream short and long ones)."""
        k = max(1, min(self.size, n_rows // MIN_ROWS_PER_STREAM))
        return [slice(i, n_rows, k) for i in range(k)]

    def run(self, n_rows: int, fn: Callable[[slice], Sequence[T]]) -> list[T]:
        """``fn(part)`` returns one value per row of ``part``; the values come back in row order."""
        parts = self.slices(n_rows)
        outs = [fn(parts[0])] if len(parts) == 1 else list(self._pool.map(fn, parts))
        values: list = [None] * n_rows
        for part, out in zip(parts, outs):
            values[part] = list(out)
        return values


@functools.lru_cache(maxsize=None)
def row_streams(streams: int) -> RowStreams:
    """The process's shared streams of a given size (rerankers share their threads)."""
    return RowStreams(streams)
