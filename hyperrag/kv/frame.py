"""The stored KV entry format, in one place: its key and its bytes.

Key: a content address, ``sha256(identity | codec spec | sha256(text))``, where ``identity``
names the model weights (and adapter), compute dtype, prompt template and length limit, so a
change to any of them can only miss, never return a stale cache.

Bytes: ``MAGIC | header length (u32 LE) | JSON header | payload``. The header carries the full
content address, the codec spec, the KV shape, the payload size and a CRC32C of the payload, and
is padded so the payload starts 64-byte aligned. The store writes and checks entries with
:func:`frame` / :func:`unframe`; the planner sizes them with :func:`frame_bytes`; nothing else
knows the layout. A changed format gets a new ``MAGIC``: old entries then fail the check and are
recomputed, never misread.
"""
from __future__ import annotations

import hashlib
import json
import struct
from typing import Sequence

import google_crc32c
import torch

from hyperrag.kv.codec import Codec

MAGIC = b"HRKV\x02"
ALIGN = 64
_LENGTH = struct.Struct("<I")
_HEAD = len(MAGIC) + _LENGTH.size


def content_address(identity: str, codec: Codec, text: str) -> str:
    """The key of a document's KV: sha256 over everything the KV depends on."""
    spec = codec.spec
    doc = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return hashlib.sha256(f"{identity}|{spec}|{doc}".encode()).hexdigest()


def _header(address: str, spec: str, shape: Sequence[int], payload_bytes: int, crc: int) -> bytes:
    header = json.dumps({"address": address, "codec": spec, "shape": list(shape), "payload": payload_bytes,
                         "crc32c": crc}).encode()
    header += b" " * (-(_HEAD + len(header)) % ALIGN)  # the payload starts aligned
    return MAGIC + _LENGTH.pack(len(header)) + header


def frame(address: str, codec: Codec, shape: Sequence[int], payload: torch.Tensor) -> bytes:
    """The bytes that go before an encoded ``payload`` (uint8) of a KV of ``shape``."""
    return _header(address, codec.spec, shape, payload.numel(), google_crc32c.value(payload.contiguous().numpy()))


def frame_bytes(codec: Codec, shape: Sequence[int]) -> int:
    """Size of the frame before a payload: exact, since the widest checksum still pads to the same
    64-byte boundary in all but rare cases, and never less than what :func:`frame` writes."""
    return len(_header("0" * 64, codec.spec, shape, codec.nbytes(tuple(shape)), 2**32 - 1))


def unframe(data: torch.Tensor, address: str, codec: Codec) -> tuple[tuple[int, ...], torch.Tensor]:
    """Validate a stored entry (uint8 ``data``, header and payload contiguous); return (shape,
    payload view) or raise ``ValueError`` saying why."""
    head = bytes(data[:_HEAD].numpy())
    if len(head) < _HEAD or head[: len(MAGIC)] != MAGIC:
        raise ValueError("bad magic")
    (hlen,) = _LENGTH.unpack(head[len(MAGIC):])
    start = _HEAD + hlen
    if start > data.numel():
        raise ValueError("truncated header")
    try:
        header = json.loads(bytes(data[_HEAD:start].numpy()))
        shape = tuple(int(n) for n in header["shape"])
    except (ValueError, KeyError, TypeError):
        raise ValueError("unreadable header") from None
    if header.get("address") != address:
        raise ValueError("entry belongs to another document/model/template/codec")
    if header.get("codec") != codec.spec:
        raise ValueError(f"codec {header.get('codec')!r}, expected {codec.spec!r}")
    try:
        size = codec.nbytes(shape)
    except (ValueError, TypeError):
        raise ValueError(f"bad shape {shape}") from None
    if header.get("payload") != size or data.numel() < start + size:
        raise ValueError("truncated payload")
    payload = data[start : start + size]
    if google_crc32c.value(payload.numpy()) != header.get("crc32c"):
        raise ValueError("checksum mismatch")
    return shape, payload
