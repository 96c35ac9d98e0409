"""Static attention layout: one preallocated, fixed-shape batch buffer for KV reuse.

Columns of the buffer ``[layers, 2, batch, kv_heads, P + S_max + T_max, head_dim]``::

    [ prefix (P, shared, written once) | document slots (S = length bucket) | query (T) ]

Each candidate's stored document KV is copied straight into its row's slots; a row shorter than
the bucket leaves masked padding. Query tokens run at column ``P + S`` with per-row positions
``P + len_i + j``, so scores equal a full prefill of ``[prefix][doc][query]`` for every row.
Nothing is concatenated or reallocated per query; a batch of one shape bucket always has the
same tensor shapes.
"""
from __future__ import annotations

import torch

from hyperrag.decoder import Decoder


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class StaticLayout:
    def __init__(self, decoder: Decoder, prefix_kv: torch.Tensor, max_batch: int, max_doc_len: int,
                 max_query_len: int, bucket: int = 64):
        self.prefix_len = prefix_kv.shape[3]
        self.bucket = bucket
        self.max_batch = max_batch
        self.max_slots = round_up(max_doc_len, bucket)
        self.max_query_len = max_query_len
        self.kv = decoder.new_kv(max_batch, self.prefix_len + self.max_slots + max_query_len)
        self.kv[:, :, :, :, : self.prefix_len] = prefix_kv.unsqueeze(2)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def slots_for(self, doc_lens: list[int]) -> int:
        """The bucketed number of document slots for a batch."""
        longest = max(doc_lens)
        if longest > self.max_slots:
            raise ValueError(f"document of {longest} tokens exceeds the layout's {self.max_slots} slots")
        return round_up(longest, self.bucket)

    def doc_view(self, row: int, n_tokens: int) -> torch.Tensor:
        """Where a document's KV ``[layers, 2, kv_heads, n, head_dim]`` goes for batch row ``row``."""
        p = self.prefix_len
        return self.kv[:, :, row, :, p : p + n_tokens]

    def query_inputs(self, doc_lens: list[int], slots: int, n_query: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row positions [B, T] and the attention mask [B, 1, T, P + S + T] for the query run."""
        device = self.kv.device
        p = self.prefix_len
        lens = torch.tensor(doc_lens, device=device)
        j = torch.arange(n_query, device=device)
        pos = p + lens[:, None] + j[None, :]
        cols = torch.arange(p + slots + n_query, device=device)
        doc_ok = (cols[None, :] < p + lens[:, None]) | (cols[None, :] < p)  # prefix + real doc slots
        in_query = cols >= p + slots
        causal = (cols[None, :] - (p + slots)) <= j[:, None]  # [T, cols]
        mask = (doc_ok[:, None, :] & ~in_query) | (in_query & causal)[None]
        return pos, mask.unsqueeze(1)


def concat_layout(prefix_kv: torch.Tensor, doc_kvs: list[torch.Tensor], n_query: int) -> tuple[torch.Tensor, list[int]]:
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
    return torch.stack(rows, dim=2), lens
