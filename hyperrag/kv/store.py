"""The document KV store: LMCache storage underneath, content-addressed entries on top.

Each entry is one document's KV (on the shared instruction prefix), encoded by a codec, keyed
by its content address and framed with its shape, codec and CRC32C (the format and the key live
in :mod:`hyperrag.kv.frame`); an entry that fails any check is never used: it is counted
(``stats.corrupt``), evicted from the CPU tier and the backend, and reported as a miss, so the
caller recomputes and rewrites it.

Backends by URL: ``fs://DIR`` (embedded default, persists across restarts), ``lm://HOST:PORT``
(LMCache server), ``redis://HOST:PORT``, ``memory://`` (the CPU tier alone). LMCache pieces do
the work: its ``StorageManager`` provides the event loop and the CPU tier (allocator + hot LRU
cache in front of the backend); LMCache's connector for the URL moves the bytes.

Why the connector is driven directly rather than through LMCache's ``RemoteBackend``:
``RemoteBackend`` turns every backend error into a silent miss (``contains`` -> False,
``get`` -> None, failed puts only logged), its ``contains`` waits without a timeout, and the
``lm://`` connection is never re-established after the server restarts. Here every remote call
has a timeout and raises on failure, so the store can tell "not there" from "not reachable":

- a failure marks the store down (one warning per outage; ``take_warnings`` keeps saying so
  while it lasts); calls fail fast while down and the reranker computes the KV itself;
- a daemon thread reconnects after ``backoff_s`` (a fresh LMCache connector), then drains the
  retry queue: entries written while the store was down (bounded by ``retry_queue_mb``; the
  overflow is dropped, counted and recomputed on a later query), so nothing computed is lost;
- a write counts as done only when the backend has it (fs: file renamed into place; redis:
  acknowledged; lm: a follow-up EXIST on the same connection, as LMCache's PUT has no reply);
  a failed write goes back to the retry queue.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import socket
import threading
import time
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from hyperrag.kv.codec import Codec
from hyperrag.kv.frame import content_address, frame, unframe
from hyperrag.kv.urls import StoreError, parse_store_url, redact_url


log = logging.getLogger("hyperrag.store")


class _FullTierNotice(logging.Filter):
    """Drops LMCache's "Failed to allocate memory block" warning: LMCache logs it whenever the CPU
    tier is full and then evicts its oldest entry, which is the normal state of a tier the memory
    budget sized below the corpus (the app logged it on most questions)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to allocate memory block")


logging.getLogger("lmcache.v1.memory_management").addFilter(_FullTierNotice())
READ_WINDOW = 4  # backend reads in flight while a batch of entries is checked and decoded
STALE_TMP_S = 600  # fs://: leftover ``*.tmp`` files of killed writers older than this are removed
T = TypeVar("T")


class StoreUnavailable(StoreError):
    """The store did not answer in time or failed; the caller computes instead."""


@dataclass
class StoreStats:
    puts: int = 0  # entries written (or queued for writing) by this process
    put_bytes: int = 0
    hits: int = 0
    hot_hits: int = 0  # hits served by the in-process CPU tier
    misses: int = 0  # not stored (including lookups skipped while the store was down)
    corrupt: int = 0  # entries that failed a check: never used, evicted, recomputed
    errors: int = 0  # failed or timed-out backend calls
    retried: int = 0  # entries written after the store came back
    dropped: int = 0  # entries not written: store down and retry queue full (recomputed later)
    reconnects: int = 0
    load_bytes: int = 0  # stored bytes read and decoded
    load_s: float = 0.0  # wall seconds with a load in flight (concurrent loads counted once)

    @property
    def load_gb_per_s(self) -> float:
        return self.load_bytes / self.load_s / 1e9 if self.load_s else 0.0


class KVStore:
    """Per-document KV entries in LMCache. Thread-safe; every backend call bounded in time."""

    def __init__(self, url: str, codec: Codec, identity: str, hot_cache_gb: float = 2.0,
                 timeout_s: float = 5.0, backoff_s: float = 10.0, retry_queue_mb: float = 256.0,
                 max_inflight_mb: float = 64.0):
        self.url = url
        self.display_url = redact_url(url)  # for messages, logs and the UI: no password
        self.scheme, self._remote_url = parse_store_url(url)
        self.codec = codec
        self.identity = identity
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.stats = StoreStats()
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)  # notified when writes finish
        self._events: list[str] = []
        self._hot = hot_cache_gb > 0 or self.scheme == "memory"
        self.hot_cache_gb = max(hot_cache_gb, 0.0)  # the CPU tier's size for entries (GB)
        self._manager = self._make_manager(hot_cache_gb, max_inflight_mb)
        self._loop: asyncio.AbstractEventLoop = self._manager.loop
        self._cpu = self._manager.local_cpu_backend
        self._conn: Any = None  # the LMCache connector (unwrapped) for fs/lm/redis
        self._io_lock: asyncio.Lock | None = None  # lm://: one request at a time on its socket
        self._up = self.scheme == "memory"
        self._down_since = 0.0
        self._last_attempt = 0.0
        self._down_reason = ""
        self._inflight: dict[str, int] = {}  # address -> bytes, writes submitted, not confirmed
        self._retry: OrderedDict[str, torch.Tensor] = OrderedDict()  # address -> framed bytes
        self._retry_bytes = 0
        self._retry_limit = int(retry_queue_mb * 2**20)
        self._inflight_limit = int(max_inflight_mb * 2**20)
        self._closed = False
        self._loading, self._loads_since = 0, 0.0  # loads in flight, since when (_load_clock)
        self._tier_refusals = 0  # reads the CPU tier had no room for (every object in it in use)
        self._wake = threading.Event()
        self._prober: threading.Thread | None = None
        if self.scheme != "memory":
            if self.scheme == "fs":
                self._clean_stale_tmp()
            try:
                self._connect()
                self._up = True
            except Exception as err:  # unreachable at start-up: keep answering, retry later
                self._mark_down("start-up", err)
            self._start_prober()

    # -- LMCache plumbing ---------------------------------------------------------------------
    def _make_manager(self, hot_cache_gb: float, max_inflight_mb: float):
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.event_manager import EventManager
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.storage_manager import StorageManager

        # The CPU allocator holds the hot tier plus entries in flight (writes, fresh reads). LMCache
        # allocates (and touches) all of it up front: this is the store's resident memory.
        size_gb = max(hot_cache_gb, 0.0) + (max_inflight_mb + 32) / 1024
        self._capacity = int(size_gb * 2**30)
        self._config = LMCacheEngineConfig.from_defaults(
            chunk_size=256, local_cpu=self._hot, max_local_cpu_size=size_gb, remote_url=None,
            remote_serde="naive", save_unfull_chunk=True, blocking_timeout_secs=max(1, int(self.timeout_s)),
        )
        self._metadata = LMCacheMetadata(
            model_name="hyperrag", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
            kv_dtype=torch.uint8, kv_shape=(1, 1, 256, 1, 1),
        )
        # LMCache's worker threads inherit the daemon flag of the thread that creates them: build
        # the manager on a daemon thread so a process that forgets close() can still exit.
        built: dict = {}

        def build() -> None:
            try:
                built["manager"] = StorageManager(self._config, self._metadata, EventManager())
            except Exception as err:  # surfaced below, in the caller's thread
                built["error"] = err

        thread = threading.Thread(target=build, daemon=True)
        thread.start()
        thread.join()
        if "error" in built:
            raise StoreError(f"KV store {self.display_url} could not start: {built['error']}") from built["error"]
        return built["manager"]

    def _connect(self) -> None:
        """(Re)create LMCache's connector for the URL and check that the backend answers."""
        from lmcache.v1.storage_backend.connector import CreateConnector

        self._drop_connection()

        def create():
            guarded = _GuardedAllocator(self._cpu, self._capacity, self._tier_refused)
            conn = CreateConnector(self._remote_url, self._loop, guarded, self._config, self._metadata)
            return conn.getWrappedConnector() if hasattr(conn, "getWrappedConnector") else conn

        conn = _in_daemon_thread(create, self.timeout_s, "connect")

        async def probe() -> None:
            await conn.exists(self._key("0" * 64))
            return asyncio.Lock() if self.scheme == "lm" else None  # made on LMCache's loop

        self._conn = conn
        try:
            self._io_lock = self._run(probe(), serialize=False)  # a stuck old request must not block it
        except Exception:
            self._drop_connection()  # also stops the connector's tasks (redis:// workers)
            raise

    def _drop_connection(self) -> cf.Future | None:
        """Forget the connector; close it without waiting (and without its own ``close``: the
        lm:// one waits on a lock a stuck request may hold, the redis:// one blocks the event
        loop on itself in LMCache 0.5.6)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return None
        sock = getattr(conn, "client_socket", None)
        if isinstance(sock, socket.socket):  # lm://: also unblocks a read stuck on a frozen server
            for step in (lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
                try:
                    step()
                except OSError:
                    pass
        client, executor = getattr(conn, "connection", None), getattr(conn, "pq_executor", None)
        if client is not None and hasattr(client, "aclose"):  # redis://

            async def close_redis() -> None:
                if executor is not None:
                    await executor.shutdown_async(wait=False)
                await client.aclose()

            return asyncio.run_coroutine_threadsafe(close_redis(), self._loop)  # not awaited here
        return None

    def _schedule(self, coro, serialize: bool = True) -> cf.Future:
        """Start a coroutine on LMCache's event loop (serialized on lm://, whose connector shares
        one socket and can interleave a reply with another request's)."""
        lock = self._io_lock if serialize else None

        async def guarded():
            if lock is None:
                return await coro
            async with lock:
                return await coro

        return asyncio.run_coroutine_threadsafe(guarded(), self._loop)

    def _run(self, coro, serialize: bool = True):
        """Run a coroutine on LMCache's event loop, bounded by ``timeout_s``."""
        future = self._schedule(coro, serialize)
        try:
            return future.result(timeout=self.timeout_s)
        except cf.TimeoutError as err:
            future.cancel()
            raise TimeoutError(f"no answer within {self.timeout_s:g} s") from err

    def _wait(self, what: str, future: cf.Future):
        """The result of a scheduled backend operation. Raises StoreUnavailable (store marked down)."""
        try:
            return future.result(timeout=self.timeout_s)
        except Exception as err:  # timeout, refused, reset, anything the connector raises
            future.cancel()
            if isinstance(err, cf.TimeoutError):
                err = TimeoutError(f"no answer within {self.timeout_s:g} s")
            self._mark_down(what, err)
            raise StoreUnavailable(self._down_message()) from err

    def _start(self, what: str, op: Callable[[Any], Any]) -> cf.Future:
        """Start one backend operation (``op(connector)`` returns a coroutine); its result comes
        from :meth:`_wait`. Raises StoreUnavailable."""
        conn = self._conn
        if not self._up or conn is None:
            raise StoreUnavailable(self._down_message())
        try:
            return self._schedule(op(conn))
        except Exception as err:  # noqa: BLE001 - a connector that cannot even start the call
            self._mark_down(what, err)
            raise StoreUnavailable(self._down_message()) from err

    def _call(self, what: str, op: Callable[[Any], Any]):
        """One backend operation, waited for. Raises StoreUnavailable."""
        return self._wait(what, self._start(what, op))

    # -- health, warnings ---------------------------------------------------------------------
    def _mark_down(self, what: str, err: BaseException) -> None:
        with self._lock:
            self.stats.errors += 1
            if not self._up and self._down_since:
                return
            self._up = False
            self._down_since = self._last_attempt = time.monotonic()
            self._down_reason = f"{what}: {type(err).__name__}: {err}"
            message = (f"KV store {self.display_url} is unavailable ({self._down_reason}); document KV is computed "
                       f"in-process and written when it is back (retrying every {self.backoff_s:g} s)")
            self._events.append(message)
            del self._events[:-20]
        log.warning("%s", message)
        self._drop_connection()
        self._wake.set()

    def _down_message(self) -> str:
        return f"KV store {self.display_url} is unavailable ({self._down_reason})"

    @property
    def available(self) -> bool:
        return self._up

    def _event(self, message: str, level: int = logging.WARNING) -> None:
        log.log(level, "%s", message)
        with self._lock:
            self._events.append(message)
            del self._events[:-20]

    def take_warnings(self) -> list[str]:
        """Warnings since the last call, plus a standing one while the store is down (what the UI
        banner, the bench and the logs show)."""
        with self._lock:
            taken, self._events = self._events, []
            if not self._up and self.scheme != "memory":
                standing = (f"KV store {self.display_url} is still unavailable (for {time.monotonic() - self._down_since:.0f} s); "
                            f"{len(self._retry)} computed entries wait to be written")
                if not any(w.startswith(f"KV store {self.display_url} is unavailable") for w in taken):
                    taken.append(standing)
        return taken

    def note(self, message: str) -> None:
        """Attach a warning to the store (the next ``take_warnings`` reports it): why it stands in."""
        self._event(message)

    # -- the reconnect / retry thread ---------------------------------------------------------
    def _start_prober(self) -> None:
        self._prober = threading.Thread(target=self._probe_loop, name="kvstore-retry", daemon=True)
        self._prober.start()

    def _probe_loop(self) -> None:
        while not self._closed:
            self._wake.wait(timeout=min(self.backoff_s, 1.0))
            self._wake.clear()
            if self._closed:
                return
            if not self._up:
                if time.monotonic() - self._last_attempt < self.backoff_s:
                    continue
                self._last_attempt = time.monotonic()
                try:
                    self._connect()
                except Exception as err:  # still down
                    with self._lock:
                        self.stats.errors += 1
                        self._down_reason = f"reconnect: {type(err).__name__}: {err}"
                    continue
                with self._lock:
                    self._up = True
                    self._down_since = 0.0
                    self.stats.reconnects += 1
                    queued = len(self._retry)
                self._event(f"KV store {self.display_url} is back; writing {queued} queued entries", logging.INFO)
            if self._up and self._retry:
                self._drain()

    def _drain(self) -> None:
        while self._up and not self._closed:
            with self._lock:
                if not self._retry:
                    return
                address, data = self._retry.popitem(last=False)
                self._retry_bytes -= data.numel()
            obj = self._alloc(data.numel())
            if obj is None:  # CPU tier full of live objects: try again later
                self._enqueue(address, data)
                return
            obj.tensor.view(-1)[: data.numel()] = data
            self._submit(address, obj)
            obj.ref_count_down()
            with self._lock:
                self.stats.retried += 1

    # -- keys ---------------------------------------------------------------------------------
    def address(self, text: str) -> str:
        return content_address(self.identity, self.codec, text)

    @staticmethod
    def _key(address: str):
        from lmcache.utils import CacheEngineKey

        return CacheEngineKey("hyperrag", 1, 0, int(address[:15], 16), torch.uint8)

    # -- writes -------------------------------------------------------------------------------
    def _alloc(self, nbytes: int):
        from lmcache.v1.memory_management import MemoryFormat

        return self._cpu.allocate(torch.Size([1, 1, nbytes, 1]), torch.uint8, fmt=MemoryFormat.KV_2LTD,
                                  eviction=True, busy_loop=False)

    def put(self, text: str, kv: torch.Tensor) -> int:
        """Encode and store a document KV ``[layers, 2, kv_heads, n, head_dim]``; returns bytes.

        Never raises for an unavailable store: the entry goes to the CPU tier and, for a remote
        backend, is written in the background (queued while the store is down). :meth:`flush`
        waits until the backend has everything."""
        address = self.address(text)
        payload = self.codec.encode(kv)
        header = frame(address, self.codec, tuple(kv.shape), payload)
        total = len(header) + payload.numel()
        obj = self._alloc(total)
        if obj is None:  # the CPU tier is full of live objects: keep a plain copy for the backend
            data = torch.empty(total, dtype=torch.uint8)
            data[: len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
            data[len(header) :] = payload
            if self.scheme != "memory":
                self._enqueue(address, data)
        else:
            flat = obj.tensor.view(-1)
            flat[: len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
            flat[len(header) : total] = payload
            key = self._key(address)
            if self._hot:
                self._cpu.remove(key)  # a stale copy (if any) never shadows the new one
                self._cpu.submit_put_task(key, obj)
            if self.scheme != "memory":
                self._write(address, obj)
            obj.ref_count_down()
        with self._lock:
            self.stats.puts += 1
            self.stats.put_bytes += total
        return total

    def _write(self, address: str, obj) -> None:
        """Write a framed entry to the backend now, or queue it while the store is down."""
        if not self._up or self._conn is None:
            self._enqueue(address, obj.tensor.view(-1).clone())
            return
        with self._lock:  # back-pressure: bounded bytes in flight
            deadline = time.monotonic() + self.timeout_s
            while sum(self._inflight.values()) > self._inflight_limit and time.monotonic() < deadline:
                self._idle.wait(timeout=0.05)
        self._submit(address, obj)

    def _submit(self, address: str, obj) -> None:
        conn, key, nbytes = self._conn, self._key(address), obj.tensor.numel()
        if conn is None:
            self._enqueue(address, obj.tensor.view(-1).clone())
            return
        lock, lm = self._io_lock, self.scheme == "lm"

        async def write() -> None:
            async def once() -> None:
                await conn.put(key, obj)
                if lm and not await conn.exists(key):  # LMCache's PUT has no reply: confirm
                    raise OSError("the lm server did not keep the entry")

            if lock is None:
                await once()
            else:
                async with lock:
                    await once()

        obj.ref_count_up()  # held until the write is done (or its bytes are queued again)
        with self._lock:
            self._inflight[address] = nbytes
        future = asyncio.run_coroutine_threadsafe(write(), self._loop)
        future.add_done_callback(lambda f: self._write_done(address, obj, f))

    def _write_done(self, address: str, obj, future: cf.Future) -> None:
        try:
            error = future.exception() if not future.cancelled() else TimeoutError("write cancelled")
        except Exception as err:  # noqa: BLE001
            error = err
        if error is not None:
            self._enqueue(address, obj.tensor.view(-1).clone())
            self._mark_down("put", error)
        obj.ref_count_down()
        with self._lock:
            self._inflight.pop(address, None)
            self._idle.notify_all()

    def _enqueue(self, address: str, data: torch.Tensor) -> None:
        with self._lock:
            if address in self._retry:
                return
            if self._retry_bytes + data.numel() > self._retry_limit:
                self.stats.dropped += 1
                if self.stats.dropped == 1 or self.stats.dropped % 100 == 0:
                    self._events.append(f"KV store {self.display_url}: retry queue full ({self._retry_limit / 2**20:.0f} MiB); "
                                        f"{self.stats.dropped} entries not kept, they will be recomputed when needed")
                return
            self._retry[address] = data
            self._retry_bytes += data.numel()
        self._wake.set()

    # -- reads --------------------------------------------------------------------------------
    def _fetch(self, address: str, hot: bool = True):
        """The stored MemoryObj for ``address`` (caller drops the reference) or None; raises
        StoreUnavailable when the backend cannot be asked."""
        if hot and self._hot:
            obj = self._cpu.get_blocking(self._key(address))
            if obj is not None:
                return obj, True
        if self.scheme == "memory":
            return None, False
        obj = self._call("get", lambda c: c.get(self._key(address)))
        return (obj if obj is not None else self._read_again(address)), False

    def _read_again(self, address: str):
        """After a get found nothing: the entry may have been written by another process just
        now, be there but unreadable (short file, bad metadata), or the CPU tier may have had no
        room to read it into; a second read tells which. Only an unreadable entry is evicted: one
        that found no room is a miss this time and stays stored."""
        key = self._key(address)
        if not self._call("exists", lambda c: c.exists(key)):
            return None
        refusals = self._tier_refusals
        obj = self._call("get", lambda c: c.get(key))
        if obj is None and self._tier_refusals == refusals:
            self._evict(address, "unreadable entry (truncated or damaged)")
        return obj

    def _tier_refused(self) -> None:
        with self._lock:
            self._tier_refusals += 1

    def load_into(self, text: str, out: torch.Tensor) -> bool:
        """Decode a stored document KV into ``out``; False on a miss, a bad entry or a down store."""
        return self.load_many([text], [out])[0]

    def load_many(self, texts: Sequence[str], outs: Sequence[torch.Tensor]) -> list[bool]:
        """:meth:`load_into` for a batch. Entries in the CPU tier are decoded at once; backend
        reads are kept ``READ_WINDOW`` in flight, so reading the next entries overlaps checking
        and decoding the one that arrived."""
        with self._load_clock():
            addresses = [self.address(t) for t in texts]
            loaded = [0] * len(texts)  # bytes decoded per entry, 0 = not loaded
            cold = []
            for i, address in enumerate(addresses):
                obj = self._cpu.get_blocking(self._key(address)) if self._hot else None
                if obj is None:
                    cold.append(i)
                else:
                    loaded[i] = self._decode(address, obj, outs[i], from_hot=True)
            hot_hits = sum(n > 0 for n in loaded)
            misses = len(cold) if self.scheme == "memory" else self._load_cold(addresses, outs, cold, loaded)
        with self._lock:
            self.stats.misses += misses
            self.stats.hot_hits += hot_hits
            self.stats.hits += sum(n > 0 for n in loaded)
            self.stats.load_bytes += sum(loaded)
        return [n > 0 for n in loaded]

    @contextmanager
    def _load_clock(self) -> Iterator[None]:
        """Adds to ``stats.load_s`` the wall time during which any load is in flight: the
        reranker's row streams load at once, and time they overlap counts once."""
        with self._lock:
            if not self._loading:
                self._loads_since = time.perf_counter()
            self._loading += 1
        try:
            yield
        finally:
            with self._lock:
                self._loading -= 1
                if not self._loading:
                    self.stats.load_s += time.perf_counter() - self._loads_since

    def _load_cold(self, addresses: list[str], outs: Sequence[torch.Tensor], todo: list[int], loaded: list[int]) -> int:
        """Read entries ``todo`` from the backend into ``outs``; returns the number not found
        (a down store: every one not read yet)."""
        futures: deque[cf.Future] = deque()

        def start(n: int) -> None:
            if n < len(todo):
                key = self._key(addresses[todo[n]])
                futures.append(self._start("get", lambda c: c.get(key)))

        misses = done = 0
        try:
            for n in range(READ_WINDOW):
                start(n)
            for n, i in enumerate(todo):
                obj = self._wait("get", futures.popleft())
                start(n + READ_WINDOW)
                if obj is None:
                    obj = self._read_again(addresses[i])
                if obj is None:
                    misses += 1
                else:
                    loaded[i] = self._decode(addresses[i], obj, outs[i], from_hot=False)
                done += 1
        except StoreUnavailable:
            misses += len(todo) - done
        finally:
            for future in futures:  # abandoned reads: release what they bring back
                future.cancel()
                future.add_done_callback(_release_result)
        return misses

    def _decode(self, address: str, obj, out: torch.Tensor, from_hot: bool) -> int:
        """Check an entry (CPU-tier copies too: RAM can flip bits) and decode it into ``out``;
        returns its stored bytes (0: bad entry, evicted). Drops the caller's reference to ``obj``."""
        try:
            data = obj.tensor.view(-1)
            shape, payload = unframe(data, address, self.codec)
            if shape != tuple(out.shape):
                raise ValueError(f"shape {shape}, expected {tuple(out.shape)}")
            self.codec.decode_into(payload, shape, out)
            if not from_hot and self._hot:
                self._cpu.submit_put_task(self._key(address), obj)  # promote (validated) entry
            return payload.storage_offset() - data.storage_offset() + payload.numel()
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            self._evict(address, str(err))
            return 0
        finally:
            obj.ref_count_down()

    def check(self, text: str) -> bool:
        """Whether the backend holds a complete, valid entry (frame and checksum, no decode); a
        bad one is evicted. Raises StoreUnavailable when the backend cannot be asked."""
        address = self.address(text)
        obj, _ = self._fetch(address, hot=self.scheme == "memory")
        if obj is None:
            return False
        try:
            unframe(obj.tensor.view(-1), address, self.codec)
            return True
        except ValueError as err:
            self._evict(address, str(err))
            return False
        finally:
            obj.ref_count_down()

    def _evict(self, address: str, why: str) -> None:
        """Forget a bad entry everywhere we can (CPU tier, backend); it is rewritten on recompute."""
        key = self._key(address)
        with self._lock:
            self.stats.corrupt += 1
        self._event(f"bad KV entry {address[:12]} in {self.display_url} ({why}): discarded, will be recomputed")
        self._cpu.remove(key)
        if self.scheme == "memory" or not self._up:
            return
        conn = self._conn
        try:
            if self.scheme == "fs":
                _in_daemon_thread(lambda: conn.remove_sync(key), self.timeout_s, "remove")
            elif self.scheme == "redis":
                name = key.to_string()
                self._run(conn.connection.delete(name + "kv_bytes", name + "metadata"))
            # lm://: LMCache's server has no delete; the recomputed entry overwrites it.
        except Exception as err:  # noqa: BLE001 - a failed delete only delays the rewrite
            log.warning("could not delete bad entry %s: %s", address[:12], err)

    def contains(self, text: str, durable: bool = False) -> bool:
        """Whether the store holds the document (``durable``: in the backend, not just the CPU
        tier). Raises StoreUnavailable when the backend cannot be asked."""
        address = self.address(text)
        key = self._key(address)
        if self._hot and (not durable or self.scheme == "memory") and self._cpu.contains(key):
            return True
        if self.scheme == "memory":
            return False
        return bool(self._call("exists", lambda c: c.exists(key)))

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Entries not yet in the backend (in flight or queued)."""
        with self._lock:
            return len(self._inflight) + len(self._retry)

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait until every entry written by this process is in the backend (or ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._inflight or self._retry:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if self._retry and self._up:
                    self._wake.set()
                self._idle.wait(timeout=min(left, 0.05))
        return True

    def describe(self) -> dict:
        with self._lock:
            return {"url": self.display_url, "codec": self.codec.spec, "available": self._up, "queued": len(self._retry),
                    "in_flight": len(self._inflight), "cpu_tier_gb": self.hot_cache_gb, **asdict(self.stats),
                    "load_gb_per_s": self.stats.load_gb_per_s}

    def close(self) -> None:
        if self._closed:
            return
        if self.scheme != "memory" and not self.flush(timeout_s=self.timeout_s if self._up else 0):
            log.warning("KV store %s closed with %d entries not written", self.display_url, self.pending)
        self._closed = True
        self._wake.set()
        closing = self._drop_connection()
        if closing is not None:  # let the connector's tasks finish before the loop stops
            try:
                closing.result(timeout=min(self.timeout_s, 2.0))
            except Exception:  # noqa: BLE001 - best effort
                pass
        closer = threading.Thread(target=self._manager.close, daemon=True)
        closer.start()
        closer.join(timeout=self.timeout_s)

    @property
    def folder(self) -> Path | None:
        """The folder of an ``fs://`` store (None for the others)."""
        return Path(self._remote_url.removeprefix("fs://host:0")) if self.scheme == "fs" else None

    def _clean_stale_tmp(self) -> None:
        folder = self.folder
        now = time.time()
        for tmp in folder.glob("*.tmp"):
            try:
                if now - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink()
            except OSError:
                pass


class _GuardedAllocator:
    """The CPU tier as LMCache's connectors see it: they allocate the object for an entry they
    read from the size in the stored metadata, and ``LocalCPUBackend.allocate`` retries forever
    (a busy loop on the event loop thread) when the size cannot fit. A damaged or foreign entry
    could ask for anything: here a size beyond the tier is refused at once and a full tier
    returns None (a miss, reported to ``refused``) instead of waiting."""

    def __init__(self, backend, capacity: int, refused: Callable[[], None]):
        self._backend = backend
        self._capacity = capacity
        self._refused = refused

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def allocate(self, shapes, dtypes, fmt=None, eviction: bool = True, busy_loop: bool = True):
        shape_list = shapes if isinstance(shapes, list) else [shapes]
        dtype_list = dtypes if isinstance(dtypes, list) else [dtypes] * len(shape_list)
        size = 0
        for shape, dtype in zip(shape_list, dtype_list):
            n = 1
            for dim in shape:
                n *= int(dim)
            size += n * torch.empty((), dtype=dtype).element_size()
        if not 0 < size <= self._capacity:
            raise ValueError(f"stored metadata asks for {size} bytes (CPU tier: {self._capacity})")
        obj = self._backend.allocate(shapes, dtypes, fmt, eviction=eviction, busy_loop=False)
        if obj is None:
            self._refused()
        return obj


def _release_result(future: cf.Future) -> None:
    """Done-callback of an abandoned read: drop the reference to the object it returned."""
    if not future.cancelled() and future.exception() is None and future.result() is not None:
        future.result().ref_count_down()


def _in_daemon_thread(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run a blocking call (a TCP connect, a file delete) with a timeout on a daemon thread, so
    a call that never returns can neither block the caller nor keep the process from exiting."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            box["error"] = err

    thread = threading.Thread(target=target, name=f"kvstore-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what}: no answer within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]
