"""The batch KV buffer: the one tensor a forward writes its new K/V into and attends over.

Layout ``[layers, 2 (K, V), batch rows, kv_heads, columns, head_dim]``, one row per sequence,
one column per token slot (:mod:`hyperrag.model.layout` says how KV reuse fills the columns). The
type names the few ways callers cut it (a run of rows, one row's columns, a shared prefix in
every row) instead of hand-written 6-D slices, in the manner of gpt-fast's ``KVCache``. Every
cut is a view, never a copy; the decoder reads ``tensor`` once per forward, so its per-layer
loop stays plain tensor indexing.
"""
from __future__ import annotations

from typing import Sequence

import torch


class BatchKV:
    """A batch KV buffer; make one with :meth:`hyperrag.model.decoder.Decoder.new_kv`."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        if tensor.dim() != 6 or tensor.shape[1] != 2:
            raise ValueError(f"a batch KV is [layers, 2, batch, kv_heads, columns, head_dim], not {tuple(tensor.shape)}")
        self.tensor = tensor

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def rows(self, rows: slice) -> BatchKV:
        """Rows ``rows`` as a batch of their own (a row stream runs its part of a batch on it)."""
        return BatchKV(self.tensor[:, :, rows])

    def row_view(self, row: int, start: int, n: int) -> torch.Tensor:
        """Columns ``[start, start + n)`` of one row, ``[layers, 2, kv_heads, n, head_dim]``: the
        shape of a stored document KV, so one is loaded, copied or cloned straight through it."""
        return self.tensor[:, :, row, :, start : start + n]

    def fill_prefix(self, prefix_kv: torch.Tensor, rows: slice = slice(None)) -> None:
        """Copy a shared prefix's KV ``[layers, 2, kv_heads, P, head_dim]`` into columns
        ``[0, P)`` of ``rows`` (default: all): what follows in those rows then runs on it."""
        self.tensor[:, :, rows, :, : prefix_kv.shape[3]] = prefix_kv.unsqueeze(2)


def row_runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending row numbers as maximal runs ``[lo, hi)`` of adjacent rows: the row slices a
    batch operation on some rows (the ones a store lacked, the ones still decoding) runs on."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs
