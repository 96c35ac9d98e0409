"""A reranker batch's rows run as concurrent streams of ops on CPU.

Why: on CPU a batch is a chain of ops, each split over torch's intra-op threads and each with
serial parts (Python dispatch, small elementwise ops, the threads meeting at the op's end). Two
threads that each run an interleaved half of the rows keep the cores busy through the other's
serial parts. On the 2-core CI machine that made full prefill 23% and KV reuse 15% faster
(scores within 1e-4).

How many OpenMP threads a stream gets depends on its work. A small stream (KV reuse: ~10 rows
x ~20 query tokens) runs on ``small_threads``, which the machine decides at first start
(:meth:`hyperrag.rag.rerank.Reranker.tune_streams` times a reuse-shaped batch on one thread and on
all): on the 2-core AMD EPYC one thread won, as its ops are too short for a team to pay for
meeting at every op's end, and two streams on two cores need no team at all (reuse 8-14%
faster in four of five in-process A/Bs, no gain in the fifth). A big one (full prefill, document encoding)
keeps the calling thread's count: its streams do not finish together (uneven batches), and with
one thread each a core would sit idle (full prefill 3% slower). Each stream thread has its own
OpenMP team; ``hyperrag/__init__`` shortens OpenMP's idle spin so those teams do not keep the
cores busy after a batch. Once big streams have run, libgomp manages more threads than there
are cores and throttles every team's spin, so the calling thread's own team wakes late at each
op (int4 decoding in the calling thread took ~2.3x as long after a full prefill on 2 cores):
that is why loading stored KV runs in the streams too (:meth:`hyperrag.rag.batch_runner.BatchRunner.load_rows`).
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
from typing import Callable, Sequence, TypeVar

import torch
from threadpoolctl import ThreadpoolController

MIN_ROWS_PER_STREAM = 2  # a stream of one row is too thin to pay for the hand-off
# A stream running fewer new tokens gets one OpenMP thread. Reuse streams run ~200-400, full
# prefill ~2,500; with equal-length rows one thread was never slower up to 4,000 (a safe cut).
SMALL_STREAM_TOKENS = 1024

T = TypeVar("T")


class RowStreams:
    """Runs a function over interleaved row slices of a batch, one slice per stream."""

    def __init__(self, streams: int):
        self.size = max(1, streams)
        # OpenMP threads of a small stream: one until the machine says otherwise
        # (:meth:`hyperrag.rag.rerank.Reranker.tune_streams` times one against all).
        self.small_threads = 1
        self._pool = cf.ThreadPoolExecutor(self.size, "hyperrag-rows") if self.size > 1 else None

    def slices(self, n_rows: int) -> list[slice]:
        """Interleaved slices (rows sorted by length give every stream short and long ones)."""
        k = max(1, min(self.size, n_rows // MIN_ROWS_PER_STREAM))
        return [slice(i, n_rows, k) for i in range(k)]

    def run(self, n_rows: int, fn: Callable[[slice], Sequence[T]], tokens_per_row: int) -> list[T]:
        """``fn(part)`` returns one value per row of ``part``; the values come back in row order.
        Streams of fewer than ``SMALL_STREAM_TOKENS`` new tokens (``tokens_per_row`` x their
        rows) run on ``small_threads`` OpenMP threads each, others on as many as the calling
        thread has."""
        parts = self.slices(n_rows)
        if len(parts) == 1:
            outs = [fn(parts[0])]
        else:
            small = -(-n_rows // len(parts)) * tokens_per_row < SMALL_STREAM_TOKENS
            threads = self.small_threads if small else torch.get_num_threads()
            outs = list(self._pool.map(functools.partial(_on_threads, threads, fn), parts))
        values: list = [None] * n_rows
        for part, out in zip(parts, outs):
            values[part] = list(out)
        return values


def _on_threads(threads: int, fn: Callable[[slice], Sequence[T]], part: slice) -> Sequence[T]:
    if torch.get_num_threads() != threads:  # also torch's per-thread set-up, which must come first
        _openmp().limit(limits=threads, user_api="openmp")
    return fn(part)


@functools.lru_cache(maxsize=None)
def _openmp() -> ThreadpoolController:
    """Sets OpenMP's team size for the calling thread only. Why not ``torch.set_num_threads``:
    it also changes the size every thread created later starts with, and clears oneDNN's cache."""
    return ThreadpoolController()


@functools.lru_cache(maxsize=None)
def row_streams(streams: int) -> RowStreams:
    """The process's shared streams of a given size (rerankers share their threads)."""
    return RowStreams(streams)
