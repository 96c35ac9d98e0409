"""A small, explicit decoder forward over a Hugging Face model's own weights (gpt-fast style).

Why not ``model(...)``: KV reuse needs control the generic API does not give cheaply: the caller
owns one preallocated :class:`~hyperrag.model.batch_kv.BatchKV` buffer, every row
has its own positions, groups of rows may put their new tokens at different columns,
attention follows an explicit mask over buffer columns, and only the requested output positions
run the last layer's queries, MLP and the final norm (the LM head is the caller's business).
The same forward serves full prefill, document encoding, KV reuse and greedy decoding, so the
modes can only differ in what they feed it.

The families it runs (Llama, Mistral, Qwen2, Qwen3, Gemma 3) differ only in what
:mod:`hyperrag.model.families` describes; a hook that is off costs nothing (Llama runs the ops it
always ran). The projections run through the kernel :mod:`hyperrag.model.kernels` measured
fastest on this CPU (oneDNN or ATen/MKL, per call size); ``F.linear`` when none is given.
Boolean masks become additive float masks once per forward, not once per layer inside SDPA.

Sliding-window layers (Gemma 3, Mistral) attend only to keys whose *position* is within the
window of the query's. Buffer columns are not positions (padded rows, documents shorter than
their slots, rejected draft tokens), so the decoder takes each key's position from the mask
itself: every row of the buffer holds one sequence, whose attended columns hold its tokens in
order, without gaps in position, up to the new tokens (``pos``). A key's position is then the
last new token's position less the attended columns after it. Nothing extra is stored or
passed, and nothing can go stale: KV loaded from a store, copied or computed all count alike.
The windowed masks are built once per forward, only for a window that can cut something (one
shorter than the columns attended), and only layers of that window use them.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half

from hyperrag.model import kernels
from hyperrag.model.batch_kv import BatchKV
from hyperrag.model.families import architecture
from hyperrag.model.kernels import Linear


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
    buffer rows out (a decode step skips the rows whose answers are done). The last new token's
    mask row marks every column its row's sequence holds, in position order (what the
    sliding-window layers read key positions from, see the module's docstring)."""

    lo: int
    hi: int
    start: int
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class _Norms:
    """One layer's RMSNorm weights as the decoder applies them (None: the family has no such norm)."""

    attn_in: torch.Tensor
    mlp_in: torch.Tensor
    attn_out: torch.Tensor | None = None
    mlp_out: torch.Tensor | None = None
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None


class Decoder:
    """Stateless runner of a supported ``*ForCausalLM`` (:mod:`hyperrag.model.families`; weights
    shared, never copied, but for Gemma's ``1 + w`` norm vectors, made once)."""

    def __init__(self, model: torch.nn.Module, linear: Linear | None = None, head_linear: Linear | None = None,
                 rotate: bool = False):
        arch = architecture(model.config)  # refuses any other family by name
        self.arch, self.family = arch, arch.family
        self.model = model
        self.body = model.model
        self.n_layers = arch.n_layers
        self.n_heads = arch.n_heads
        self.n_kv_heads = arch.n_kv_heads
        self.head_dim = arch.head_dim
        self.hidden_size = arch.hidden_size
        self.head = model.lm_head  # weight [vocab, hidden]
        self.eps = arch.eps
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.linear = linear or kernels.PATHS["aten"]
        self.head_linear = head_linear or kernels.PATHS["aten"]
        self.norms = [self._layer_norms(layer) for layer in self.body.layers]
        self.final_norm = self._weight(self.body.norm)
        # With ``rotate``, queries and keys leave RoPE multiplied by one orthonormal Hadamard
        # matrix: q.k and so attention are unchanged, but the cached keys' outlier channels are
        # spread over all channels, which is what quantized codecs need (QuaRot).
        self.rotation = hadamard(self.head_dim).to(self.device, self.dtype) if rotate else None
        # ``probe(layer, q)`` sees every layer's queries [B, heads, T, head_dim] as attention
        # gets them (after RoPE and rotation): how the quantized codecs measure what reads the
        # cached KV (:mod:`hyperrag.rag.kv_rounding`). Set only while nothing else runs.
        self.probe: Callable[[int, torch.Tensor], None] | None = None

    def _weight(self, norm: torch.nn.Module) -> torch.Tensor:
        """An RMSNorm's scale: the module's own weight, or ``offset + weight`` in fp32 (Gemma's
        norm multiplies in fp32 whatever the model's dtype; :meth:`_norm` follows)."""
        offset = self.family.norm_offset
        return norm.weight if not offset else (norm.weight.detach().float() + offset)

    def _layer_norms(self, layer: torch.nn.Module) -> _Norms:
        attn, w = layer.self_attn, self._weight
        qk = (w(attn.q_norm), w(attn.k_norm)) if self.family.qk_norm else (None, None)
        if self.family.sandwich_norms:
            return _Norms(w(layer.input_layernorm), w(layer.pre_feedforward_layernorm),
                          w(layer.post_attention_layernorm), w(layer.post_feedforward_layernorm), *qk)
        return _Norms(w(layer.input_layernorm), w(layer.post_attention_layernorm), None, None, *qk)

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
        from_zero, spans = _row_spans(groups, bsz, n_new)
        kind, bool_masks, masks, causal = self._attention_masks(groups, spans, from_zero, pos, n_new)
        lin, nq, nkv = self.linear, self.n_heads, self.n_kv_heads
        x = self.body.embed_tokens(ids)
        rope, rope_of = self._rope_tables(x, pos)
        last = len(self.body.layers) - 1
        for i, layer in enumerate(self.body.layers):
            attn, mlp, norms = layer.self_attn, layer.mlp, self.norms[i]
            cos, sin = rope[rope_of[i]]
            h = self._norm(x, norms.attn_in)
            k = _rope(self._heads(h, attn.k_proj, nkv, norms.k), cos, sin, self.rotation)
            v = self._heads(h, attn.v_proj, nkv)
            if i == last and out_index is not None and n_new > 1:
                # Only the output positions go on from here: every token's K/V is still written
                # (a decode step reads it), but queries, o_proj and the MLP run for one token per row.
                b = torch.arange(bsz, device=x.device)
                x, h = x[b, out_index][:, None], h[b, out_index][:, None]
                q = _rope(self._heads(h, attn.q_proj, nq, norms.q), cos[b, out_index][:, None],
                          sin[b, out_index][:, None], self.rotation)
                masks = {w: [_additive(_output_mask(replace(g, mask=m), out_index[rows], n_new), self.dtype)
                             for g, m, (rows, *_) in zip(groups, ms, spans)] for w, ms in bool_masks.items()}
                causal = {w: [False] * len(groups) for w in bool_masks}
            else:
                q = _rope(self._heads(h, attn.q_proj, nq, norms.q), cos, sin, self.rotation)
            if self.probe is not None:
                self.probe(i, q)
            for rows, kv_rows, begin, end in spans:
                buf[i, 0, kv_rows, :, begin:end] = k[rows]
                buf[i, 1, kv_rows, :, begin:end] = v[rows]
            if after_kv is not None:
                after_kv(i)
            o = self._attend(q, buf[i], spans, masks[kind[i]], causal[kind[i]])
            a = lin(o.transpose(1, 2).reshape(bsz, -1, nq * self.head_dim), attn.o_proj)
            x = x + (a if norms.attn_out is None else self._norm(a, norms.attn_out))
            h = self._norm(x, norms.mlp_in)
            m = lin(mlp.act_fn(lin(h, mlp.gate_proj)) * lin(h, mlp.up_proj), mlp.down_proj)
            x = x + (m if norms.mlp_out is None else self._norm(m, norms.mlp_out))
        if out_index is not None:
            x = x[:, -1] if x.shape[1] == 1 else x[torch.arange(bsz, device=x.device), out_index]
        return self._norm(x, self.final_norm)

    def _attention_masks(self, groups: Sequence[RowGroup], spans: list, from_zero: list[bool], pos: torch.Tensor,
                         n_new: int) -> tuple[list, dict, dict, dict]:
        """Per layer, its attention kind; per kind, the groups' boolean masks, the additive masks
        SDPA gets and whether each group is causal from column 0. Built once per forward, not per
        layer; kinds are None for full layers (the groups' own masks) and each window that can cut
        a key here (a window no shorter than the columns attended cannot)."""
        widest = max(end for *_, end in spans)
        windows = {w for w in self.arch.windows if w is not None and w < widest}
        kind = [w if w in windows else None for w in self.arch.windows]  # per layer
        bool_masks = {None: [g.mask for g in groups]}
        for w in windows:
            bool_masks[w] = [_windowed(_explicit(g, n_new, pos.device), pos[rows], w) for g, (rows, *_) in zip(groups, spans)]
        masks = {w: [_additive(m, self.dtype) for m in ms] for w, ms in bool_masks.items()}
        causal = {w: from_zero if w is None else [False] * len(groups) for w in bool_masks}
        return kind, bool_masks, masks, causal

    def _rope_tables(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[dict, Sequence]:
        """(cos, sin) per rotary kind, and each layer's kind: one table for most families; Gemma 3's
        local and global layers rotate by their own bases."""
        if self.family.rope_per_layer_type:
            return {t: self.body.rotary_emb(x, pos, t) for t in set(self.arch.layer_types)}, self.arch.layer_types
        return {None: self.body.rotary_emb(x, pos)}, [None] * self.n_layers

    def _attend(self, q: torch.Tensor, layer_kv: torch.Tensor, spans: list, masks: list, causal: list[bool]) -> torch.Tensor:
        """Attention of one layer, group by group (each over its own buffer rows and columns),
        the groups' outputs back in row order."""
        outs = []
        for (rows, kv_rows, _, end), mask, is_causal in zip(spans, masks, causal):
            outs.append(F.scaled_dot_product_attention(
                q[rows], layer_kv[0, kv_rows, :, :end], layer_kv[1, kv_rows, :, :end],
                attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_heads != self.n_kv_heads,
                scale=self.arch.attn_scale,
            ))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _heads(self, h: torch.Tensor, proj: torch.nn.Linear, n: int, norm: torch.Tensor | None = None) -> torch.Tensor:
        """``proj(h)`` as ``n`` heads [B, n, T, head_dim], each RMS-normed by ``norm`` when given (q/k norms)."""
        y = self.linear(h, proj).view(h.shape[0], h.shape[1], n, self.head_dim)
        return (y if norm is None else self._norm(y, norm)).transpose(1, 2)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm over the last axis as one fused op (the module's own forward is six); in fp32
        where the weight is (Gemma's, see :meth:`_weight`), as that module computes it."""
        if weight.dtype == x.dtype:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), weight, self.eps).to(x.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary-wide logits, through the output head's measured kernel (:mod:`hyperrag.model.kernels`),
        soft-capped where the model caps them."""
        logits = self.head_linear(hidden, self.head)
        cap = self.arch.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


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


def _row_spans(groups: Sequence[RowGroup], bsz: int, n_new: int) -> tuple[list[bool], list]:
    """Check that ``groups`` take the ``bsz`` rows of ids in order; return, per group, whether it
    is causal from column 0 (SDPA's is_causal) and its span: rows of ids, rows of the buffer,
    and the columns its new tokens go to."""
    if any(a.hi > b.lo for a, b in zip(groups, groups[1:])) or sum(g.hi - g.lo for g in groups) != bsz:
        raise ValueError("row groups must be in order, apart, and as many rows as ids has")
    from_zero = []  # per group: causal from column 0 (SDPA's is_causal)
    for g in groups:
        from_zero.append(g.mask is None and g.start == 0 and n_new > 1)
        if g.mask is None and not from_zero[-1] and n_new > 1:
            raise ValueError("a mask is needed for several new tokens after column 0")
    spans, first = [], 0  # per group: its rows of ids, its rows of the buffer, new columns
    for g in groups:
        spans.append((slice(first, first + g.hi - g.lo), slice(g.lo, g.hi), g.start, g.start + n_new))
        first += g.hi - g.lo
    return from_zero, spans


def _explicit(g: RowGroup, n_new: int, device: torch.device) -> torch.Tensor:
    """The group's mask, made explicit where it is implied (None: causal from column 0, or one
    token over fully valid columns)."""
    if g.mask is not None:
        return g.mask
    if n_new > 1:
        return causal_mask(n_new, g.start, device)
    return torch.ones(1, 1, 1, g.start + 1, dtype=torch.bool, device=device)


def _windowed(mask: torch.Tensor, pos: torch.Tensor, window: int) -> torch.Tensor:
    """``mask`` [rows or 1, 1, T, C] cut to keys whose position is within ``window`` of the
    query's (``pos`` [rows, T]): query position - key position < window, as Hugging Face's
    sliding-window masks. Key positions come from the mask (see the module's docstring): the
    last new token's row marks the row's columns in position order, the last at ``pos[:, -1]``."""
    held = mask[:, 0, -1]  # [rows or 1, C]
    after = held.flip(-1).cumsum(-1).flip(-1)  # held columns at or after each column
    key_pos = pos[:, -1:] - after + 1  # [rows, C]; meaningless where not held (masked anyway)
    return mask & ((pos[:, :, None] - key_pos[:, None, :]) < window)[:, None]


def _output_mask(g: RowGroup, out_index: torch.Tensor, n_new: int) -> torch.Tensor:
    """The mask row [rows, 1, 1, start + T] of each row's output position in group ``g``."""
    if g.mask is not None:
        mask = g.mask.expand(g.hi - g.lo, *g.mask.shape[1:])  # a mask may be shared by all rows
        return mask[torch.arange(g.hi - g.lo, device=out_index.device), :, out_index][:, :, None]
    cols = torch.arange(g.start + n_new, device=out_index.device)
    return (cols[None, :] <= g.start + out_index[:, None])[:, None, None]
