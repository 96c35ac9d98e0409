"""The service's engine side: one loaded :class:`~hyperrag.rag.pipeline.Engine` (models, store,
the corpus the answer API searches) and one :class:`~hyperrag.workbench.batcher.Batcher` through
which every request's model work runs, so requests that arrive together share model calls.

Rerank requests from any client batch with each other; so do answer requests over sent
documents, and answer requests over the corpus (those go through the engine's ``reader_kv`` mode,
exactly as the UI asks). What a batch computed is written through to the store before the
requests are answered, so the next request, and with a shared lm:// or redis:// store every
other replica, finds it.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import Future
from pathlib import Path
from typing import Sequence

from hyperrag.common.settings import Settings
from hyperrag.rag.pipeline import Engine, RAGResult
from hyperrag.rag.reader import Reading
from hyperrag.rag.texts import TextRanking, answer_texts, rerank_texts
from hyperrag.serve.metrics import Metrics
from hyperrag.workbench.batcher import Batcher, Job, question_job

# What the reader may say beyond the answer (the trust work adds them to Reading); passed through when present.
READING_EXTRAS = ("found", "confidence")


def probability(score: float) -> float:
    """The reranker score logit(yes) - logit(no) as P(yes | yes or no): the [0, 1] relevance
    Cohere- and TEI-style clients expect (and may threshold). Monotone, so rankings are equal."""
    return 0.5 * (1.0 + math.tanh(score / 2))  # the logistic function, without overflow


class NoReader(RuntimeError):
    """The answer API was asked of a service loaded without an adapter (the base model cannot read)."""


class Service:
    def __init__(self, engine: Engine, batcher: Batcher | None = None):
        self.engine = engine
        self.batcher = batcher or Batcher.from_settings(engine.settings)
        self.metrics = Metrics(lambda: self.engine.store, lambda: self.batcher.depth)
        self.replica = f"{os.uname().nodename}:{os.getpid()}"

    @classmethod
    def load(cls, settings: Settings) -> "Service":
        return cls(Engine.load(settings))

    settings = property(lambda self: self.engine.settings)

    @property
    def model_name(self) -> str:
        s = self.settings
        return f"{s.model}+{Path(s.adapter).name}" if s.adapter else s.model

    # -- jobs for the batcher (each returns a Job whose future the HTTP layer awaits) ------------
    def rerank(self, query: str, texts: Sequence[str]) -> Job:
        return self.batcher.submit(Job(("rerank", id(self.engine.runtime)), (query, list(texts)), self._rerank_group))

    def answer_texts(self, query: str, texts: Sequence[str], top_n: int | None) -> Job:
        if self.engine.reader is None:
            raise NoReader("this service was started without an adapter, so it has no reader: use /v1/rerank")
        item = (query, list(texts), top_n or self.settings.top_n)
        return self.batcher.submit(Job(("answer", id(self.engine.runtime)), item, self._answer_group))

    def answer_corpus(self, query: str, top_n: int | None) -> Job:
        if self.engine.reader is None:
            raise NoReader("this service was started without an adapter, so it has no reader: use /v1/rerank")
        return self.batcher.submit(question_job(self.engine, query, "reader_kv", None, top_n))

    def _rerank_group(self, items: list[tuple[str, list[str]]]) -> list[TextRanking]:
        self.metrics.batch_requests.observe(len(items))
        rankings = rerank_texts(self.engine.reranker, self.engine.store, items)
        self._write_through(rankings)
        return rankings

    def _answer_group(self, items: list[tuple[str, list[str], int]]) -> list[tuple[TextRanking, Reading]]:
        self.metrics.batch_requests.observe(len(items))
        results = answer_texts(self.engine.reranker, self.engine.reader, self.engine.store, items)
        self._write_through([ranking for ranking, _ in results])
        return results

    def _write_through(self, rankings: Sequence[TextRanking]) -> None:
        """Wait until what this batch computed is in the store (bounded by the store's timeout),
        so the next request, on any replica, finds it; then count reuse."""
        for ranking in rankings:
            self.metrics.kv.labels("reused").inc(ranking.kv_reused)
            self.metrics.kv.labels("computed").inc(ranking.kv_computed)
        store = self.engine.store
        if any(r.kv_computed for r in rankings) and store.scheme != "memory":
            store.flush(timeout_s=store.timeout_s)

    # -- replies ----------------------------------------------------------------------------------
    def corpus_reply(self, result: RAGResult) -> dict:
        """The answer API's body for an engine result over the corpus."""
        reading = result.reading
        source = None
        if reading is not None and reading.doc >= 0:
            doc = result.docs[reading.doc]
            where = doc.source or {}
            source = {"doc_id": doc.id, "start": reading.start, "end": reading.end,
                      "file": where.get("file"), "page": where.get("page")}
        return {"answer": result.answer, "source": source,
                "ranking": [{"doc_id": d.id, "score": d.score} for d in result.docs],
                "warnings": result.warnings, **self.reading_extras(reading)}

    @staticmethod
    def reading_extras(reading: Reading | None) -> dict:
        return {name: getattr(reading, name) for name in READING_EXTRAS if getattr(reading, name, None) is not None}

    def close(self) -> None:
        """Stop taking work (queued requests are answered); the engine is its owner's to close."""
        self.batcher.close()
