"""A small, explicit Llama forward over a Hugging Face model's own weights (gpt-fast style).

Why not ``model(...)``: KV reuse needs control the generic API does not give cheaply: the caller
owns one preallocated :class:`~hyperrag.model.batch_kv.BatchKV` buffer, every row
has its own positions, groups of rows may put their new tokens at different columns,
attention follows an explicit mask over buffer columns, and only the requested output positions
run the last layer's queries, MLP and the final norm (the LM head is the caller's business).
The same forward serves full prefill, document encoding, KV reuse and greedy decoding, so the
modes can only differ in what they feed it.

The projections run through the kernel :mod:`hyperrag.model.kernels` measured fastest on this CPU
(oneDNN or ATen/MKL, per call size); ``F.linear`` when none is given.
Boolean masks become additive float masks once per forward, not once per layer inside SDPA.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half

from hyperrag.model import kernels
from hyperrag.model.kernels import Linear
from hyperrag.model.batch_kv import BatchKV


def causal_mask(n_new: int, start: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Mask [1, 1, n_new, start + n_new] for new tokens at column ``start`` over ``start`` fully
    valid earlier columns. Right-padded rows need nothing more: pads come after real tokens."""
    j = torch.arange(n_new, device=device)
    cols = torch.arange(start + n_new, device=device)
    return ((cols[None, :] < start) | (cols[None, :] - start <= j[:, None]))[None, None]


@dataclass(frozen=True)
class RowGroup:
    """Buffer rows ``[lo, hi)`` whose new tokens go to cache column ``start`` and attend under
    ``mask`` [hi - lo, 1, T, start + T] (None: causal from column 0, or one token over a fully
    valid prefix). The groups of a forward take the rows of its ids in turn; they may leave
    buffer rows out (a decode step skips the rows whose answers are done)."""

    lo: int
    hi: int
    start: int
    mask: torch.Tensor | None = None


class Decoder:
    """Stateless runner of a Llama-family ``*ForCausalLM`` (weights shared, never copied)."""

    def __init__(self, model: torch.nn.Module, linear: Linear | None = None, head_linear: Linear | None = None,
                 rotate: bool = False):
        cfg = model.config
        if getattr(cfg, "model_type", "") not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"Decoder supports Llama-family models, not {cfg.model_type!r}")
        self.model = model
        self.body = model.model
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.hidden_size
        self.head = model.lm_head  # weight [vocab, hidden]
        self.eps = cfg.rms_norm_eps
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.linear = linear or kernels.PATHS["aten"]
        self.head_linear = head_linear or kernels.PATHS["aten"]
        # With ``rotate``, queries and keys leave RoPE multiplied by one orthonormal Hadamard
        # matrix: q.k and so attention are unchanged, but the cached keys' outlier channels are
        # spread over all channels, which is what quantized codecs need (QuaRot).
        self.rotation = hadamard(self.head_dim).to(self.device, self.dtype) if rotate else None
        # ``probe(layer, q)`` sees every layer's queries [B, heads, T, head_dim] as attention
        # gets them (after RoPE and rotation): how the quantized codecs measure what reads the
        # cached KV (:mod:`hyperrag.rag.kv_rounding`). Set only while nothing else runs.
        self.probe: Callable[[int, torch.Tensor], None] | None = None

    def kv_shape(self, batch: int, columns: int) -> tuple[int, ...]:
        return (self.n_layers, 2, batch, self.n_kv_heads, columns, self.head_dim)

    def new_kv(self, batch: int, columns: int) -> BatchKV:
        """A zeroed batch KV of ``batch`` rows and ``columns`` token slots for this model."""
        return BatchKV(torch.zeros(self.kv_shape(batch, columns), device=self.device, dtype=self.dtype))

    def forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        kv: BatchKV,
        start: int,
        mask: torch.Tensor | None = None,
        out_index: torch.Tensor | None = None,
        after_kv: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Run ``ids`` [B, T] at positions ``pos`` [B, T]; write their K/V into ``kv`` columns
        ``[start, start+T)`` and attend over columns ``[0, start+T)``.

        ``mask`` [B, 1, T, start+T] (True = may attend) is required unless the call is causal
        from column 0 or decodes one token over a fully valid prefix. Returns the final-normed
        hidden states [B, T, H], or [B, H] at ``out_index`` [B] (one position per row).
        ``after_kv`` as in :meth:`forward_groups`.
        """
        return self.forward_groups(ids, pos, kv, [RowGroup(0, ids.shape[0], start, mask)], out_index, after_kv)

    @torch.inference_mode()
    def forward_groups(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        kv: BatchKV,
        groups: Sequence[RowGroup],
        out_index: torch.Tensor | None = None,
        after_kv: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` for a batch whose row groups put their new tokens at different
        columns (KV reuse: rows with short documents attend over fewer columns). The groups
        take the rows of ``ids`` in order; only the K/V writes and attention run per group.
        ``after_kv(layer)`` runs once each layer's new K/V are written, before attention (two
        calls over consecutive token chunks can so run at once, see :class:`LayerSync`)."""
        bsz, n_new = ids.shape
        buf = kv.tensor  # the per-layer writes and reads below index the tensor itself
        if any(a.hi > b.lo for a, b in zip(groups, groups[1:])) or sum(g.hi - g.lo for g in groups) != bsz:
            raise ValueError("row groups must be in order, apart, and as many rows as ids has")
        causal = []
        for g in groups:
            causal.append(g.mask is None and g.start == 0 and n_new > 1)
            if g.mask is None and not causal[-1] and n_new > 1:
                raise ValueError("a mask is needed for several new tokens after column 0")
        masks = [_additive(g.mask, self.dtype) for g in groups]
        spans, first = [], 0  # per group: its rows of ids, its rows of the buffer, new columns
        for g in groups:
            spans.append((slice(first, first + g.hi - g.lo), slice(g.lo, g.hi), g.start, g.start + n_new))
            first += g.hi - g.lo
        gqa = self.n_heads != self.n_kv_heads
        lin = self.linear
        x = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(x, pos)
        last = len(self.body.layers) - 1
        for i, layer in enumerate(self.body.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = self._norm(layer.input_layernorm, x)
            k = _rope(lin(h, attn.k_proj).view(bsz, n_new, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin,
                      self.rotation)
            v = lin(h, attn.v_proj).view(bsz, n_new, self.n_kv_heads, self.head_dim).transpose(1, 2)
            if i == last and out_index is not None and n_new > 1:
                # Only the output positions go on from here: every token's K/V is still written
                # (a decode step reads it), but queries, o_proj and the MLP run for one token per row.
                b = torch.arange(bsz, device=x.device)
                x, h = x[b, out_index][:, None], h[b, out_index][:, None]
                q = _rope(lin(h, attn.q_proj).view(bsz, 1, self.n_heads, self.head_dim).transpose(1, 2),
                          cos[b, out_index][:, None], sin[b, out_index][:, None], self.rotation)
                masks = [_additive(_output_mask(g, out_index[rows], n_new), self.dtype)
                         for g, (rows, *_) in zip(groups, spans)]
                causal = [False] * len(groups)
            else:
                q = _rope(lin(h, attn.q_proj).view(bsz, n_new, self.n_heads, self.head_dim).transpose(1, 2), cos, sin,
                          self.rotation)
            if self.probe is not None:
                self.probe(i, q)
            for rows, kv_rows, begin, end in spans:
                buf[i, 0, kv_rows, :, begin:end] = k[rows]
                buf[i, 1, kv_rows, :, begin:end] = v[rows]
            if after_kv is not None:
                after_kv(i)
            outs = []
            for (rows, kv_rows, _, end), mask, is_causal in zip(spans, masks, causal):
                outs.append(F.scaled_dot_product_attention(
                    q[rows], buf[i, 0, kv_rows, :, :end], buf[i, 1, kv_rows, :, :end],
                    attn_mask=mask, is_causal=is_causal, enable_gqa=gqa,
                ))
            o = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = x + lin(o.transpose(1, 2).reshape(bsz, -1, self.n_heads * self.head_dim), attn.o_proj)
            h = self._norm(layer.post_attention_layernorm, x)
            x = x + lin(mlp.act_fn(lin(h, mlp.gate_proj)) * lin(h, mlp.up_proj), mlp.down_proj)
        if out_index is not None:
            x = x[:, -1] if x.shape[1] == 1 else x[torch.arange(bsz, device=x.device), out_index]
        return self._norm(self.body.norm, x)

    def _norm(self, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm as one fused op (the module's own forward is six)."""
        return F.rms_norm(x, (x.shape[-1],), norm.weight, self.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary-wide logits, through the output head's measured kernel (:mod:`hyperrag.model.kernels`)."""
        return self.head_linear(hidden, self.head)


class LayerSync:
    """Lets a prompt's second token chunk run its forward alongside the first one's, in another
    thread: the first chunk marks each layer once its K/V are written, the second waits for
    that before attending. Why: on CPU one sequence is a chain of ops with serial parts; two
    chunks at once keep the cores busy, as the reranker's row streams do for a batch."""

    def __init__(self, n_layers: int):
        self._ready = [threading.Event() for _ in range(n_layers)]
        self._failed = False

    def written(self, layer: int) -> None:
        self._ready[layer].set()

    def wait(self, layer: int) -> None:
        self._ready[layer].wait()
        if self._failed:
            raise RuntimeError("the first chunk of the prompt failed")

    def fail(self) -> None:
        """The first chunk stopped: release the second rather than leave it waiting."""
        self._failed = True
        for event in self._ready:
            event.set()


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = may attend) as the additive float mask SDPA would build per call."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotation: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary embedding of ``x`` [B, heads, T, head_dim] with ``cos``/``sin`` [B, T, head_dim],
    then ``rotation`` [head_dim, head_dim] when given."""
    y = x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)
    return y if rotation is None else y @ rotation


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of size ``n`` (a power of two): entries
    +-1/sqrt(n), H @ H.T = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).float()


def _output_mask(g: RowGroup, out_index: torch.Tensor, n_new: int) -> torch.Tensor:
    """The mask row [rows, 1, 1, start + T] of each row's output position in group ``g``."""
    if g.mask is not None:
        mask = g.mask.expand(g.hi - g.lo, *g.mask.shape[1:])  # a mask may be shared by all rows
        return mask[torch.arange(g.hi - g.lo, device=out_index.device), :, out_index][:, :, None]
    cols = torch.arange(g.start + n_new, device=out_index.device)
    return (cols[None, :] <= g.start + out_index[:, None])[:, None, None]
