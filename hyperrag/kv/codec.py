"""KV codecs: how one document's KV ``[layers, 2, kv_heads, tokens, head_dim]`` becomes bytes.

Every codec encodes to one flat ``uint8`` tensor and decodes straight into a destination view
of the compute dtype (a row of the static batch buffer), so loading needs no extra copy: the
quantized codecs dequantize with one fused ``addcmul`` per part, written into the view.

- ``fp32``, ``fp16``, ``bf16``: casts; fp32 is exact.
- ``int8``, ``int4``: asymmetric min/max quantization with a zero point (fp16 scale and
  minimum per group) in plain torch, on the axes KIVI found right for each tensor: keys per
  channel (a group spans ``group`` tokens of one channel, because key outliers sit in fixed
  channels), values per token (a group spans ``group`` channels of one token). int4 packs two
  values per byte. On SmolLM2-135M, against fp32 scores (20-document batches), max |score
  error| was about 1e-3 (fp16), 0.015 (int8, 64-groups) and 0.2 (int4, 32-groups; the former
  symmetric int4 reached 0.6). Each element's reconstruction error is at most half a step,
  ``(max - min) / (2 * (2**bits - 1))`` of its group, plus fp16 rounding of scale and minimum.

A codec's ``spec`` (name + format parameters) is part of every store key and entry header:
changing a codec's format can only miss, never decode old bytes with the new layout.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

KV_DIMS = 5  # layers, k/v, heads, tokens, head_dim
_ALIGN = 8  # every part of a payload starts 8-byte aligned (fp16 views need it)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


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
    ``[L, H, nK, 1, D]`` (fp16), value codes ``[L, H, T, D']``, value scales and minima
    ``[L, H, T, nV]``. Keys are grouped along tokens (``nK = ceil(T / kg)``; the last group's
    statistics treat it as padded with copies of the last token; padding is not stored), values
    along channels. int4 packs the first half of the last axis in the low nibbles and the
    second half in the high nibbles, so unpacking is two shifts, not an interleave.
    """

    name: str
    bits: int
    key_group: int  # tokens per key group (per channel)
    value_group: int  # channels per value group (per token)

    @property
    def spec(self) -> str:
        return f"{self.name}-asym-k{self.key_group}v{self.value_group}"

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1

    def _geometry(self, shape: tuple[int, ...]) -> tuple[int, int, int, int, int, int, int]:
        layers, two, heads, tokens, head_dim = shape
        if two != 2 or len(shape) != KV_DIMS:
            raise ValueError(f"KV shape {shape} is not [layers, 2, heads, tokens, head_dim]")
        vg = self.value_group if head_dim % self.value_group == 0 else head_dim
        if self.bits == 4 and head_dim % 2:
            raise ValueError(f"int4 needs an even head_dim, got {head_dim}")
        kg = self.key_group
        return layers, heads, tokens, head_dim, kg, -(-tokens // kg), vg

    def _parts(self, shape: tuple[int, ...]) -> list[int]:
        """Aligned byte sizes of [key codes, key scales, key minima, value codes, value scales, value minima]."""
        layers, heads, tokens, head_dim, kg, nk, vg = self._geometry(shape)
        per_byte = 8 // self.bits
        rows = layers * heads
        key_codes = rows * tokens * head_dim // per_byte
        key_stats = rows * nk * head_dim * 2
        value_codes = rows * tokens * head_dim // per_byte
        value_stats = rows * tokens * (head_dim // vg) * 2
        return [_aligned(n) for n in (key_codes, key_stats, key_stats, value_codes, value_stats, value_stats)]

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return sum(self._parts(shape))

    def _quantize(self, g: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (uint8, shape of ``g``), scale and minimum (fp16, ``dim`` kept as 1) of groups
        that span axis ``dim``. The minimum and scale are rounded to fp16 before coding, so the
        decoder reproduces exactly the grid the encoder used."""
        lo16 = g.amin(dim, keepdim=True).half()
        scale16 = ((g.amax(dim, keepdim=True) - lo16.float()) / self.levels).half().clamp_min(1e-6)
        q = ((g - lo16.float()) / scale16.float()).round_().clamp_(0, self.levels).to(torch.uint8)
        return q, scale16, lo16

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return q
        half = q.shape[-1] // 2
        return q[..., :half] | (q[..., half:] << 4)

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        kv = kv.detach().to("cpu", torch.float32)
        layers, heads, tokens, head_dim, kg, nk, vg = self._geometry(tuple(kv.shape))
        keys = kv[:, 0]  # [L, H, T, D]
        pad = nk * kg - tokens
        if pad:
            keys = torch.cat([keys, keys[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
        kq, ks, km = self._quantize(keys.reshape(layers, heads, nk, kg, head_dim), dim=3)
        kq = kq.reshape(layers, heads, nk * kg, head_dim)[:, :, :tokens]  # padding is not stored
        vq, vs, vm = self._quantize(kv[:, 1].reshape(layers, heads, tokens, head_dim // vg, vg), dim=4)
        out = torch.zeros(self.nbytes(tuple(kv.shape)), dtype=torch.uint8)
        offset = 0
        for part, size in zip((self._pack(kq), ks, km, self._pack(vq.reshape(layers, heads, tokens, head_dim)), vs, vm), self._parts(tuple(kv.shape))):
            flat = part.contiguous().view(-1).view(torch.uint8)
            out[offset : offset + flat.numel()] = flat
            offset += size
        return out

    def _split(self, payload: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
        parts, offset = [], 0
        for size in self._parts(shape):
            parts.append(payload[offset : offset + size])
            offset += size
        return parts

    def _dequantize_into(self, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                         out: torch.Tensor) -> None:
        """``out = minimum + codes * scale``, codes possibly packed in nibbles (halves of the last
        axis); scale and minimum vary along the last axis (keys: per channel), so one fused
        ``addcmul`` per half writes straight into the destination view."""
        if self.bits == 8:
            torch.addcmul(minimum, codes, scale, out=out)
            return
        half = out.shape[-1] // 2
        torch.addcmul(minimum[..., :half], codes & 15, scale[..., :half], out=out[..., :half])
        torch.addcmul(minimum[..., half:], codes >> 4, scale[..., half:], out=out[..., half:])

    def decode_into(self, payload: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor) -> None:
        layers, heads, tokens, head_dim, kg, nk, vg = self._geometry(shape)
        nv, width = head_dim // vg, 8 // self.bits
        if payload.device != out.device:  # ship the compact bytes, dequantize where the buffer is
            payload = payload.to(out.device, non_blocking=True)
        kq, ks, km, vq, vs, vm = self._split(payload, shape)
        kq = kq[: layers * heads * tokens * head_dim // width].view(layers, heads, tokens, head_dim // width)
        ks = ks[: layers * heads * nk * head_dim * 2].view(torch.float16).view(layers, heads, nk, 1, head_dim).float()
        km = km[: layers * heads * nk * head_dim * 2].view(torch.float16).view(layers, heads, nk, 1, head_dim).float()
        keys = out[:, 0]  # [L, H, T, D] view of the destination
        full = tokens // kg
        if full:
            self._dequantize_into(kq[:, :, : full * kg].unflatten(2, (full, kg)), ks[:, :, :full], km[:, :, :full],
                                  keys[:, :, : full * kg].unflatten(2, (full, kg)))
        rest = tokens - full * kg
        if rest:
            self._dequantize_into(kq[:, :, full * kg :].unsqueeze(2), ks[:, :, full:], km[:, :, full:],
                                  keys[:, :, full * kg :].unsqueeze(2))
        # Values: scale and minimum are constant along channels, a broadcast that elementwise
        # kernels handle badly in the innermost axis; unpack into a float scratch, scale it in
        # place over [.., nV, vg] and copy once into the destination (measured ~2x faster).
        n_rows = layers * heads * tokens
        vq = vq[: n_rows * head_dim // width].view(layers, heads, tokens, head_dim // width)
        vs = vs[: n_rows * nv * 2].view(torch.float16).view(layers, heads, tokens, nv, 1)
        vm = vm[: n_rows * nv * 2].view(torch.float16).view(layers, heads, tokens, nv, 1)
        tmp = _scratch(n_rows * head_dim, out.device).view(layers, heads, tokens, head_dim)
        if self.bits == 8:
            tmp.copy_(vq)
        else:
            half = head_dim // 2
            tmp[..., :half].copy_(vq & 15)
            tmp[..., half:].copy_(vq >> 4)
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
    "int4": QuantCodec("int4", bits=4, key_group=32, value_group=32),
}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")
    return CODECS[name]
