"""What a process loads once: the models, the reranker and reader on them, the generator, the KV store.

A :class:`Runtime` is made from :class:`~hyperrag.common.settings.Settings` and shared by every corpus
view (:class:`hyperrag.rag.pipeline.Engine`) and every user of the app. It is the one place that
builds a reranker (:func:`load_reranker`, whose ``kv_identity`` keys the store), a reader and a
store, so precompute, the engine, the app and the bench all key and fill the store alike.
Settings that change loaded objects go through :meth:`Runtime.reconfigure`; the zero-shot
reference (the base model without the adapter) is :meth:`Runtime.zero_shot`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

from hyperrag.data.corpus import Corpus
from hyperrag.rag.generate import Generator
from hyperrag.kv import planner
from hyperrag.kv.codec import Codec
from hyperrag.rag.kv_rounding import codec_for
from hyperrag.kv.store import KVStore
from hyperrag.kv.urls import StoreError, redact_url
from hyperrag.model.loading import LLM, adapter_meta, load_embedder, load_llm
from hyperrag.model.prompts import RerankTemplate
from hyperrag.rag.calibration import Trust, load_trust
from hyperrag.rag.reader import Reader
from hyperrag.rag.rerank import Reranker
from hyperrag.rag.retrieval import DenseIndex
from hyperrag.common.memory import return_freed_memory
from hyperrag.common.settings import Settings

log = logging.getLogger("hyperrag")
Progress = Callable[[int, int], None]


@dataclass
class Runtime:
    settings: Settings
    embedder: object
    reranker: Reranker
    store: KVStore
    generator: Generator | None = None
    reader: Reader | None = None

    @classmethod
    def load(cls, settings: Settings | None = None, with_generator: bool = True,
             corpus_texts: Sequence[str] = (), embedder: object | None = None) -> "Runtime":
        """Load everything for ``settings``; the store's CPU tier is sized for ``corpus_texts``.
        ``embedder``: an already loaded embedder of ``settings.embedder`` to use (another model
        keeps the retriever, and so every corpus's index)."""
        s = settings or Settings.from_env()
        embedder = embedder if embedder is not None else load_embedder(s.embedder, s.cache_dir, s.device)
        # The base model (no adapter) answers with the traditional generator, and is the reranker
        # itself when no adapter is set; with an adapter and no generator it is not loaded at all.
        base = load_llm(s.model, s.cache_dir, s.device, s.dtype, cpu_linear=s.cpu_linear) if with_generator or not s.adapter else None
        reranker = load_reranker(s, None if s.adapter else base, shares=base)
        generator = Generator(base, s.max_new_tokens, s.max_doc_tokens, streams=s.cpu_streams) if with_generator else None
        # Loading freed ~0.17 GiB into the heap (the adapter's merge, kernel probes): back to the
        # OS before the store sizes its CPU tier from what is resident.
        return_freed_memory()
        store = open_store(s, reranker, corpus_texts)
        return cls(s, embedder, reranker, store, generator, load_reader(s, reranker) if with_generator else None)

    @property
    def retrieval_weight(self) -> float:
        """``w`` in the ranking score ``reranker + w x cosine``: the setting, or (-1) the adapter's own."""
        s = self.settings
        if s.retrieval_weight >= 0:
            return s.retrieval_weight
        return _adapter_value(s.adapter, "retrieval_weight", 0.0) if s.adapter else 0.0

    def index(self, corpus: Corpus, progress: Progress | None = None) -> DenseIndex:
        """The corpus's retrieval index (built once, then loaded from the cache folder)."""
        return DenseIndex.load_or_build(corpus, self.embedder, self.settings.embedder, self.settings.cache_dir, progress)

    def reconfigure(self, new: Settings) -> list[str]:
        """Apply changed settings to the loaded objects; what changed, as notes. Another batch
        size rebuilds the reranker and the reader on the same model; another codec or store URL
        re-opens the store. The caller makes sure no request runs meanwhile."""
        old, notes = self.settings, []
        if new.batch_size != old.batch_size:
            self.reranker = load_reranker(new, self.reranker.llm)
            self.reader = load_reader(new, self.reranker) if self.reader is not None else None
            notes.append(f"reranker batch size {old.batch_size} -> {new.batch_size}")
        elif new.abstain_threshold != old.abstain_threshold and self.reader is not None:
            self.reader = load_reader(new, self.reranker)
            notes.append(f"reader declines below confidence {self.reader.abstain_threshold:.2f}")
        if new.codec != self.store.codec.name or new.kv_rounding != old.kv_rounding or new.store_url != self.store.url:
            previous = self.store
            self.store = open_store(new, self.reranker)
            previous.close()
            notes.append(f"store re-opened: {redact_url(self.store.url)} ({new.codec})")
            notes += self.store.take_warnings()
        self.settings = new
        return notes

    def resize_tier(self, texts: Sequence[str]) -> str | None:
        """Re-open the store with its automatic CPU tier (``hot_cache_gb`` -1) sized for ``texts``
        from what is resident now. A runtime loaded while another model was still resident (a
        model switch) got a smaller tier under the memory budget, or none; once that model is
        gone this gives it its due. A note when the size changed; the caller makes sure no
        request runs meanwhile. A fallback (in-process) store is kept as it is."""
        s = self.settings
        if s.hot_cache_gb >= 0 or self.store.url != s.store_url:
            return None
        want = auto_tier_gb(s, self.reranker, self.store.codec, texts)
        if abs(want - self.store.hot_cache_gb) < 0.01:
            return None
        previous = self.store
        self.store = open_store(s.replace(hot_cache_gb=want), self.reranker)  # the size just planned, not planned again
        previous.close()
        return f"store CPU tier {previous.hot_cache_gb:g} -> {self.store.hot_cache_gb:g} GB"

    def zero_shot(self, hot_cache_gb: float) -> "Runtime":
        """The base model as a zero-shot reranker (no adapter, no score fusion, no reader), with
        its own in-process store of ``hot_cache_gb``: the reference a trained adapter is
        measured against. Shares the embedder and the generator (and so the base model)."""
        s = self.settings.replace(adapter="", retrieval_weight=0.0, store_url="memory://", hot_cache_gb=hot_cache_gb)
        reranker = load_reranker(s, self.generator.llm if self.generator is not None else None)
        return Runtime(s, self.embedder, reranker, open_store(s, reranker), self.generator, None)

    def close(self) -> None:
        self.store.close()


@lru_cache(maxsize=16)
def _adapter_value(adapter: str, key: str, default: float) -> float:
    """A value tuned beside an adapter (its ``hyperrag.json``); read once per process, since the
    file never changes under a loaded adapter."""
    return float(adapter_meta(adapter).get(key, default))


def load_reranker(s: Settings, llm: LLM | None = None, template: RerankTemplate | None = None,
                  shares: LLM | None = None) -> Reranker:
    """The one place a reranker is built, so everything that keys or fills the store (the runtime,
    precompute, evaluation, training's checks) derives the same ``kv_identity`` from ``s``.
    ``llm`` is an already loaded model used as given (the base model, or one with the adapter
    merged); without it ``s.model`` is loaded with ``s.adapter``, sharing the tensors the adapter
    leaves unchanged with ``shares`` (the loaded base model) when given. ``template`` is the
    default doc-first prompt unless a study asks for another wording."""
    if llm is None:
        adapter = str(s.folder("adapter")) if s.adapter else ""
        llm = load_llm(s.model, s.cache_dir, s.device, s.dtype, adapter=adapter, cpu_linear=s.cpu_linear,
                       shares=shares.model if shares is not None else None)
    reranker = Reranker(llm, template, max_doc_tokens=s.max_doc_tokens, max_question_tokens=s.max_question_tokens,
                        batch_size=s.batch_size, streams=s.cpu_streams, answer_tokens=s.max_new_tokens,
                        rotate=bool(s.kv_rotation))
    reranker.tune_streams(s.cache_dir, s.cpu_stream_threads)
    return reranker


def load_reader(s: Settings, reranker: Reranker) -> Reader | None:
    """The reader on the reranker's model (one adapter does both jobs), or None without an
    adapter (the base model was never taught to read from the doc-first prompt)."""
    if not s.adapter:
        return None
    weight = s.selection_weight if s.selection_weight >= 0 else _adapter_value(s.adapter, "selection_weight", 1.0)
    span = bool(s.reader_span) if s.reader_span >= 0 else bool(_adapter_value(s.adapter, "reader_span", 1.0))
    trust = adapter_trust(s)
    threshold = s.abstain_threshold if s.abstain_threshold >= 0 else (trust.threshold if trust else 0.0)
    return Reader(reranker.runner, max_rows=max(s.top_n, 10), max_new_tokens=s.max_new_tokens, span=span,
                  selection_weight=weight, draft_tokens=s.draft_tokens, first_tokens=s.reader_first_tokens,
                  trust=trust, abstain_threshold=threshold)


def adapter_trust(s: Settings) -> Trust | None:
    """The adapter's calibration (:mod:`hyperrag.rag.calibration`), when it applies: it was fitted
    on the fused score with the adapter's own retrieval weight, so another weight has none."""
    trust = load_trust(s.adapter) if s.adapter else None
    own = _adapter_value(s.adapter, "retrieval_weight", 0.0) if s.adapter else 0.0
    if trust is not None and s.retrieval_weight >= 0 and s.retrieval_weight != own:
        log.info("retrieval_weight %s is not the adapter's %s: no calibrated confidence, the reader never declines",
                 s.retrieval_weight, own)
        return None
    return trust


def auto_tier_gb(settings: Settings, reranker: Reranker, codec: Codec, texts: Sequence[str]) -> float:
    """The automatic CPU tier (``hot_cache_gb`` -1): ``texts``' entries in ``codec`` plus headroom,
    within what the memory budget leaves of this process's resident memory now."""
    return planner.hot_tier_gb(planner.plan_corpus(reranker, texts, codec).total_bytes,
                               room_gb=planner.budget_room_gb(settings.memory_budget_gb, settings.model))


def open_store(settings: Settings, reranker: Reranker, texts: Sequence[str] = ()) -> KVStore:
    """The configured KV store, its CPU tier sized to hold ``texts`` (the corpus) within the
    memory budget when ``hot_cache_gb`` is -1. An unreachable lm:// or redis:// server does not stop it: the
    store starts degraded (warning kept on it), reconnects every ``2 x store_timeout_s`` and
    writes what was computed meanwhile. Only a store that cannot be used at all (bad URL,
    folder that cannot be created) falls back to an in-process one, with a warning."""
    codec = codec_for(settings.codec, settings.kv_rounding, reranker, settings.cache_dir)
    hot_gb = settings.hot_cache_gb if settings.hot_cache_gb >= 0 else auto_tier_gb(settings, reranker, codec, texts)
    try:
        return KVStore(settings.store_url, codec, reranker.kv_identity, hot_gb,
                       settings.store_timeout_s, backoff_s=max(1.0, 2 * settings.store_timeout_s))
    except StoreError as err:
        fallback = KVStore("memory://", codec, reranker.kv_identity, max(hot_gb, 1.0))
        fallback.note(f"{err}; using an in-process store until restarted")
        log.warning("%s; falling back to an in-process store", err)
        return fallback
