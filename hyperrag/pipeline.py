"""The RAG pipeline: retrieve -> rerank -> answer, one engine object for every front door.

Modes (:mod:`hyperrag.modes`; one parameter, same candidates):

- ``retrieval``: traditional RAG, the retriever's top-n go straight to the generator;
- ``baseline``: the reranker runs full prefill on every (question, document) pair;
- ``prefix``: full prefill with the shared instruction prefix cached (prefix caching);
- ``reuse``: the reranker loads each document's stored KV and runs only the question;
- ``reader_full``: full-prefill rerank, then the reader over the top-n documents, computing
  their KV (no store);
- ``reader_kv``: KV-reuse rerank, then the reader on the same stored document KV: no document
  token is computed at query time.

The first four answer with the traditional generator over the concatenated top-n; the reader
modes read each document in its own row and pick one answer (:mod:`hyperrag.reader`).
Every answer carries its stage timings (retrieve, kv_load, rerank, generate) and warnings.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable, Sequence

from hyperrag.corpus import Corpus, load_corpus
from hyperrag.generate import Generator
from hyperrag.kv import planner
from hyperrag.kv.store import KVStore, StoreError
from hyperrag.models import adapter_meta, load_embedder, load_llm
from hyperrag.modes import ENGINE_MODES, mode as mode_spec
from hyperrag.precompute import PrecomputeReport, precompute
from hyperrag.reader import Reader, Reading
from hyperrag.rerank import Reranker, RerankResult, fuse_scores
from hyperrag.retrieval import DenseIndex
from hyperrag.settings import Settings

log = logging.getLogger("hyperrag")
MODES = ENGINE_MODES
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
    """Models, index, reranker, reader, generator and KV store, loaded once per process; thread-safe."""

    def __init__(self, settings: Settings, corpus: Corpus, index: DenseIndex, reranker: Reranker,
                 generator: Generator | None, store: KVStore, reader: Reader | None = None):
        self.settings = settings
        self.corpus = corpus
        self.index = index
        self.reranker = reranker
        self.generator = generator
        self.reader = reader
        self.store = store
        self.retrieval_weight = retrieval_weight(settings)
        self._corpus_lock = threading.Lock()

    @classmethod
    def load(cls, settings: Settings | None = None, corpus: Corpus | None = None, with_generator: bool = True,
             progress: Progress | None = None) -> "Engine":
        """Load everything for ``settings`` (corpus from ``settings.corpus`` unless given)."""
        s = settings or Settings.from_env()
        corpus = corpus or load_corpus(s.corpus)
        embedder = load_embedder(s.embedder, s.cache_dir, s.device)
        index = DenseIndex.load_or_build(corpus, embedder, s.embedder, s.cache_dir, progress)
        base = load_llm(s.model, s.cache_dir, s.device, s.dtype)
        reranker = load_reranker(s, base)
        generator = Generator(base, s.max_new_tokens, s.max_doc_tokens, streams=s.cpu_streams) if with_generator else None
        store = open_store(s, reranker, [d.text for d in corpus.docs])
        return cls(s, corpus, index, reranker, generator, store, load_reader(s, reranker) if with_generator else None)

    def set_corpus(self, corpus: Corpus, progress: Progress | None = None) -> None:
        """Switch to another corpus (the index is built or loaded; stored KV stays valid)."""
        index = DenseIndex.load_or_build(corpus, self.index.embedder, self.settings.embedder,
                                         self.settings.cache_dir, progress)
        with self._corpus_lock:
            self.corpus, self.index = corpus, index

    def precompute(self, progress: Progress | None = None) -> PrecomputeReport:
        return precompute(self.reranker, self.store, [d.text for d in self.corpus.docs], progress)

    def retrieve(self, question: str, k: int) -> list[tuple[str, float]]:
        return self.index.search(question, k)

    def ask(self, question: str, mode: str = "reuse", top_k: int | None = None, top_n: int | None = None,
            generate: bool = True) -> RAGResult:
        """Answer one question in one mode, timing each stage."""
        spec = mode_spec(mode)
        if spec.name not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        mode = spec.name
        question, warnings = clean_question(question)
        top_k = top_k or self.settings.top_k
        top_n = min(top_n or self.settings.top_n, top_k)
        timings = {"retrieve": 0.0, "kv_load": 0.0, "rerank": 0.0, "generate": 0.0}
        t0 = time.perf_counter()
        with self._corpus_lock:
            corpus, index = self.corpus, self.index
        hits = index.search(question, top_k)
        timings["retrieve"] = time.perf_counter() - t0
        docs = [corpus.by_id[doc_id] for doc_id, _ in hits]
        rerank = reading = None
        if spec.rerank is None:
            order = list(range(len(docs)))
            scores = [score for _, score in hits]
        else:
            rerank = self.reranker.score(question, [d.text for d in docs], spec.rerank,
                                         self.store if spec.rerank == "reuse" else None)
            scores = rerank.scores
            if self.retrieval_weight:  # score fusion: w tuned with the adapter, on SQuAD train
                scores = fuse_scores(scores, [cos for _, cos in hits], self.retrieval_weight)
            order = sorted(range(len(docs)), key=lambda i: -scores[i])
            timings["kv_load"] = rerank.load_s
            timings["rerank"] = rerank.compute_s
            warnings += rerank.warnings
        ranked = [RankedDoc(docs[i].id, docs[i].title, docs[i].text, scores[i], rank, i + 1)
                  for rank, i in enumerate(order, 1)]
        answer = ""
        if spec.read is not None and generate:
            if self.reader is None:
                raise ValueError(f"mode {mode!r} needs the reader, which this engine was loaded without")
            t1 = time.perf_counter()
            top = ranked[:top_n]
            reading = self.reader.read(question, [d.text for d in top], [d.score for d in top], spec.read,
                                       self.store if spec.read == "kv" else None)
            answer = reading.answer
            timings["kv_load"] += reading.load_s
            timings["generate"] = time.perf_counter() - t1 - reading.load_s
            warnings += reading.warnings
        elif generate and self.generator is not None:
            t1 = time.perf_counter()
            answer = self.generator.answer(question, [d.text for d in ranked[:top_n]]).text
            timings["generate"] = time.perf_counter() - t1
        timings["total"] = time.perf_counter() - t0
        if spec.rerank == "reuse" or spec.read == "kv":
            warnings += self.store.take_warnings()
        for warning in warnings:
            log.warning("%s", warning)
        return RAGResult(question, mode, answer, ranked, top_n, timings, warnings, rerank, reading)

    def zero_shot(self, hot_cache_gb: float) -> "Engine":
        """This engine with the base model as a zero-shot reranker (no adapter, no score fusion)
        and its own in-process KV store of ``hot_cache_gb``: the reference a trained adapter is
        measured against. Shares the corpus, index and generator."""
        s = replace(self.settings, adapter="", retrieval_weight=0.0, store_url="memory://", hot_cache_gb=hot_cache_gb)
        base = self.generator.llm if self.generator is not None else None
        reranker = load_reranker(s, base)
        return Engine(s, self.corpus, self.index, reranker, self.generator, open_store(s, reranker))

    def close(self) -> None:
        self.store.close()


def retrieval_weight(s: Settings) -> float:
    """``w`` in the ranking score ``reranker + w x cosine``: the setting, or (-1) the adapter's own."""
    if s.retrieval_weight >= 0:
        return s.retrieval_weight
    return _adapter_retrieval_weight(s.adapter) if s.adapter else 0.0


@lru_cache(maxsize=8)
def _adapter_retrieval_weight(adapter: str) -> float:
    """Read once per process: engine views are made per request (the app), the file never changes
    under a loaded adapter."""
    return float(adapter_meta(adapter).get("retrieval_weight", 0.0))


def load_reader(s: Settings, reranker: Reranker) -> Reader | None:
    """The reader on the reranker's model (one adapter does both jobs), or None without an
    adapter (the base model was never taught to read from the doc-first prompt)."""
    if not s.adapter:
        return None
    meta = adapter_meta(s.adapter)
    weight = s.selection_weight if s.selection_weight >= 0 else float(meta.get("selection_weight", 1.0))
    span = bool(s.reader_span) if s.reader_span >= 0 else bool(meta.get("reader_span", True))
    return Reader(reranker, max_rows=max(s.top_n, 8), max_new_tokens=s.max_new_tokens, span=span,
                  selection_weight=weight)


def load_reranker(s: Settings, base=None) -> Reranker:
    """The reranker for settings ``s`` (on ``base``, the already loaded LLM, unless an adapter is
    set). Its ``kv_identity`` keys the store, so precompute builds it here too."""
    llm = load_llm(s.model, s.cache_dir, s.device, s.dtype, adapter=s.adapter) if s.adapter or base is None else base
    return Reranker(llm, max_doc_tokens=s.max_doc_tokens, max_question_tokens=s.max_question_tokens,
                    batch_size=s.batch_size, streams=s.cpu_streams)


def open_store(settings: Settings, reranker: Reranker, texts: Sequence[str] = ()) -> KVStore:
    """The configured KV store, its CPU tier sized to hold ``texts`` (the corpus) when
    ``hot_cache_gb`` is -1. An unreachable lm:// or redis:// server does not stop it: the
    store starts degraded (warning kept on it), reconnects every ``2 x store_timeout_s`` and
    writes what was computed meanwhile. Only a store that cannot be used at all (bad URL,
    folder that cannot be created) falls back to an in-process one, with a warning."""
    hot_gb = settings.hot_cache_gb
    if hot_gb < 0:
        hot_gb = planner.hot_tier_gb(planner.plan_corpus(reranker, texts, settings.codec).total_bytes)
    try:
        return KVStore(settings.store_url, settings.codec, reranker.kv_identity, hot_gb,
                       settings.store_timeout_s, backoff_s=max(1.0, 2 * settings.store_timeout_s))
    except StoreError as err:
        fallback = KVStore("memory://", settings.codec, reranker.kv_identity, max(hot_gb, 1.0))
        fallback._warn(f"{err}; using an in-process store until restarted")
        log.warning("%s; falling back to an in-process store", err)
        return fallback
