"""Fused dequantization on CPU: unpack, scale and shift in one pass into the batch buffer.

Why a kernel of its own: in torch ops, decoding a quantized document is ~6 passes over memory
(unpack, convert, scale, shift, copy), and with both cores decoding at once (the reranker's row
streams) memory is what they wait on. One pass that reads the packed bytes and writes each
float once: two threads decoding 20 documents (2,866 tokens) took 16 ms instead of 30 for
int4, 18 instead of 32 for int2, 14.5 instead of 21.5 for int8 (fp32's plain copy: 11) on a
2-core Intel Xeon. numba comes with LMCache already; the kernel compiles when this module is
first imported on a machine (~1 s), from numba's on-disk cache after. Other devices keep the
torch ops in :meth:`hyperrag.kv.codec.QuantCodec._decode`, which define the result (tested
bit-equal).
"""
from __future__ import annotations

import numba
import numpy as np
import torch


# One signature, compiled when this module is imported and cached on disk (numba's cache, next to
# this file or in ~/.cache): the first decode of a query must not pay ~1 s of compiling.
_SIGNATURE = "void(uint8[:, :, ::1], float32[:, :, ::1], float32[:, :, ::1], boolean, int64, int64, float32[::1], int64, int64, int64, int64, int64)"


@numba.njit(_SIGNATURE, nogil=True, cache=True, error_model="numpy")
def _dequantize(codes, scales, lows, keys, group, bits, flat, base, s_layer, s_head, s_token, heads):  # pragma: no cover - compiled
    """``flat[...] = code * scale + low`` for packed ``codes`` [layers x heads, tokens, D / per_byte]
    (bit field i of byte j is channel ``i * w + j``). Keys: ``scales``/``lows`` [rows, token
    groups, D], ``group`` tokens a group; values: [rows, tokens, channel groups], ``group``
    channels a group. ``flat`` is the destination's storage, element (layer, head, token,
    channel) at ``base + layer * s_layer + head * s_head + token * s_token + channel``."""
    rows, tokens, w = codes.shape
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    step = w if keys else min(w, group)  # a run of channels with one scale (values)
    for r in range(rows):
        layer = r // heads
        head = r - layer * heads
        for t in range(tokens):
            src = codes[r, t]
            off = base + layer * s_layer + head * s_head + t * s_token
            for i in range(per_byte):
                shift = bits * i
                for c0 in range(0, w, step):
                    first = i * w + c0
                    dst = flat[off + first : off + first + step]
                    part = src[c0 : c0 + step]
                    if keys:
                        sc = scales[r, t // group, first : first + step]
                        lo = lows[r, t // group, first : first + step]
                        for j in range(step):
                            dst[j] = np.float32((part[j] >> shift) & mask) * sc[j] + lo[j]
                    else:
                        s = scales[r, t, first // group]
                        m = lows[r, t, first // group]
                        for j in range(step):
                            dst[j] = np.float32((part[j] >> shift) & mask) * s + m


def dequantize_into(out: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor,
                    keys: bool, group: int, bits: int) -> None:
    """Dequantize ``codes`` [layers, heads, tokens, D / per_byte] (uint8) into ``out``
    [layers, heads, tokens, D] (float32 on CPU, channels contiguous: a view of a batch row)."""
    layers, heads, tokens, _ = out.shape
    flat = torch.as_strided(out, (out.untyped_storage().nbytes() // out.element_size(),), (1,), 0)
    s_layer, s_head, s_token, _ = out.stride()
    rows = layers * heads
    arrays = (t.reshape(rows, t.shape[2], -1).contiguous().numpy() for t in (codes, scales, lows))
    _dequantize(*arrays, keys, group, bits, flat.numpy(), out.storage_offset(), s_layer, s_head, s_token, heads)
