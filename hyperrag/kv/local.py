"""Document KVs held in this process, as exact tensors or encoded by a codec.

A :class:`~hyperrag.rag.batch_runner.DocKVSource` without LMCache, framing or checksums, for measurements
that want exactly that: the held-out evaluation (exact KV, no codec round trip) and the bench's
codec sweep (each codec's round trip and nothing else). Serving uses :class:`KVStore`, whose
``memory://`` backend is the in-process store with the checks.
"""
from __future__ import annotations

import torch

from hyperrag.kv.codec import Codec


class LocalKV:
    def __init__(self, codec: Codec | None = None):
        self.codec = codec  # None: keep the tensors as given
        self.entries: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.entries.values())

    def put(self, text: str, kv: torch.Tensor) -> None:
        self.entries[text] = (tuple(kv.shape), kv if self.codec is None else self.codec.encode(kv))

    def load_into(self, text: str, out: torch.Tensor) -> bool:
        entry = self.entries.get(text)
        if entry is None or entry[0] != tuple(out.shape):
            return False
        shape, held = entry
        if self.codec is None:
            out.copy_(held)
        else:
            self.codec.decode_into(held, shape, out)
        return True
