"""KV codecs: how one document's KV ``[layers, 2, kv_heads, tokens, head_dim]`` becomes bytes.

Every codec encodes to one flat ``uint8`` tensor and decodes straight into a destination view
of the compute dtype (a row of the static batch buffer), so loading needs no extra copy.

- ``fp32``, ``fp16``, ``bf16``: casts; fp32 is exact, fp16 moves scores by ~1e-3.
- ``int8``, ``int4``: symmetric absmax quantization in plain torch, with the axes KIVI found
  right for each tensor: keys per channel (scales shared along tokens), values per token
  (scales shared along channels). int8 uses one scale per whole document channel / token
  row; int4 uses groups of 32 and packs two values per byte. Scales are fp16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KV_DIMS = 5  # layers, k/v, heads, tokens, head_dim


class Codec:
    """Base: a codec turns a KV tensor into bytes and back (subclasses define ``name``)."""

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_into(self, payload: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor) -> None:
        raise NotImplementedError

    def nbytes(self, shape: tuple[int, ...]) -> int:
        raise NotImplementedError

    def bytes_per_token(self, layers: int, heads: int, head_dim: int, tokens: int = 256) -> float:
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
        out.copy_(payload.view(self.dtype).view(shape), non_blocking=True)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) * torch.tensor([], dtype=self.dtype).element_size()


def _grouped(x: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """Move ``dim`` last, zero-pad it to a multiple of ``group``, split it into groups."""
    x = x.movedim(dim, -1)
    pad = (-x.shape[-1]) % group
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, group)


@dataclass(frozen=True)
class QuantCodec(Codec):
    """Symmetric absmax integer quantization; keys grouped along tokens, values along channels."""

    name: str
    bits: int
    group: int | None  # None: one group spanning the whole axis

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def _groups(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(key group, key groups, value group, value groups) for a KV of ``shape``."""
        tokens, head_dim = shape[3], shape[4]
        kg = self.group or tokens
        vg = self.group or head_dim
        return kg, math.ceil(tokens / kg), vg, math.ceil(head_dim / vg)

    def _parts(self, shape: tuple[int, ...]) -> list[int]:
        """Byte sizes of [key values, key scales, value values, value scales]."""
        layers, _, heads, tokens, head_dim = shape
        kg, kn, vg, vn = self._groups(shape)
        per_byte = 8 // self.bits
        rows = layers * heads
        return [
            rows * head_dim * kn * kg // per_byte, rows * head_dim * kn * 2,
            rows * tokens * vn * vg // per_byte, rows * tokens * vn * 2,
        ]

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return sum(self._parts(shape))

    def _quantize(self, x: torch.Tensor, dim: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = _grouped(x.float(), dim, group)
        scale = (g.abs().amax(-1, keepdim=True) / self.qmax).clamp_min(1e-8).half()
        q = (g / scale.float()).round_().clamp_(-self.qmax, self.qmax).to(torch.int8)
        if self.bits == 4:
            u = (q + 8).to(torch.uint8).reshape(-1, 2)
            return u[:, 0] | (u[:, 1] << 4), scale
        return q.view(torch.uint8), scale

    def _dequantize(self, data: torch.Tensor, scale: torch.Tensor, grouped_shape: tuple[int, ...]) -> torch.Tensor:
        if self.bits == 4:
            q = torch.stack((data & 15, data >> 4), dim=-1).to(torch.int8) - 8
        else:
            q = data.view(torch.int8)
        return q.reshape(grouped_shape).float() * scale.view(*grouped_shape[:-1], 1).float()

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        kv = kv.detach().to("cpu")
        kg, _, vg, _ = self._groups(tuple(kv.shape))
        kq, ks = self._quantize(kv[:, 0], dim=2, group=kg)  # keys: [L, H, T, D], groups along T
        vq, vs = self._quantize(kv[:, 1], dim=3, group=vg)  # values: groups along D
        return torch.cat([t.reshape(-1).view(torch.uint8) for t in (kq, ks, vq, vs)])

    def decode_into(self, payload: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor) -> None:
        layers, _, heads, tokens, head_dim = shape
        kg, kn, vg, vn = self._groups(shape)
        kq, ks, vq, vs = torch.split(payload, self._parts(shape))
        keys = self._dequantize(kq, ks.view(torch.float16), (layers, heads, head_dim, kn, kg))
        keys = keys.reshape(layers, heads, head_dim, kn * kg)[..., :tokens].movedim(-1, 2)
        values = self._dequantize(vq, vs.view(torch.float16), (layers, heads, tokens, vn, vg))
        values = values.reshape(layers, heads, tokens, vn * vg)[..., :head_dim]
        out[:, 0].copy_(keys)
        out[:, 1].copy_(values)


CODECS: dict[str, Codec] = {
    "fp32": CastCodec("fp32", torch.float32),
    "fp16": CastCodec("fp16", torch.float16),
    "bf16": CastCodec("bf16", torch.bfloat16),
    "int8": QuantCodec("int8", bits=8, group=None),
    "int4": QuantCodec("int4", bits=4, group=32),
}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")
    return CODECS[name]
