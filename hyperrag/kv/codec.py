"""KV codecs: how one document's KV ``[layers, 2, kv_heads, tokens, head_dim]`` becomes bytes.

Every codec encodes to one flat ``uint8`` tensor and decodes straight into a destination view
of the compute dtype (a row of the static batch buffer), so loading needs no extra copy. On
CPU the quantized codecs decode in one pass with a compiled kernel (:mod:`hyperrag.kv.dequant`);
elsewhere they unpack their codes once into a reused float scratch and dequantize keys with one
fused ``addcmul`` per run of key groups, written into the view (the same result, bit for bit).

- ``fp32``, ``fp16``, ``bf16``: casts; fp32 is exact.
- ``int8``, ``int4``, ``int2``: asymmetric min/max quantization, on the axes KIVI found
  right for each tensor: keys per channel (a group spans ``key_group`` tokens of one
  channel, because key outliers sit in fixed channels; fp16 scale and minimum), values per token
  (a group spans ``value_group`` channels of one token; a one-byte scale and a zero point of
  ``bits`` bits, see :class:`QuantCodec`). int4 and int2 pack 2 / 4 values per byte (slices of
  the last axis in bit fields: unpacking is a shift and a mask). With nearest rounding each
  element's reconstruction error is at most half a step of its group: keys
  ``(max - min) / (2 * (2**bits - 1))`` plus fp16 rounding of scale and minimum, values the
  same over the range widened to include 0 with the step up to 2**(1/8) x coarser;
  Hessian-aware rounding (the default, below) gives up that per-element bound for a lower error
  in what the reranker reads.
  Bytes per token (SmolLM2-135M, 256-token documents; fp16 = 23,040): int8 12,060 (0.523x),
  int4 6,390 (0.277x; keys 64 tokens, values 32 channels), int2 3,375 (0.146x; keys 96 tokens,
  values 32 channels). With fp16 values metadata int4 took 7,200 (0.3125x, k32/v32): the
  cheaper value metadata pays for keys' groups of 64 (24 questions, Hessian rounding: max / mean
  0.286 / 0.055 against 0.285 / 0.051 at k32/v32); int4 at <= 0.27x measured worse every way
  tried: k128 keys 0.41 / 0.064 (0.2695x), one-byte key scales 0.39 / 0.060 (0.2734x), key zero
  points 0.60-0.74. int2's values at 64 channels (0.1377x) measured 3.11 / 0.534 against
  3.24 / 0.515 at 32, and worse with nearest rounding (3.05 against 2.98 on the tests'
  20-document batch). int2's keys, on the adapter's held-out SQuAD train articles (300
  questions, mean score error, the stable figure there; NDCG@10 moves by +-0.01 between
  layouts, within its intervals): k128/v32 0.651 (0.143x), k64/v64 0.600 (0.146x), **k96/v32
  0.563** (0.146x), k64/v32 0.523 but 0.1504x, over the 0.15x budget.

Where the quantization error comes from (``scripts/codec_study.py``: simulated quantizers applied
to one part of the KV at a time, reuse scores against exact fp32 KV, trained adapter, 12 shipped
questions x 20 candidates; ``docs/codecs/codec-study.txt``): int4 k32/v32 everywhere gives max /
mean ranking-score error 0.72 / 0.11. Keys carry most of it (keys alone 0.58 / 0.095, values alone
0.19 / 0.050). No layer, channel set or token set dominates: int4 on one layer alone costs
0.03-0.06 max (layers 0-4 measured), so the 30 layers' small errors add up. Keeping a
document's first 4 tokens exact changes nothing (0.73): the attention sink is in the instruction
prefix, which is never quantized. Techniques, each measured the same way:

- Hadamard rotation of head_dim before quantizing (QuaRot): 0.55 / 0.096, same top-3 100%
  (from 83%); with 16-token key groups 0.40 / 0.085. Undoing it at decode would be a 64x64 GEMM
  per token, ~4x the int4 dequantization itself (29 vs 8 ms per 150-token document), past the
  10%-of-reuse decode budget; so it is **shipped in the decoder** instead
  (``Settings.kv_rotation``): queries and keys are rotated right after RoPE, attention is
  unchanged, and the stored keys are already in the rotated basis, so the codecs below need no
  extra work. Values are not rotated: rotating them too (simulated) does not help, int4 k32/v32
  0.55 / 0.096 against 0.41 / 0.098 with keys alone, int2 k128/v64 6.39 / 1.61 against
  6.48 / 1.43 (values' error is spread over channels already);
- keys quantized before RoPE (KVQuant): 0.65; with rotation 0.66; per-document channel scales
  before RoPE 0.56 / 0.16 (cheaper metadata, worse mean): RoPE is not where the error is;
- normal-quantile (NF4) levels: 1.09 alone, 0.51 with rotation: worse than uniform levels;
- keys grouped per token after rotation: 0.86 (per channel stays right for keys);
- coupled quantization (CQ-style 2-D codebooks of 256 centroids per layer, k/v, head and RoPE
  channel pair, fit on 20 non-candidate documents; 4 bits per value, no metadata, 0.25x):
  1.40 / 0.26 against 0.49 / 0.10 for the shipped int4 (stage-2 adapter): a corpus-wide codebook
  cannot follow each document's range as per-group min/max does, and its decode is a gather,
  measured ~5x int4's dequantization in plain torch;
- more bits where it counts: rotation + int8 keys 0.26 / 0.047 (but 0.45x of fp16), int8 on the
  first or last 10 layers 0.40 / 0.52.

No grid (uniform int4 variant at <= 0.31x of fp16, NF4, codebooks) came near a 0.15 max error,
and none kept full 20-document rankings identical (top-3 sets mostly do); int2 (then 0.148x)
cost 1.6-4.8 max error. (The study's figures are for the earlier int4 k32/v32 with fp16 value
metadata.) The grid stays the plain KIVI layout. What did help is choosing the codes
on it differently:

- **Hessian-aware rounding** (GPTQ's column sweep, applied to the cached KV at encode time;
  :meth:`QuantCodec._sweep`, factors from :mod:`hyperrag.rag.kv_rounding`): the queries that read a
  key are far from isotropic, so each token's rounding errors are pushed into the directions
  they barely read. The format and the decoder are unchanged. Prototype on the study's 12
  questions (rotated keys, simulated): int4 k32/v32 0.51 / 0.075 -> 0.27 / 0.057; on keys only
  0.21; int2 k128/v64 6.5 -> 2.7; weighting query heads by their attention mass, GPTQ's
  activation order and damping 0.001-0.1 changed nothing beyond noise (0.25-0.32), so none is
  kept. The codec's own sweep, same questions and candidates, ``H`` from the reranker's
  queries: int4 0.226 / 0.050 (nearest 0.508 / 0.075), int8 0.021 / 0.0036, int2 2.78 / 0.56
  (nearest 6.50 / 1.31); with the reader's queries added to ``H`` (shipped: the reader reads
  the same KV; on 300 dev questions its int4 F1 moved by -0.013 against -0.019, within noise,
  with 94% of answers unchanged against 91%): int4 0.287 / 0.056, int2 3.32 / 0.57. Its cost is at
  encode time only: ~55-65 ms per document against ~6 ms for nearest rounding (a 365-token
  document: 113 ms, next to ~330 ms of model time to compute its KV; 2-core Intel Xeon).

How far int4 is from keeping whole rankings (``scripts/ranking_error_budget.py``: each
question's measured int4 error pattern scaled down, 300 dev questions): the same top 3 on 98%
of questions needs the error 5x smaller (max 0.14), identical 20-document rankings on 75% needs
it 14x smaller (max 0.05, int8's level: int8 itself keeps 86%); the median question's closest
two candidates are 0.008 apart. A uniform grid halves its error per bit: that is 2.3 and 3.8
more bits. Training the adapter to read stored KV (quantization-aware: question blocks read
int4 KV straight-through, plus the squared score difference from exact KV, weight 10 or 100;
commit 46cf585) did not lower the error: on 20 fixed training groups the int4 score drift went
from rms 0.149 (shipped) to 0.178 (weight 100, 80 steps) and 0.296 (weight 10, 110 steps, whose
scores doubled in spread: the same 2.7% of it), so it is not kept.

A codec's ``spec`` (name + format parameters) is part of every store key and entry header:
changing a codec's format can only miss, never decode old bytes with the new layout.
"""
from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

from hyperrag.kv.dequant import dequantize_into

KV_DIMS = 5  # layers, k/v, heads, tokens, head_dim
_SWEEP_BLOCK = 16  # channels per block of the Hessian-aware sweep (QuantCodec._sweep)
_ALIGN = 8  # every part of a payload starts 8-byte aligned (fp16 views need it)


# Value scales take one byte: 2^(e/8 - 20) for e in 0..255 (2^-20 .. 2^11.9, 1/8-octave steps),
# rounded up to the next step so a group's range still fits (its step is at most 9% coarser). The
# encoder and decoder read the same table, so both see the same grid on every device.
_LOG_SCALES = torch.exp2(torch.arange(256, dtype=torch.float64) / 8 - 20).float()


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@functools.lru_cache(maxsize=None)
def _log_scales(device: torch.device) -> torch.Tensor:
    return _LOG_SCALES.to(device)


class Codec:
    """Base: a codec turns a KV tensor into bytes and back (subclasses define ``name``)."""

    name: str

    @property
    def spec(self) -> str:
        """Name plus format parameters: what the bytes mean (keys the store)."""
        return self.name

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_into(self, payload: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor) -> None:
        raise NotImplementedError

    def nbytes(self, shape: tuple[int, ...]) -> int:
        raise NotImplementedError

    def bytes_per_token(self, layers: int, heads: int, head_dim: int, tokens: int = 256) -> float:
        """Payload bytes per token for a document of ``tokens`` tokens (scales included)."""
        return self.nbytes((layers, 2, heads, tokens, head_dim)) / tokens

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        self.decode_into(payload, shape, out)
        return out


@dataclass(frozen=True)
class CastCodec(Codec):
    name: str
    dtype: torch.dtype

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        return kv.detach().to("cpu", self.dtype).contiguous().view(-1).view(torch.uint8)

    def decode_into(self, payload: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor) -> None:
        out.copy_(payload.view(self.dtype).view(shape))

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) * torch.tensor([], dtype=self.dtype).element_size()


@dataclass(frozen=True)
class QuantCodec(Codec):
    """Asymmetric (min/max + zero point) integer quantization, KIVI axes.

    Payload parts, each 8-byte aligned: key codes ``[L, H, T, D']``, key scales and minima
    ``[L, H, nK, 1, D]`` (fp16), value codes ``[L, H, T, D']``, value scale exponents
    ``[L, H, T, nV]`` (one byte each, :data:`_LOG_SCALES`) and value zero points (codes of
    ``bits`` bits, packed like the codes over the flattened ``[L, H, T, nV]``). Keys are grouped
    along tokens (``nK = ceil(T / kg)``; the last group's statistics treat it as padded with
    copies of the last token; padding is not stored), values along channels. int4 packs the
    first half of the last axis in the low nibbles and the second half in the high nibbles, so
    unpacking is two shifts, not an interleave.

    Why two kinds of group metadata: a key channel can sit far from zero (an offset larger than
    its range), so keys keep an fp16 minimum and scale; value groups straddle zero, so a
    zero point in code units and a one-byte scale lose almost nothing (int4 k64/v32, 24
    questions: max / mean score error 0.289 / 0.054 against 0.291 / 0.056 with fp16 values
    metadata) for 12 bits instead of 32 per group. The same for keys cost 0.60-0.74 max.
    """

    name: str
    bits: int
    key_group: int  # tokens per key group (per channel)
    value_group: int  # channels per value group (per token)
    # [layers, 2, heads, D, D]: upper Cholesky factors of H^-1 for Hessian-aware rounding
    # (:meth:`rounded_by`); None rounds each value to its nearest level. Not compared: the
    # spec tells the two roundings apart.
    hinv: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def spec(self) -> str:
        base = f"{self.name}-asym-k{self.key_group}v{self.value_group}-vlogz"
        # The bytes decode the same either way; the tag keeps the two encodings' entries apart,
        # so a store filled by nearest rounding is re-encoded, not silently kept.
        return base if self.hinv is None else f"{base}-gptq"

    def rounded_by(self, hinv: torch.Tensor | None) -> "QuantCodec":
        """This codec choosing its codes by Hessian-aware rounding with ``hinv``
        (:func:`hyperrag.rag.kv_rounding.hinv_factors`), or by nearest rounding when None."""
        return replace(self, hinv=hinv)

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1

    def _geometry(self, shape: tuple[int, ...]) -> tuple[int, int, int, int, int, int, int]:
        layers, two, heads, tokens, head_dim = shape
        if two != 2 or len(shape) != KV_DIMS:
            raise ValueError(f"KV shape {shape} is not [layers, 2, heads, tokens, head_dim]")
        vg = self.value_group if head_dim % self.value_group == 0 else head_dim
        if head_dim % self.per_byte:
            raise ValueError(f"{self.name} packs {self.per_byte} values per byte: head_dim {head_dim} is not a multiple")
        kg = self.key_group
        return layers, heads, tokens, head_dim, kg, -(-tokens // kg), vg

    def _parts(self, shape: tuple[int, ...]) -> list[int]:
        """Aligned byte sizes of [key codes, key scales, key minima, value codes, value scale
        exponents, value zero points]."""
        layers, heads, tokens, head_dim, kg, nk, vg = self._geometry(shape)
        per_byte = self.per_byte
        rows = layers * heads
        codes = rows * tokens * head_dim // per_byte
        key_stats = rows * nk * head_dim * 2
        value_groups = rows * tokens * (head_dim // vg)
        return [_aligned(n) for n in (codes, key_stats, key_stats, codes, value_groups, -(-value_groups // per_byte))]

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return sum(self._parts(shape))

    def _grid(self, g: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and minimum (fp16, ``dim`` kept as 1) of groups that span axis ``dim``."""
        lo16 = g.amin(dim, keepdim=True).half()
        scale16 = ((g.amax(dim, keepdim=True) - lo16.float()) / self.levels).half().clamp_min(1e-6)
        return scale16, lo16

    def _value_grid(self, g: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scale exponents and zero points (uint8, ``dim`` kept as 1) of value groups that span
        axis ``dim``, and the grid they stand for: scale and minimum (float32). The range is
        widened to include 0, so the zero point is a level and no value falls off the grid."""
        hi, lo = g.amax(dim, keepdim=True).clamp_min(0), g.amin(dim, keepdim=True).clamp_max(0)
        table = _log_scales(g.device)
        exps = torch.searchsorted(table, ((hi - lo) / self.levels).contiguous()).clamp_max_(255)
        scale = table[exps]
        zero = torch.round(-lo / scale).clamp_(0, self.levels)
        return exps.to(torch.uint8), zero.to(torch.uint8), scale, -zero * scale

    def _quantize_keys(self, g: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (uint8, shape of ``g``), scale and minimum (fp16, ``dim`` kept as 1) of key
        groups that span axis ``dim``. The minimum and scale are rounded to fp16 before coding,
        so the decoder reproduces exactly the grid the encoder used."""
        scale16, lo16 = self._grid(g, dim)
        return self._codes(g, scale16.float(), lo16.float()).to(torch.uint8), scale16, lo16

    def _codes(self, x: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The nearest level of each value of ``x`` on the grid ``lo + scale * code`` (as float)."""
        return torch.round((x - lo) / scale, out=out).clamp_(0, self.levels)

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        """Codes of the i-th of ``per_byte`` equal slices of the last axis go to bits
        ``[i * bits, (i + 1) * bits)`` of each byte: unpacking is a shift and a mask per slice."""
        chunks = q.chunk(self.per_byte, -1)
        packed = chunks[0].clone()
        for i, chunk in enumerate(chunks[1:], 1):
            packed |= chunk << (self.bits * i)
        return packed

    def _unpack(self, codes: torch.Tensor, width: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The codes of packed ``codes`` (last axis ``width // per_byte``) as float32, in ``out``
        or a per-thread scratch, of shape ``[..., width]``: one shift and mask per bit field over
        the whole tensor, concatenated and converted in one pass (converting each slice inside
        the dequantization measured slower)."""
        if out is None:
            out = _scratch(codes.numel() * self.per_byte, codes.device)
        out = out.view(*codes.shape[:-1], width)
        if self.bits == 8:
            out.copy_(codes)
        else:
            out.copy_(torch.cat([(codes >> (self.bits * i)) & self.levels for i in range(self.per_byte)], -1))
        return out

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        kv = kv.detach().to("cpu", torch.float32)
        layers, heads, tokens, head_dim, kg, nk, vg = self._geometry(tuple(kv.shape))
        keys = kv[:, 0]  # [L, H, T, D]
        pad = nk * kg - tokens
        if pad:
            keys = torch.cat([keys, keys[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
        if self.hinv is None:
            kq, ks, km = self._quantize_keys(keys.reshape(layers, heads, nk, kg, head_dim), dim=3)
            values = kv[:, 1].reshape(layers, heads, tokens, head_dim // vg, vg)
            ve, vz, scale, lo = self._value_grid(values, dim=4)
            vq = self._codes(values, scale, lo).to(torch.uint8)
        else:
            kq, ks, km, vq, ve, vz = self._swept(keys, kv[:, 1], vg)
        kq = kq.reshape(layers, heads, nk * kg, head_dim)[:, :, :tokens]  # padding is not stored
        zeros = vz.reshape(-1)
        zeros = torch.cat([zeros, zeros.new_zeros(-zeros.numel() % self.per_byte)])
        out = torch.zeros(self.nbytes(tuple(kv.shape)), dtype=torch.uint8)
        offset = 0
        parts = (self._pack(kq), ks, km, self._pack(vq.reshape(layers, heads, tokens, head_dim)), ve, self._pack(zeros))
        for part, size in zip(parts, self._parts(tuple(kv.shape))):
            flat = part.contiguous().view(-1).view(torch.uint8)
            out[offset : offset + flat.numel()] = flat
            offset += size
        return out

    @cached_property
    def _sweep_hinv(self) -> torch.Tensor:
        """``hinv`` as :meth:`_sweep` reads it, [2 x layers x heads, D, D] float32 with the key
        rows first: built once per codec, not once per document."""
        return torch.cat([self.hinv[:, 0].flatten(0, 1), self.hinv[:, 1].flatten(0, 1)]).float()

    def _swept(self, keys: torch.Tensor, values: torch.Tensor, vg: int) -> tuple[torch.Tensor, ...]:
        """:meth:`encode`'s codes, scales and minima by :meth:`_sweep`, in its shapes; keys
        [L, H, T', D] are padded to whole groups, values [L, H, T, D] in groups of ``vg``
        channels (:meth:`_geometry`'s). Both go through one
        sweep, channel-major ([D, rows, T']: the column a step reads is contiguous), values
        padded like keys and cut after."""
        layers, heads, padded, d = keys.shape
        tokens, rows = values.shape[2], layers * heads
        x = torch.empty(d, 2 * rows, padded)
        x[:, :rows] = keys.reshape(rows, padded, d).permute(2, 0, 1)
        x[:, rows:, :tokens] = values.reshape(rows, tokens, d).permute(2, 0, 1)
        x[:, rows:, tokens:] = x[:, rows:, tokens - 1 : tokens]
        codes, ks, km, ve, vz = self._sweep(x, self._sweep_hinv, rows, vg)
        codes = codes.to(torch.uint8)
        nk, nv = ks.shape[-1], ve.shape[0]
        key_stats = (t.permute(1, 2, 0).reshape(layers, heads, nk, 1, d) for t in (ks, km))
        value_stats = (t[..., :tokens].permute(1, 2, 0).reshape(layers, heads, tokens, nv, 1) for t in (ve, vz))
        return (codes[:, :rows].permute(1, 2, 0).reshape(layers, heads, padded, d), *key_stats,
                codes[:, rows:, :tokens].permute(1, 2, 0).reshape(layers, heads, tokens, d), *value_stats)

    def _sweep(self, w: torch.Tensor, hinv: torch.Tensor, rows: int, vg: int) -> tuple[torch.Tensor, ...]:
        """Hessian-aware rounding (GPTQ's column sweep, on cached KV rather than on weights).

        What a KV error costs is how much it moves what reads it: a key error ``e`` moves the
        attention logit of a query ``q`` by ``q.e``, so the cost is ``e^T H e`` with ``H`` the
        second moment of the queries; a value error is weighed by o_proj's columns the same way
        (:mod:`hyperrag.rag.kv_rounding` measures both). Nearest rounding ignores ``H``. Here each
        token's vector [D] is rounded one channel at a time and each rounding error is pushed
        onto the channels not rounded yet through ``hinv`` (the upper Cholesky factor of
        ``H^-1``), into directions the queries barely read. A group's minimum and scale are
        taken from its values as updated when the sweep reaches it (keys: each channel's
        token groups; values: each channel group per token), so the stored grid is the one the
        codes were chosen on and decoding is unchanged. Channels go in blocks (GPTQ's lazy
        batches): inside a block one column at a time, then one batched GEMM for the channels
        after it; a value group starts at a block start or fits inside one (powers of two), so
        its grid sees every earlier push. ``w`` [D, 2R, T] channel-major (rows ``[:rows]`` keys,
        the rest values; overwritten), ``hinv`` [2R, D, D]. Returns codes [D, 2R, T] (float),
        key scales and minima [D, R, T / key_group] (fp16), value scale exponents and zero
        points [D / vg, R, T] (uint8)."""
        d, _, tokens = w.shape
        kg = self.key_group
        codes, errs = torch.empty_like(w), torch.empty_like(w)
        ks, km = (torch.empty(d, rows, tokens // kg, dtype=torch.float16) for _ in range(2))
        ve, vz = (torch.empty(d // vg, rows, tokens, dtype=torch.uint8) for _ in range(2))
        scale, lo = torch.empty(w.shape[1:]), torch.empty(w.shape[1:])  # the current column's grid
        inv_diag = (1.0 / hinv.diagonal(dim1=-2, dim2=-1)).T[..., None]  # [D, 2R, 1]
        pushes = hinv.permute(1, 2, 0)[..., None]  # [D, D, 2R, 1]: row j = how channel j's error moves the others
        for first in range(0, d, _SWEEP_BLOCK):
            end = min(first + _SWEEP_BLOCK, d)
            for j in range(first, end):
                if j % vg == 0:
                    exps, zero, s32, m32 = self._value_grid(w[j : j + vg, rows:], dim=0)
                    ve[j // vg], vz[j // vg] = exps[0], zero[0]
                    scale[rows:], lo[rows:] = s32[0], m32[0]
                s16, m16 = self._grid(w[j, :rows].view(rows, -1, kg), dim=2)
                ks[j], km[j] = s16[..., 0], m16[..., 0]
                scale[:rows].view(rows, -1, kg).copy_(s16)
                lo[:rows].view(rows, -1, kg).copy_(m16)
                q, err = codes[j], errs[j]
                self._codes(w[j], scale, lo, out=q)
                torch.mul(w[j] - (q * scale + lo), inv_diag[j], out=err)
                w[j + 1 : end].addcmul_(pushes[j, j + 1 : end], err, value=-1.0)
            if end < d:  # [2R, T, B] @ [2R, B, D - end]
                w[end:] -= torch.bmm(errs[first:end].permute(1, 2, 0), hinv[:, first:end, end:]).permute(2, 0, 1)
        return codes, ks, km, ve, vz

    def _split(self, payload: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
        parts, offset = [], 0
        for size in self._parts(shape):
            parts.append(payload[offset : offset + size])
            offset += size
        return parts

    def decode_into(self, payload: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor) -> None:
        kernel = out.device.type == "cpu" and out.dtype == torch.float32 and out.stride(-1) == 1
        self._decode(payload, shape, out, kernel)

    def _decode(self, payload: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor, kernel: bool) -> None:
        """Decode with the compiled CPU kernel (:mod:`hyperrag.kv.dequant`) or with torch's ops,
        which every other device runs and which define the result (tests compare the two)."""
        layers, heads, tokens, head_dim, kg, nk, vg = self._geometry(shape)
        nv, width = head_dim // vg, self.per_byte
        if payload.device != out.device:  # ship the compact bytes, dequantize where the buffer is
            payload = payload.to(out.device, non_blocking=True)
        kq, ks, km, vq, ve, vz = self._split(payload, shape)
        n_rows = layers * heads * tokens
        kq = kq[: n_rows * head_dim // width].view(layers, heads, tokens, head_dim // width)
        ks = ks[: layers * heads * nk * head_dim * 2].view(torch.float16).view(layers, heads, nk, 1, head_dim).float()
        km = km[: layers * heads * nk * head_dim * 2].view(torch.float16).view(layers, heads, nk, 1, head_dim).float()
        vq = vq[: n_rows * head_dim // width].view(layers, heads, tokens, head_dim // width)
        vs = _log_scales(out.device)[ve[: n_rows * nv].long()].view(layers, heads, tokens, nv, 1)
        padded = -(-n_rows * nv // width) * width
        zeros = self._unpack(vz[: padded // width], padded, out=torch.empty(padded, device=out.device))
        vm = zeros[: n_rows * nv].view(layers, heads, tokens, nv, 1).mul_(vs).neg_()
        if kernel:
            dequantize_into(out[:, 0], kq, ks, km, True, kg, self.bits)
            dequantize_into(out[:, 1], vq, vs, vm, False, vg, self.bits)
            return
        keys = out[:, 0]  # [L, H, T, D] view of the destination
        codes = self._unpack(kq, head_dim)
        full = tokens // kg  # whole key groups first, then the shorter last one
        for first, n, g in ((0, full, kg), (full, 1, tokens - full * kg)):
            if n and g:
                span = slice(first * kg, first * kg + n * g)
                torch.addcmul(km[:, :, first : first + n], codes[:, :, span].unflatten(2, (n, g)),
                              ks[:, :, first : first + n], out=keys[:, :, span].unflatten(2, (n, g)))
        # Values: scale and minimum are constant along channels, a broadcast that elementwise
        # kernels handle badly in the innermost axis; scale the unpacked codes in place over
        # [.., nV, vg] and copy once into the destination (measured ~2x faster).
        tmp = self._unpack(vq, head_dim)
        grouped = tmp.view(layers, heads, tokens, nv, vg)
        grouped.mul_(vs).add_(vm)
        out[:, 1].copy_(tmp)


_local = threading.local()


def _scratch(numel: int, device: torch.device) -> torch.Tensor:
    """A per-thread float32 scratch buffer (grown on demand, never shrunk): decoding runs per
    document per query, and a fresh multi-MB allocation each time costs page faults."""
    key = f"buf_{device}"
    buf = getattr(_local, key, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1 << 20), dtype=torch.float32, device=device)
        setattr(_local, key, buf)
    return buf[:numel]


CODECS: dict[str, Codec] = {
    "fp32": CastCodec("fp32", torch.float32),
    "fp16": CastCodec("fp16", torch.float16),
    "bf16": CastCodec("bf16", torch.bfloat16),
    "int8": QuantCodec("int8", bits=8, key_group=64, value_group=64),
    "int4": QuantCodec("int4", bits=4, key_group=64, value_group=32),
    # 2 bits: keys in groups of 96 tokens, what the 0.15x-of-fp16 budget leaves next to values' 32
    "int2": QuantCodec("int2", bits=2, key_group=96, value_group=32),
}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")
    return CODECS[name]
