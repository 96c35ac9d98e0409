"""Static attention layout: one preallocated, fixed-shape batch buffer for KV reuse.

Columns of each row of the buffer (a :class:`~hyperrag.model.batch_kv.BatchKV` of ``P + S_max + T_max`` columns)::

    [ prefix (P, shared, written once) | document slots (S) | query (T) ]

Each candidate's stored document KV is copied straight into its row's slots; a row shorter than
its slots leaves masked padding. Rows hold documents in ascending length and may form two
groups; a group's query tokens run at column ``P + S_g`` (``S_g``: its longest document rounded
up to the bucket) with per-row positions ``P + len_i + j``, so scores equal a full prefill of
``[prefix][doc][query]`` for every row. Nothing is concatenated or reallocated per query; a
batch of one shape bucket always has the same tensor shapes.
"""
from __future__ import annotations

from typing import Sequence

import torch

from hyperrag.model.decoder import Decoder, RowGroup
from hyperrag.model.batch_kv import BatchKV

SPLIT_GAIN = 0.15  # least fraction of attended columns a second row group must save


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class StaticLayout:
    def __init__(self, decoder: Decoder, prefix_kv: torch.Tensor, max_batch: int, max_doc_len: int,
                 max_query_len: int, bucket: int = 16):
        self.prefix_len = prefix_kv.shape[3]
        self.bucket = bucket
        self.max_batch = max_batch
        self.max_slots = round_up(max_doc_len, bucket)
        self.max_query_len = max_query_len
        self.kv = decoder.new_kv(max_batch, self.prefix_len + self.max_slots + max_query_len)
        self.kv.fill_prefix(prefix_kv)

    def slots_for(self, doc_lens: Sequence[int]) -> int:
        """The bucketed number of document slots for rows holding documents of ``doc_lens`` tokens."""
        longest = max(doc_lens)
        if longest > self.max_slots:
            raise ValueError(f"document of {longest} tokens exceeds the layout's {self.max_slots} slots")
        return round_up(longest, self.bucket)

    def doc_view(self, row: int, n_tokens: int) -> torch.Tensor:
        """Where a document's KV ``[layers, 2, kv_heads, n, head_dim]`` goes for batch row ``row``."""
        return self.kv.row_view(row, self.prefix_len, n_tokens)

    def positions(self, doc_lens: Sequence[int], n_query: int) -> torch.Tensor:
        """Query token positions [B, T]: right after each row's own document."""
        lens = torch.tensor(list(doc_lens), device=self.kv.device)
        return self.prefix_len + lens[:, None] + torch.arange(n_query, device=self.kv.device)[None, :]

    def query_mask(self, doc_lens: Sequence[int], slots: int, n_query: int) -> torch.Tensor:
        """The attention mask [B, 1, T, P + S + T] of a query run at column ``P + slots``: the
        prefix, each row's real document slots, and the query causally."""
        device = self.kv.device
        p = self.prefix_len
        lens = torch.tensor(list(doc_lens), device=device)
        j = torch.arange(n_query, device=device)
        cols = torch.arange(p + slots + n_query, device=device)
        doc_ok = cols[None, :] < p + lens[:, None]  # prefix + real doc slots
        in_query = cols >= p + slots
        causal = (cols[None, :] - (p + slots)) <= j[:, None]  # [T, cols]
        mask = (doc_ok[:, None, :] & ~in_query) | (in_query & causal)[None]
        return mask.unsqueeze(1)

    def step_mask(self, doc_lens: Sequence[int], slots: int, query_lens: Sequence[int], width: int,
                  written: torch.Tensor, new: int = 1) -> torch.Tensor:
        """The mask [B, 1, new, P + slots + width + A + new] of a decode step whose ``new`` tokens
        go to query columns ``width + A`` on: the prefix, each row's real document slots, its own
        query tokens (a row's query may be shorter than the ``width`` columns its batch gives
        queries: rows of other questions), the answer columns ``written`` [B, A] marks (a draft
        the model rejected leaves columns that are never attended) and the step's own tokens,
        causally."""
        device = self.kv.device
        p = self.prefix_len
        lens = torch.tensor(list(doc_lens), device=device)[:, None]
        queries = torch.tensor(list(query_lens), device=device)[:, None]
        cols = torch.arange(p + slots + width, device=device)[None, :]
        rel = cols - (p + slots)  # column within the query area
        head = (cols < p + lens) | ((rel >= 0) & (rel < queries))
        rows = len(doc_lens)
        own = torch.ones(new, new, dtype=torch.bool, device=device).tril()
        return torch.cat([head[:, None, :].expand(rows, new, -1), written[:, None, :].expand(rows, new, -1),
                          own.expand(rows, new, new)], -1)[:, None]

    def row_splits(self, doc_lens: Sequence[int], n_query: int) -> list[tuple[int, int, int]]:
        """Rows whose documents have ``doc_lens`` tokens, in ascending order, as ``(lo, hi,
        slots)`` runs that each run their ``n_query`` query columns right after their own longest
        document (``slots`` columns), so short documents are not attended with the longest one's
        padding. The rows are cut in two where that shrinks the attended (row, column) area by
        ``SPLIT_GAIN``. (Measured on 2 cores: two groups take most of the gain; more cost calls.)"""
        lens = list(doc_lens)
        if lens != sorted(lens):
            raise ValueError("rows must be in ascending order of document length")
        n, width = len(lens), self.prefix_len + n_query

        def area(lo: int, hi: int) -> int:
            return (hi - lo) * (width + self.slots_for(lens[lo:hi]))

        cuts = [0, n]
        if n > 1:
            cut = min(range(1, n), key=lambda c: area(0, c) + area(c, n))
            if area(0, cut) + area(cut, n) <= (1 - SPLIT_GAIN) * area(0, n):
                cuts = [0, cut, n]
        return [(lo, hi, self.slots_for(lens[lo:hi])) for lo, hi in zip(cuts, cuts[1:])]

    def query_groups(self, doc_lens: Sequence[int], n_query: int) -> tuple[torch.Tensor, list[RowGroup]]:
        """Positions and row groups (:meth:`row_splits`, with their query masks) for a query of
        ``n_query`` tokens run over rows whose documents have ``doc_lens`` tokens."""
        groups = [RowGroup(lo, hi, self.prefix_len + slots, self.query_mask(doc_lens[lo:hi], slots, n_query))
                  for lo, hi, slots in self.row_splits(doc_lens, n_query)]
        return self.positions(doc_lens, n_query), groups


def concat_layout(prefix_kv: torch.Tensor, doc_kvs: list[torch.Tensor], n_query: int) -> tuple[BatchKV, list[int]]:
    """The dynamic alternative: pad and concatenate per-document caches for every query.

    Kept only so the bench can measure what the static layout saves; returns a buffer with the
    same column layout as :class:`StaticLayout` (slots = longest document, no bucketing).
    """
    lens = [kv.shape[3] for kv in doc_kvs]
    slots = max(lens)
    rows = []
    for kv in doc_kvs:
        pad = kv.new_zeros(*kv.shape[:3], slots - kv.shape[3] + n_query, kv.shape[4])
        rows.append(torch.cat([prefix_kv, kv, pad], dim=3))
    return BatchKV(torch.stack(rows, dim=2)), lens
