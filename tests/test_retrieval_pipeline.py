"""Retrieval finds gold paragraphs; the pipeline runs every mode with stage timings."""
from __future__ import annotations

import pytest

from hyperrag.data.corpus import load_corpus
from hyperrag.rag.metrics import recall_at_k
from hyperrag.rag.modes import ENGINE_MODES
from hyperrag.rag.pipeline import QuestionError


def test_retrieval_finds_gold(tiny_engine):
    hits = tiny_engine.retrieve("What is the original meaning of the word Norman?", 3)
    assert hits[0][0] == "normans-002"
    queries = tiny_engine.corpus.queries[:40]
    recall = sum(recall_at_k([d for d, _ in tiny_engine.retrieve(q.question, 5)], q.doc_ids, 5) for q in queries)
    assert recall / len(queries) > 0.7


def test_index_is_saved_beside_corpus_and_reused(tiny_engine, tiny_corpus_dir):
    from hyperrag.rag.retrieval import DenseIndex

    saved = list((tiny_corpus_dir / ".cache").glob("index-*.faiss"))
    assert len(saved) == 1
    again = DenseIndex.load_or_build(load_corpus(tiny_corpus_dir), tiny_engine.index.embedder,
                                     "all-minilm-l6-v2", tiny_engine.settings.cache_dir,
                                     progress=lambda *_: pytest.fail("index rebuilt instead of loaded"))
    assert again.doc_ids == tiny_engine.index.doc_ids


def test_every_mode_answers_with_timings(tiny_engine):
    question = tiny_engine.corpus.queries[0].question
    results = {mode: tiny_engine.ask(question, mode) for mode in ENGINE_MODES}
    for mode, result in results.items():
        assert result.answer, mode
        assert set(result.timings) >= {"retrieve", "kv_load", "rerank", "generate", "total"}
        assert len(result.docs) == tiny_engine.settings.top_k
    # Same candidates, same reranker: reuse (fp32 store) ranks and answers like the baseline.
    assert results["reuse"].ranked_ids == results["baseline"].ranked_ids
    assert results["reuse"].answer == results["baseline"].answer
    assert results["retrieval"].timings["rerank"] == 0.0
    assert results["baseline"].timings["kv_load"] == 0.0


def test_reuse_reads_from_store_after_precompute(tiny_engine):
    report = tiny_engine.precompute()
    assert report.encoded + report.skipped == len(tiny_engine.corpus.docs)
    assert tiny_engine.precompute().encoded == 0  # resumable: nothing left to do
    result = tiny_engine.ask(tiny_engine.corpus.queries[3].question, "reuse")
    assert result.rerank.encoded_docs == 0 and result.timings["kv_load"] > 0
    assert not result.warnings


def test_bad_questions(tiny_engine):
    with pytest.raises(QuestionError, match="empty"):
        tiny_engine.ask("   ", "reuse")
    long = tiny_engine.ask("Normans " * 2000, "reuse", generate=False)
    assert any("cut" in w for w in long.warnings)
    with pytest.raises(ValueError, match="unknown mode"):
        tiny_engine.ask("Who?", "fast")
