"""The RAG pipeline: retrieve -> rerank -> answer, one engine object for every front door.

Modes (:mod:`hyperrag.rag.modes`; one parameter, same candidates):

- ``retrieval``: traditional RAG, the retriever's top-n go straight to the generator;
- ``baseline``: the reranker runs full prefill on every (question, document) pair;
- ``prefix``: full prefill with the shared instruction prefix cached (prefix caching);
- ``reuse``: the reranker loads each document's stored KV and runs only the question;
- ``retrieval_reader``: no rerank, the reader over the retriever's top-n (the reranker's own
  share of the answer quality is ``reader_kv`` against this);
- ``reader_full``: full-prefill rerank, then the reader over the top-n documents, computing
  their KV (no store);
- ``reader_kv``: KV-reuse rerank, then the reader on the same stored document KV and on the
  question KV the rerank just computed: no document token is computed at query time, and the
  question once.

The first four answer with the traditional generator over the concatenated top-n; the reader
modes read each document in its own row and pick one answer (:mod:`hyperrag.rag.reader`); after
a rerank with the adapter each document gets a calibrated relevance and the answer a confidence,
and the reader declines below its threshold (:mod:`hyperrag.rag.calibration`): the answer is then
"Not found in these documents." with ``found`` False, the closest passages first in ``docs``.
Every answer carries its stage timings (retrieve, kv_load, rerank, generate) and warnings.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from hyperrag.data.corpus import Corpus, load_corpus
from hyperrag.rag.calibration import NOT_FOUND
from hyperrag.rag.modes import ENGINE_MODES, mode as mode_spec
from hyperrag.rag.precompute import PrecomputeReport, precompute
from hyperrag.rag.reader import Reading
from hyperrag.rag.rerank import RerankResult, fuse_scores
from hyperrag.rag.retrieval import DenseIndex
from hyperrag.rag.runtime import Runtime
from hyperrag.common.settings import Settings

log = logging.getLogger("hyperrag")
MAX_QUESTION_CHARS = 2000
Progress = Callable[[int, int], None]


class QuestionError(ValueError):
    """A question that cannot be asked (empty)."""


@dataclass
class RankedDoc:
    id: str
    title: str
    text: str
    score: float  # reranker score (+ retrieval_weight x cosine); retrieval mode: cosine similarity
    rank: int  # 1-based rank after reranking
    retrieval_rank: int  # 1-based rank from the retriever
    source: dict | None = None  # where an ingested passage came from: file, page (PDF), character span
    relevance: float | None = None  # calibrated P(this passage answers the question); None: not calibrated


@dataclass
class RAGResult:
    question: str
    mode: str
    answer: str
    docs: list[RankedDoc]  # all candidates in final order; the first top_n went to the generator
    top_n: int
    timings: dict[str, float]  # seconds: retrieve, kv_load, rerank, generate, total
    warnings: list[str] = field(default_factory=list)
    rerank: RerankResult | None = None
    reading: Reading | None = None  # reader modes: every row's candidate answer, the chosen span
    found: bool = True  # False: the reader declined (``answer`` says so; ``reading.answer`` was its guess)
    confidence: float | None = None  # the reader's calibrated confidence in its answer


    @property
    def ranked_ids(self) -> list[str]:
        return [d.id for d in self.docs]


def clean_question(question: str) -> tuple[str, list[str]]:
    """Strip and bound a question; an empty one is an error, a very long one is cut with a notice."""
    question = (question or "").strip()
    if not question:
        raise QuestionError("the question is empty: type a question")
    if len(question) > MAX_QUESTION_CHARS:
        return question[:MAX_QUESTION_CHARS], [f"question cut to {MAX_QUESTION_CHARS} characters"]
    return question, []


class Engine:
    """A light per-corpus view: the process's :class:`~hyperrag.rag.runtime.Runtime` (models,
    reranker, reader, generator, store), one corpus and its retrieval index. Views are cheap,
    so the app makes one per corpus and request; they share the runtime. Thread-safe."""

    def __init__(self, runtime: Runtime, corpus: Corpus, index: DenseIndex):
        self.runtime = runtime
        self.corpus = corpus
        self.index = index

    @classmethod
    def load(cls, settings: Settings | None = None, corpus: Corpus | None = None, with_generator: bool = True,
             progress: Progress | None = None) -> "Engine":
        """Load a runtime for ``settings`` and a view of ``corpus`` (default ``settings.corpus``)."""
        s = settings or Settings.from_env()
        corpus = corpus or load_corpus(s.folder("corpus"))
        runtime = Runtime.load(s, with_generator, [d.text for d in corpus.docs])
        return cls(runtime, corpus, runtime.index(corpus, progress))

    # The runtime's parts, read at call time (a reconfigured runtime is seen by every view).
    settings = property(lambda self: self.runtime.settings)
    reranker = property(lambda self: self.runtime.reranker)
    reader = property(lambda self: self.runtime.reader)
    generator = property(lambda self: self.runtime.generator)
    store = property(lambda self: self.runtime.store)

    def precompute(self, progress: Progress | None = None) -> PrecomputeReport:
        return precompute(self.reranker, self.store, [d.text for d in self.corpus.docs], progress)

    def retrieve(self, question: str, k: int) -> list[tuple[str, float]]:
        return self.index.search(question, k)

    def ask(self, question: str, mode: str = "reuse", top_k: int | None = None, top_n: int | None = None,
            generate: bool = True) -> RAGResult:
        """Answer one question in one mode, timing each stage."""
        return self.ask_many([question], mode, top_k, top_n, generate)[0]

    def ask_many(self, questions: Sequence[str], mode: str = "reuse", top_k: int | None = None,
                 top_n: int | None = None, generate: bool = True) -> list[RAGResult]:
        """Answer several questions in one mode together: the reranker scores all their pairs
        in shared batches and the reader decodes all their rows together (concurrent users,
        :mod:`hyperrag.workbench.batcher`); the traditional generator answers them in turn. Each result
        equals asking alone up to float rounding; its stage timings are the whole call's."""
        spec = mode_spec(mode)
        if spec.name not in ENGINE_MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {ENGINE_MODES}")
        mode = spec.name
        if not questions:
            return []
        cleaned = [clean_question(q) for q in questions]
        questions = [q for q, _ in cleaned]
        top_k = top_k or self.settings.top_k
        top_n = min(top_n or self.settings.top_n, top_k)
        timings = {"retrieve": 0.0, "kv_load": 0.0, "rerank": 0.0, "generate": 0.0}
        warnings = [list(notes) for _, notes in cleaned]
        t0 = time.perf_counter()
        hits = [self.index.search(q, top_k) for q in questions]
        timings["retrieve"] = time.perf_counter() - t0
        docs = [[self.corpus.by_id[doc_id] for doc_id, _ in h] for h in hits]
        reranks: list[RerankResult | None] = [None] * len(questions)
        if spec.rerank is None:
            scores = [[cos for _, cos in h] for h in hits]
        else:
            keep = spec.rerank == "reuse" and spec.read == "kv" and generate  # the reader continues from it
            reranks = self.reranker.score_many([(q, [d.text for d in ds]) for q, ds in zip(questions, docs)],
                                               spec.rerank, self.store if spec.rerank == "reuse" else None, keep)
            weight = self.runtime.retrieval_weight  # score fusion: w tuned with the adapter, on SQuAD train
            scores = [fuse_scores(r.scores, [cos for _, cos in h], weight) if weight else r.scores
                      for r, h in zip(reranks, hits)]
            timings["kv_load"], timings["rerank"] = reranks[0].load_s, reranks[0].compute_s
            for notes, r in zip(warnings, reranks):
                notes += r.warnings
        trust = self.reader.trust if self.reader is not None and spec.rerank is not None else None
        ranked = []
        for ds, ss in zip(docs, scores):
            order = sorted(range(len(ds)), key=lambda i: -ss[i])
            relevance = trust.relevance_of(ss) if trust else [None] * len(ds)
            ranked.append([RankedDoc(ds[i].id, ds[i].title, ds[i].text, ss[i], rank, i + 1, ds[i].source, relevance[i])
                           for rank, i in enumerate(order, 1)])
        answers = [""] * len(questions)
        readings: list[Reading | None] = [None] * len(questions)
        t1 = time.perf_counter()
        if spec.read is not None and generate:
            if self.reader is None:
                raise ValueError(f"mode {mode!r} needs the reader, which this engine was loaded without")
            question_kv = None
            if reranks[0] is not None and reranks[0].question_kv:  # each top document's, then let go
                question_kv = [[rr.question_kv[d.retrieval_rank - 1] for d in r[:top_n]] for rr, r in zip(reranks, ranked)]
                for rr in reranks:
                    rr.question_kv = []
            readings = self.reader.read_many(
                [(q, [d.text for d in r[:top_n]], [d.score for d in r[:top_n]]) for q, r in zip(questions, ranked)],
                spec.read, self.store if spec.read == "kv" else None, question_kv, calibrated=spec.rerank is not None)
            answers = [reading.answer if reading.found else NOT_FOUND for reading in readings]
            timings["kv_load"] += readings[0].load_s
            timings["generate"] = time.perf_counter() - t1 - readings[0].load_s
            for notes, reading in zip(warnings, readings):
                notes += reading.warnings
        elif generate and self.generator is not None:
            answers = [self.generator.answer(q, [d.text for d in r[:top_n]]).text for q, r in zip(questions, ranked)]
            timings["generate"] = time.perf_counter() - t1
        timings["total"] = time.perf_counter() - t0
        if spec.rerank == "reuse" or spec.read == "kv":
            shared = self.store.take_warnings()
            warnings = [notes + shared for notes in warnings]
        for warning in dict.fromkeys(w for notes in warnings for w in notes):
            log.warning("%s", warning)
        return [RAGResult(q, mode, a, r, top_n, dict(timings), w, rr, rd, rd.found if rd else True,
                          rd.confidence if rd else None)
                for q, a, r, w, rr, rd in zip(questions, answers, ranked, warnings, reranks, readings)]

    def zero_shot(self, hot_cache_gb: float) -> "Engine":
        """This corpus view over :meth:`Runtime.zero_shot` (the base model as reranker)."""
        return Engine(self.runtime.zero_shot(hot_cache_gb), self.corpus, self.index)

    def close(self) -> None:
        self.runtime.close()
