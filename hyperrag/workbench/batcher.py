"""Concurrent requests batched: questions that arrive together share model calls.

Why: on CPU one question's reranker batch (20 short rows) and its reader's decode steps (a few
rows, one token each) leave most of each op's fixed cost unamortised, and the engine runs one
model call at a time: eight users asking at once would pay it eight times, in a queue. A
:class:`Batcher` holds each request for a short window (``batch_window_ms``), groups the waiting
requests that ask the same corpus view in the same mode, and answers each group with one
:meth:`~hyperrag.rag.pipeline.Engine.ask_many`: the reranker scores the pairs of several questions
in shared batches and the reader decodes their rows together. Requests that arrive while a
group runs wait for the next one (so under load groups fill by themselves); the queue is
bounded, and a full queue is an error the caller can show ("busy, try again"). Answers equal
sequential ones up to float rounding; each result's timings gain ``queue`` (seconds waiting
before its group started), and ``total`` counts it.

Other work that batches the same way (the HTTP service's rerank of documents a client sends,
:mod:`hyperrag.serve`) goes through :meth:`Batcher.submit` with its own key and group function,
so every model call of the process still runs from this one queue.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from hyperrag.rag.pipeline import Engine, RAGResult, clean_question
from hyperrag.common.settings import Settings


class Busy(RuntimeError):
    """The request queue is full."""


@dataclass
class Job:
    """One queued request: ``item`` is answered by ``run([items of its group])[its place]``;
    jobs with equal ``key`` may share one ``run`` call."""

    key: Hashable
    item: Any
    run: Callable[[list], Sequence[Any]]
    arrived: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # when its group's call began
    future: Future = field(default_factory=Future)

    @property
    def queue_s(self) -> float:
        return self.started - self.arrived


def question_job(engine: Engine, question: str, mode: str, top_k: int | None = None, top_n: int | None = None,
                 generate: bool = True) -> Job:
    """An :meth:`Engine.ask` as a job. Jobs of views of the same runtime, corpus and index that
    ask the same way share one :meth:`Engine.ask_many` (the app makes a view per request)."""
    key = (id(engine.runtime), id(engine.corpus), id(engine.index), mode, top_k, top_n, generate)
    return Job(key, question, lambda questions: engine.ask_many(questions, mode, top_k, top_n, generate))


@dataclass
class BatchStats:
    groups: int = 0
    requests: int = 0


class Batcher:
    """One worker thread that answers queued requests in groups; shared by every corpus view."""

    def __init__(self, window_ms: float = 10.0, max_group: int = 8, queue_size: int = 64):
        self.window_s = max(0.0, window_ms) / 1000
        self.max_group = max_group
        self.queue_size = queue_size
        self.stats = BatchStats()
        self._queue: queue.Queue[Job | None] = queue.Queue(queue_size)
        self._worker = threading.Thread(target=self._serve, name="hyperrag-batcher", daemon=True)
        self._worker.start()

    @classmethod
    def from_settings(cls, settings: Settings) -> "Batcher":
        return cls(settings.batch_window_ms, settings.batch_requests, settings.queue_size)

    def ask(self, engine: Engine, question: str, mode: str = "reuse", top_k: int | None = None,
            top_n: int | None = None, generate: bool = True) -> RAGResult:
        """:meth:`Engine.ask`, answered together with whatever else is asked meanwhile. A bad
        question fails here, alone; a full queue raises :class:`Busy`."""
        clean_question(question)
        job = self.submit(question_job(engine, question, mode, top_k, top_n, generate))
        result = job.future.result()
        result.timings["queue"] = job.queue_s
        result.timings["total"] += job.queue_s
        return result

    def submit(self, job: Job) -> Job:
        """Queue ``job`` without waiting (its ``future`` gets the answer); :class:`Busy` when full."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"the engine is busy: {self.queue_size} questions are waiting; try again in a moment") from None
        return job

    @property
    def depth(self) -> int:
        """Requests waiting for the worker (not counting the group it is answering)."""
        return self._queue.qsize()

    def close(self, timeout_s: float = 600.0) -> None:
        """Stop the worker once the requests already queued are answered."""
        self._queue.put(None)
        self._worker.join(timeout_s)

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            waiting, stop = [first], False
            deadline = time.perf_counter() + self.window_s
            while len(waiting) < self.queue_size:
                try:
                    request = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if request is None:
                    stop = True
                    break
                waiting.append(request)
            for group in self._groups(waiting):
                self._answer(group)
            if stop:
                return

    def _groups(self, waiting: list[Job]) -> list[list[Job]]:
        """Waiting requests by key, in arrival order, at most ``max_group`` per group."""
        groups: list[list[Job]] = []
        open_group: dict[Hashable, list[Job]] = {}
        for request in waiting:
            group = open_group.get(request.key)
            if group is None or len(group) >= self.max_group:
                group = open_group[request.key] = []
                groups.append(group)
            group.append(request)
        return groups

    def _answer(self, group: list[Job]) -> None:
        started = time.perf_counter()
        for job in group:
            job.started = started
        try:
            results = group[0].run([job.item for job in group])
        except BaseException as err:  # every request of the group learns why
            for job in group:
                job.future.set_exception(err)
            return
        self.stats.groups += 1
        self.stats.requests += len(group)
        for job, result in zip(group, results):
            job.future.set_result(result)
