"""HyperRAG: RAG whose decoder reranker reuses precomputed per-document KV caches.

    from hyperrag import Engine, Settings
    engine = Engine.load(Settings.from_env())
    engine.precompute()
    print(engine.ask("Who was the Norse leader?", mode="reuse").answer)

Names are imported lazily so ``import hyperrag`` stays cheap.
"""
from __future__ import annotations

import importlib

# The process environment's defaults, before anything imports torch, transformers or LMCache.
from hyperrag.common import env  # noqa: F401

_EXPORTS = {
    "Settings": "hyperrag.common.settings",
    "Engine": "hyperrag.rag.pipeline",
    "RAGResult": "hyperrag.rag.pipeline",
    "Corpus": "hyperrag.data.corpus",
    "CorpusError": "hyperrag.data.corpus",
    "load_corpus": "hyperrag.data.corpus",
    "Reranker": "hyperrag.rag.rerank",
    "KVStore": "hyperrag.kv.store",
    "DenseIndex": "hyperrag.rag.retrieval",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hyperrag' has no attribute {name!r}")
