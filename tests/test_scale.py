"""The index kind follows the corpus size (exact, then HNSW), persists and reloads; the scale
bench reports build time, memory, latency and recall; the planner prints 1M-passage figures."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from hyperrag.rag import retrieval
from hyperrag.data.corpus import Corpus, Doc
from hyperrag.rag.retrieval import DenseIndex


class HashEmbedder:
    """A stand-in embedder (no model): a fixed random unit vector per text."""

    calls = 0

    def encode(self, texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False, **_):
        self.calls += 1
        out = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(32) for t in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def _corpus(root, n):
    return Corpus(root, [Doc(f"d{i}", "", f"passage number {i}") for i in range(n)])


def test_index_kind_by_size_persists_and_resumes(tmp_path, monkeypatch):
    embedder, seen = HashEmbedder(), []
    small = DenseIndex.build(_corpus(tmp_path / "a", 30), embedder, chunk=8, progress=lambda d, t: seen.append(d))
    assert isinstance(small.index, faiss.IndexFlatIP) and seen == [8, 16, 24, 30]
    monkeypatch.setattr(retrieval, "HNSW_MIN_VECTORS", 20)
    corpus = _corpus(tmp_path / "b", 200)
    big = DenseIndex.load_or_build(corpus, embedder, "hash", tmp_path / "cache")
    assert isinstance(big.index, faiss.IndexHNSWFlat) and big.index.hnsw.efSearch == retrieval.HNSW_EF_SEARCH
    assert big.search("passage number 7", 3)[0][0] == "d7"
    again = DenseIndex.load_or_build(corpus, embedder, "hash", tmp_path / "cache",
                                     progress=lambda *_: (_ for _ in ()).throw(AssertionError("rebuilt")))
    assert isinstance(faiss.downcast_index(again.index), faiss.IndexHNSWFlat) and again.doc_ids == big.doc_ids
    assert again.search("passage number 42", 1)[0][0] == "d42"


class StopsAfter(HashEmbedder):
    """Embeds ``n`` calls' worth, then fails as a killed process would."""

    def __init__(self, n):
        self.left = n

    def encode(self, texts, **kw):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return super().encode(texts, **kw)


def test_an_interrupted_embedding_resumes_where_it_stopped(tmp_path):
    corpus, spill = _corpus(tmp_path / "c", 50), tmp_path / "spill" / "index-x"
    spill.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):  # the width probe, then 3 chunks of 10, then the stop
        DenseIndex.build(corpus, StopsAfter(4), chunk=10, spill=spill)
    resumed, seen = HashEmbedder(), []
    index = DenseIndex.build(corpus, resumed, chunk=10, spill=spill, progress=lambda d, t: seen.append(d))
    assert seen == [30, 40, 50] and resumed.calls == 1 + 2  # the probe and the 2 chunks left
    whole = DenseIndex.build(corpus, HashEmbedder())
    assert np.array_equal(index.index.reconstruct_n(0, 50), whole.index.reconstruct_n(0, 50))
    again = DenseIndex.load_or_build(corpus, HashEmbedder(), "hash", tmp_path / "cache")
    assert again.index.ntotal == 50 and sorted(p.name for p in (corpus.root / ".cache").iterdir()) == [
        f"index-hash-{retrieval.corpus_digest(corpus)}.faiss", f"index-hash-{retrieval.corpus_digest(corpus)}.ids.json"]


def test_scale_bench_small():
    from hyperrag.scale import scale_bench

    r = scale_bench(3000, dim=32, queries=50)
    for kind in ("exact", "hnsw"):
        x = r[kind]
        assert x["build_s"] >= 0 and x["peak_rss_bytes"] > 0 and 0 < x["query_ms_p50"] <= x["query_ms_p95"]
    assert r["hnsw"]["recall_at_k"] >= 0.9 and r["engine_choice"] == "exact"


def test_scale_bench_on_a_corpus_own_embeddings(tiny_corpus_dir, cache_dir):
    from hyperrag.scale import corpus_vectors, scale_bench, sweep_ef
    from hyperrag.common.settings import Settings

    vectors, questions = corpus_vectors(str(tiny_corpus_dir), 8, Settings.from_env(cache_dir=cache_dir))
    assert vectors.shape == (24, 384) and questions.shape == (8, 384)
    r = scale_bench(0, data=(vectors, questions))
    assert (r["n"], r["queries"], r["data"]) == (24, 8, "real") and r["hnsw"]["recall_at_k"] == 1.0
    assert [row["recall_at_k"] for row in sweep_ef(0, ef_values=(16, 64), data=(vectors, questions))] == [1.0, 1.0]


def test_planner_cli_million(capsys):
    from hyperrag.kv import planner

    assert planner.main(["--docs", "1000000", "--tokens-per-doc", "200", "--docs-per-s", "3.67", "--workers", "1,16"]) == 0
    out = capsys.readouterr().out
    assert "fp16      4.61 TB" in out and "int4" in out
    assert f"{1e6 / 3.67 / 3600:,.1f} h" in out and f"{1e6 / 3.67 / 16 / 3600:,.1f} h" in out


def test_durations_read_at_their_scale():
    from hyperrag.kv.planner import format_duration

    assert [format_duration(s) for s in (42, 450, 3 * 3600 + 720, 30 * 3600, 5 * 86_400)] == [
        "42 s", "7.5 min", "3.2 h", "30.0 h", "5.0 days"]
