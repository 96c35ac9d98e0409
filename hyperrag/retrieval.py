"""Dense retrieval: a faiss-cpu inner-product index over normalized document embeddings.

The index is the CPU-side first stage of the paper's system. It is built once per (corpus
content, embedder) and saved beside the corpus (``<corpus>/.cache/``), or under the cache
folder when the corpus folder is read-only.

Its kind follows the corpus size (:func:`make_index`): an exact ``IndexFlatIP`` below
:data:`HNSW_MIN_VECTORS` vectors, an approximate ``IndexHNSWFlat`` (inner product) from there
on, tuned with :mod:`hyperrag.scale` (``python -m hyperrag.bench --scale N``).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from hyperrag.corpus import Corpus

Progress = Callable[[int, int], None]

# Below this many vectors an exact search is cheap enough (an IndexFlatIP scans 50,000 x 384
# floats in a few ms per question) and nothing is lost to approximation; above it, HNSW keeps
# query time near-logarithmic in the corpus size. Build time and memory both grow for HNSW
# (graph links), so small corpora stay flat.
HNSW_MIN_VECTORS = 50_000
# HNSW parameters chosen with hyperrag.scale.scale_bench (recall@10 against the exact index on
# clustered unit vectors; see scale.py for the measured numbers): M links per node, the
# candidate list while building (efConstruction) and while searching (efSearch).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128


def make_index(dim: int, n: int, exact: bool | None = None) -> faiss.Index:
    """An empty inner-product index for ``n`` vectors of ``dim``: exact below
    :data:`HNSW_MIN_VECTORS` (or when ``exact``), HNSW above."""
    if exact if exact is not None else n < HNSW_MIN_VECTORS:
        return faiss.IndexFlatIP(dim)
    index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.hnsw.efSearch = HNSW_EF_SEARCH
    return index


def _tune(index: faiss.Index) -> faiss.Index:
    """Search settings that a saved file may lack (older files, other defaults)."""
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = max(hnsw.efSearch, HNSW_EF_SEARCH)
    return index


def corpus_digest(corpus: Corpus) -> str:
    digest = hashlib.sha256()
    for doc in corpus.docs:
        digest.update(doc.id.encode() + b"\0" + doc.text.encode() + b"\0")
    return digest.hexdigest()[:16]


class DenseIndex:
    def __init__(self, index: faiss.Index, doc_ids: list[str], embedder):
        self.index = index
        self.doc_ids = doc_ids
        self.embedder = embedder

    @classmethod
    def build(cls, corpus: Corpus, embedder, batch_size: int = 32, progress: Progress | None = None) -> "DenseIndex":
        """Embed the corpus in batches of ``batch_size`` (``progress(done, total)`` after each),
        into one preallocated array (no second copy at the end), then index it."""
        texts = [doc.text for doc in corpus.docs]
        vectors = None
        for start in range(0, len(texts), batch_size):
            part = embedder.encode(texts[start : start + batch_size], normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False)
            if vectors is None:
                vectors = np.empty((len(texts), part.shape[1]), dtype=np.float32)
            vectors[start : start + len(part)] = part
            if progress:
                progress(min(start + batch_size, len(texts)), len(texts))
        if vectors is None:
            raise ValueError("the corpus has no documents to index")
        index = make_index(vectors.shape[1], len(vectors))
        index.add(vectors)
        return cls(index, [doc.id for doc in corpus.docs], embedder)

    @classmethod
    def load_or_build(cls, corpus: Corpus, embedder, embedder_name: str, cache_dir: str | Path,
                      progress: Progress | None = None) -> "DenseIndex":
        """Load the saved index for this corpus content and embedder, or build and save it."""
        name = f"index-{embedder_name}-{corpus_digest(corpus)}"
        for folder in (corpus.root / ".cache", Path(cache_dir) / "indexes" / corpus.name):
            path = folder / f"{name}.faiss"
            if path.exists():
                ids = json.loads((folder / f"{name}.ids.json").read_text())
                return cls(_tune(faiss.read_index(str(path))), ids, embedder)
        built = cls.build(corpus, embedder, progress=progress)
        for folder in (corpus.root / ".cache", Path(cache_dir) / "indexes" / corpus.name):
            try:
                built.save(folder, name)
                break
            except OSError:
                continue
        return built

    def save(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        faiss.write_index(self.index, tmp)
        (folder / f"{name}.ids.json").write_text(json.dumps(self.doc_ids))
        os.replace(tmp, folder / f"{name}.faiss")  # the index file appears last, whole

    def search(self, question: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` best (doc id, cosine similarity) pairs, best first."""
        vector = self.embedder.encode([question], normalize_embeddings=True, convert_to_numpy=True,
                                      show_progress_bar=False).astype(np.float32)
        scores, rows = self.index.search(vector, min(k, len(self.doc_ids)))
        return [(self.doc_ids[r], float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
