"""The one table of RAG modes: how each ranks and answers, and its names in reports and plots.

A mode is a path through the pipeline: how the candidates are ranked (the retriever's order, or
the reranker in ``full`` / ``prefix`` / ``reuse`` mode) and how the answer is made (the
traditional generator over the concatenated top-n documents, or the reader, one document per
row, with its documents' KV loaded from the store or computed). ``zero_shot`` is the base model
without the adapter, reranking in reuse mode: the reference training is measured against.

Engine, bench, reports, figures and the app all read this table; none keeps its own list.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str  # the engine's name (``Engine.ask(mode=...)``, records' ``mode``)
    rerank: str | None  # reranker path: full | prefix | reuse; None = the retriever's order
    read: str | None  # reader path: kv | full; None = the traditional generator
    e2e_key: str  # end-to-end and quality key in the bench JSON
    rerank_key: str | None  # reranker key in the bench JSON (None: no reranker row of its own)
    label: str  # short label in plots and tables
    title: str  # the app's column title
    color: str


MODE_TABLE: tuple[Mode, ...] = (
    Mode("retrieval", None, None, "retrieval_only", None, "retrieval only", "Retrieval only (no rerank)", "#9aa5b1"),
    Mode("zero_shot", "reuse", None, "zero_shot", "zero_shot", "zero-shot reranker (reuse)",
         "Zero-shot rerank (base model, no adapter; KV reuse)", "#8e6cc7"),
    Mode("baseline", "full", None, "baseline", "full", "baseline (full rerank)",
         "Baseline: full-prefill rerank + generator", "#d64545"),
    Mode("prefix", "prefix", None, "prefix_cached", "prefix_cached", "prefix cached",
         "Prefix-cached rerank + generator", "#f28c28"),
    Mode("reuse", "reuse", None, "reuse", "reuse", "KV reuse", "KV-reuse rerank + generator", "#2e9e6a"),
    Mode("retrieval_reader", None, "kv", "retrieval_reader", None, "retrieval + reader",
         "Reader over the retriever's order (no rerank)", "#5b7fa6"),
    Mode("reader_full", "full", "full", "reader_full", None, "reader, full prefill",
         "Reader, full prefill (no stored KV)", "#b0413e"),
    Mode("reader_kv", "reuse", "kv", "reader_kv", None, "reader from stored KV",
         "Reader from stored KV (HyperRAG)", "#1b6e4c"),
)
MODES: dict[str, Mode] = {m.name: m for m in MODE_TABLE}
BY_E2E_KEY: dict[str, Mode] = {m.e2e_key: m for m in MODE_TABLE}
ENGINE_MODES: tuple[str, ...] = tuple(m.name for m in MODE_TABLE if m.name != "zero_shot")
E2E_KEYS: tuple[str, ...] = tuple(m.e2e_key for m in MODE_TABLE)
# Reranker rows the bench measures that no engine mode runs: (label, color).
BENCH_ONLY_RERANK: dict[str, tuple[str, str]] = {
    "query_first_cached": ("query-first, question cached (vLLM-style)", "#c9a227"),
}
RERANK_KEYS: tuple[str, ...] = ("zero_shot", "full", "prefix_cached", "query_first_cached", "reuse")


def mode(name: str) -> Mode:
    """The mode called ``name`` (an engine name or a report key); a clear error otherwise."""
    found = MODES.get(name) or BY_E2E_KEY.get(name)
    if found is None:
        raise ValueError(f"unknown mode {name!r}; choose one of {', '.join(ENGINE_MODES)}")
    return found
