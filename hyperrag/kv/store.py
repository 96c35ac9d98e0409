"""The document KV store: LMCache storage underneath, content-addressed entries on top.

Each entry is one document's KV (on the shared instruction prefix), encoded by a codec and
framed as ``MAGIC | header length | JSON header | payload``. The header carries the full
content address, the codec, the KV shape and a CRC32C of the payload; an entry that fails any
check is never used: it is counted, evicted and reported as a miss, so the caller recomputes
and rewrites it.

The key is a content address: ``sha256(identity | codec | sha256(text))`` where ``identity``
names the model weights (and adapter), compute dtype, prompt template and length limit, so a
change to any of them can only miss, never return a stale cache.

Backends by URL (LMCache's storage manager; the in-process CPU tier sits in front as a hot
cache): ``fs://DIR`` (embedded default, persists across restarts), ``lm://HOST:PORT`` (LMCache
server), ``redis://HOST:PORT``, ``memory://`` (the CPU tier alone).

Every store operation is bounded by a timeout; after a failure the store is treated as down
for a short back-off, during which calls fail fast, so the reranker falls back to computing.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import os
import struct
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, TypeVar

import google_crc32c
import torch

from hyperrag.kv.codec import Codec, get_codec

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")

log = logging.getLogger("hyperrag.store")
MAGIC = b"HRKV\x01"
REMOTE = "RemoteBackend"
ALIGN = 64
SCHEMES = ("fs", "lm", "redis", "memory")
T = TypeVar("T")


class StoreError(RuntimeError):
    """A store that cannot be used at all (bad URL, unreachable at start-up with no fallback)."""


class StoreUnavailable(StoreError):
    """The store did not answer in time or failed; the caller computes instead."""


@dataclass
class StoreStats:
    puts: int = 0
    put_bytes: int = 0
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    errors: int = 0
    load_bytes: int = 0
    load_s: float = 0.0

    @property
    def load_gb_per_s(self) -> float:
        return self.load_bytes / self.load_s / 1e9 if self.load_s else 0.0


def parse_store_url(url: str) -> tuple[str, str | None]:
    """``(scheme, LMCache remote_url or None)``; ``fs://DIR`` accepts relative and ~ paths."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise StoreError(f"store URL {url!r}: expected one of {', '.join(s + '://' for s in SCHEMES)}")
    if scheme == "memory":
        return scheme, None
    if scheme == "fs":
        if not rest:
            raise StoreError(f"store URL {url!r}: fs:// needs a folder, e.g. fs://./kv")
        folder = Path(rest.removeprefix("host:0")).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return scheme, f"fs://host:0{folder}"
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise StoreError(f"store URL {url!r}: expected {scheme}://HOST:PORT")
    return scheme, f"{scheme}://{host}:{port}"


class KVStore:
    """Per-document KV entries in LMCache. Thread-safe; all operations bounded in time."""

    def __init__(self, url: str, codec: str | Codec, identity: str, hot_cache_gb: float = 2.0,
                 timeout_s: float = 5.0, backoff_s: float = 10.0):
        self.url = url
        self.scheme, remote_url = parse_store_url(url)
        self.codec = get_codec(codec) if isinstance(codec, str) else codec
        self.identity = identity
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.stats = StoreStats()
        self.warnings: list[str] = []
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._pool = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvstore")
        self._pending: set[str] = set()
        self._manager = self._make_manager(remote_url, hot_cache_gb)

    # -- LMCache plumbing ---------------------------------------------------------------------
    def _make_manager(self, remote_url: str | None, hot_cache_gb: float):
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.event_manager import EventManager
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.storage_manager import StorageManager

        config = LMCacheEngineConfig.from_defaults(
            chunk_size=256, local_cpu=hot_cache_gb > 0 or remote_url is None,
            max_local_cpu_size=max(hot_cache_gb, 0.5), remote_url=remote_url, remote_serde="naive",
            save_unfull_chunk=True, blocking_timeout_secs=max(1, int(self.timeout_s)),
        )
        metadata = LMCacheMetadata(
            model_name="hyperrag", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
            kv_dtype=torch.uint8, kv_shape=(1, 1, 256, 1, 1),
        )
        # LMCache's worker threads inherit the daemon flag of the thread that creates them: build
        # the manager on a daemon thread so a process that forgets close() can still exit.
        built: dict = {}

        def build() -> None:
            try:
                built["manager"] = StorageManager(config, metadata, EventManager())
            except Exception as err:  # surfaced below, in the caller's thread
                built["error"] = err

        thread = threading.Thread(target=build, daemon=True)
        thread.start()
        thread.join()
        if "error" in built:
            raise StoreError(f"KV store {self.url} could not start: {built['error']}") from built["error"]
        return built["manager"]

    def _guard(self, fn: Callable[[], T], what: str) -> T:
        """Run one LMCache call with a timeout; mark the store down for a while on failure."""
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(f"KV store {self.url} is down (retrying in {self._down_until - time.monotonic():.0f} s)")
        future = self._pool.submit(fn)
        try:
            return future.result(timeout=self.timeout_s)
        except Exception as err:  # timeout, connection refused, anything the backend raises
            future.cancel()
            self._down_until = time.monotonic() + self.backoff_s
            self.stats.errors += 1
            message = f"KV store {self.url} failed on {what}: {type(err).__name__}: {err}"
            log.warning(message)
            self._warn(message)
            raise StoreUnavailable(message) from err

    def _warn(self, message: str) -> None:
        with self._lock:
            self.warnings.append(message)
            del self.warnings[:-20]

    def take_warnings(self) -> list[str]:
        """Warnings since the last call (what the UI and the bench show to the user)."""
        with self._lock:
            taken, self.warnings = self.warnings, []
        return taken

    # -- keys ---------------------------------------------------------------------------------
    def address(self, text: str) -> str:
        doc = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return hashlib.sha256(f"{self.identity}|{self.codec.name}|{doc}".encode()).hexdigest()

    def _key(self, address: str):
        from lmcache.utils import CacheEngineKey

        return CacheEngineKey("hyperrag", 1, 0, int(address[:15], 16), torch.uint8)

    # -- framing ------------------------------------------------------------------------------
    def _frame_header(self, address: str, shape: tuple[int, ...], payload: torch.Tensor) -> bytes:
        crc = google_crc32c.Checksum()
        crc.update(payload.numpy())
        header = json.dumps({"address": address, "codec": self.codec.name, "shape": list(shape),
                             "payload": payload.numel(), "crc32c": crc.hexdigest().decode()}).encode()
        header += b" " * (-(len(MAGIC) + 4 + len(header)) % ALIGN)  # payload starts aligned
        return MAGIC + struct.pack("<I", len(header)) + header

    def _check_frame(self, address: str, data: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor]:
        """Validate a stored entry; return (shape, payload view) or raise ValueError saying why."""
        head = bytes(data[: len(MAGIC) + 4].numpy())
        if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
            raise ValueError("bad magic")
        (hlen,) = struct.unpack("<I", head[len(MAGIC):])
        start = len(MAGIC) + 4 + hlen
        if start > data.numel():
            raise ValueError("truncated header")
        try:
            header = json.loads(bytes(data[len(MAGIC) + 4 : start].numpy()))
        except ValueError:
            raise ValueError("unreadable header") from None
        if header.get("address") != address:
            raise ValueError("entry belongs to another document/model/template/codec")
        if header.get("codec") != self.codec.name:
            raise ValueError(f"codec {header.get('codec')!r}, expected {self.codec.name!r}")
        shape = tuple(header["shape"])
        size = self.codec.nbytes(shape)
        if header.get("payload") != size or data.numel() < start + size:
            raise ValueError("truncated payload")
        payload = data[start : start + size]
        crc = google_crc32c.Checksum()
        crc.update(payload.numpy())
        if crc.hexdigest().decode() != header.get("crc32c"):
            raise ValueError("checksum mismatch")
        return shape, payload

    # -- public API ---------------------------------------------------------------------------
    def put(self, text: str, kv: torch.Tensor) -> int:
        """Encode and store a document KV ``[layers, 2, kv_heads, n, head_dim]``; returns bytes.

        Remote writes finish in the background: :meth:`flush` waits for them."""
        from lmcache.v1.memory_management import MemoryFormat

        address = self.address(text)
        payload = self.codec.encode(kv)
        header = self._frame_header(address, tuple(kv.shape), payload)
        total = len(header) + payload.numel()

        def write() -> None:
            obj = self._manager.allocate(torch.Size([1, 1, total, 1]), torch.uint8, fmt=MemoryFormat.KV_2LTD)
            if obj is None:
                raise MemoryError("LMCache CPU tier has no room for the entry")
            flat = obj.tensor.view(-1)
            flat[: len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
            flat[len(header) : total] = payload
            self._manager.batched_put([self._key(address)], [obj])

        self._guard(write, "put")
        with self._lock:
            self.stats.puts += 1
            self.stats.put_bytes += total
            if self.scheme != "memory":
                self._pending.add(address)
        return total

    def load_into(self, text: str, out: torch.Tensor) -> bool:
        """Decode a stored document KV into ``out``; False on a miss, a bad entry or a down store."""
        address = self.address(text)
        key = self._key(address)
        t0 = time.perf_counter()
        try:
            obj = self._guard(lambda: self._manager.get(key), "get")
        except StoreUnavailable:
            return False
        if obj is None:
            self.stats.misses += 1
            return False
        try:
            shape, payload = self._check_frame(address, obj.tensor.view(-1))
            if shape != tuple(out.shape):
                raise ValueError(f"shape {shape}, expected {tuple(out.shape)}")
            self.codec.decode_into(payload, shape, out)
            nbytes = obj.tensor.numel()
        except (ValueError, KeyError, TypeError) as err:
            self._evict(address, key, str(err))
            return False
        finally:
            obj.ref_count_down()
        with self._lock:
            self.stats.hits += 1
            self.stats.load_bytes += nbytes
            self.stats.load_s += time.perf_counter() - t0
        return True

    def _evict(self, address: str, key, why: str) -> None:
        with self._lock:
            self.stats.corrupt += 1
        self._warn(f"bad KV entry {address[:12]} ({why}): discarded, will be recomputed")
        try:
            self._guard(lambda: self._manager.remove(key), "remove")
        except StoreUnavailable:
            pass

    def contains(self, text: str, durable: bool = False) -> bool:
        """Whether the store holds the document (``durable``: in the backend, not just the CPU tier)."""
        key = self._key(self.address(text))
        where = [REMOTE] if durable and self.scheme != "memory" else None
        return bool(self._guard(lambda: self._manager.contains(key, search_range=where), "contains"))

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait until every put of this process is readable from the backend (not just cached)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                pending = list(self._pending)
            done = [a for a in pending
                    if self._guard(lambda a=a: self._manager.contains(self._key(a), search_range=[REMOTE]), "contains")]
            with self._lock:
                self._pending.difference_update(done)
                if not self._pending:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def describe(self) -> dict:
        return {"url": self.url, "codec": self.codec.name, **asdict(self.stats),
                "load_gb_per_s": self.stats.load_gb_per_s}

    def close(self) -> None:
        try:
            self.flush(timeout_s=self.timeout_s)
        except StoreUnavailable:
            pass
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._manager.close()
