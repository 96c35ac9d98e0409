"""A model's document KV shape: what the store's entries and the batch buffer are sized by, known
for a packaged model without loading it (:data:`hyperrag.model.loading.MODELS`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVGeometry:
    """What a document KV ``[layers, 2, kv_heads, tokens, head_dim]`` looks like for a model."""

    layers: int
    kv_heads: int
    head_dim: int

    def shape(self, tokens: int) -> tuple[int, int, int, int, int]:
        return (self.layers, 2, self.kv_heads, tokens, self.head_dim)

    @classmethod
    def of(cls, reranker) -> "KVGeometry":
        """The geometry of a loaded :class:`~hyperrag.rag.rerank.Reranker` (or Decoder)."""
        dec = getattr(reranker, "decoder", reranker)
        return cls(dec.n_layers, dec.n_kv_heads, dec.head_dim)

    @classmethod
    def from_config(cls, config) -> "KVGeometry":
        """The geometry a Hugging Face model config gives (no weights loaded)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.num_key_value_heads, head_dim)
