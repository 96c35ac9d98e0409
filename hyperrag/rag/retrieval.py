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

from hyperrag.data.corpus import Corpus

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
# Texts per embedder call: it sorts a call's texts by length before batching, so a larger call
# pads less; it is also the unit a stopped build resumes from.
EMBED_CHUNK = 1024


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


def _dimension(embedder) -> int:
    """The embedding width, by embedding one text (any embedder with ``encode`` answers the same way)."""
    return embedder.encode(["width"], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False).shape[1]


def _vector_array(spill: Path | None, n: int, dim: int) -> tuple[np.ndarray, int]:
    """The ``[n, dim]`` float32 array to embed into and how many rows of it are done: in memory,
    or a file at ``spill`` (resumed when a build of the same corpus and embedder stopped)."""
    if spill is None:
        return np.empty((n, dim), dtype=np.float32), 0
    path, marker = _spill_files(spill)
    if path.exists() and marker.exists():
        try:
            vectors = np.lib.format.open_memmap(path, mode="r+")
            done = int(marker.read_text())
        except (OSError, ValueError):  # a damaged file: start again rather than trust it
            vectors, done = None, 0
        if vectors is not None and vectors.shape == (n, dim) and vectors.dtype == np.float32:
            return vectors, min(done, n)
    marker.unlink(missing_ok=True)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim)), 0


def _spill_files(spill: Path) -> tuple[Path, Path]:
    """A spilled build's vectors (.npy) and its count of finished rows."""
    return spill.parent / f"{spill.name}.vectors.npy", spill.parent / f"{spill.name}.done"


def _mark_done(vectors: np.ndarray, spill: Path, done: int) -> None:
    """Rows before ``done`` are on disk: flush them, then say so (atomically, so a stop between
    the two at worst redoes one chunk)."""
    vectors.flush()
    marker = _spill_files(spill)[1]
    tmp = marker.parent / (marker.name + ".tmp")
    tmp.write_text(str(done))
    os.replace(tmp, marker)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK)
    except OSError:
        return False


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
    def build(cls, corpus: Corpus, embedder, batch_size: int = 32, progress: Progress | None = None,
              spill: Path | None = None, chunk: int = EMBED_CHUNK) -> "DenseIndex":
        """Embed the corpus ``chunk`` texts at a time (the embedder sorts each chunk by length, so
        its batches of ``batch_size`` carry little padding; ``progress(done, total)`` after each)
        into one preallocated array, then index it. With ``spill`` (a path without suffix) the
        array is a file there and a run that stops resumes after its last finished chunk: a large
        corpus neither restarts from zero nor holds its vectors in memory twice
        (:meth:`load_or_build` removes the files once the index is saved)."""
        texts = [doc.text for doc in corpus.docs]
        if not texts:
            raise ValueError("the corpus has no documents to index")
        vectors, done = _vector_array(spill, len(texts), _dimension(embedder))
        if progress and done:
            progress(done, len(texts))
        for start in range(done, len(texts), chunk):
            part = embedder.encode(texts[start : start + chunk], batch_size=batch_size, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False)
            vectors[start : start + len(part)] = part
            if spill is not None:
                _mark_done(vectors, spill, start + len(part))
            if progress:
                progress(start + len(part), len(texts))
        index = make_index(vectors.shape[1], len(vectors))
        index.add(np.ascontiguousarray(vectors))
        return cls(index, [doc.id for doc in corpus.docs], embedder)

    @classmethod
    def load_or_build(cls, corpus: Corpus, embedder, embedder_name: str, cache_dir: str | Path,
                      progress: Progress | None = None) -> "DenseIndex":
        """Load the saved index for this corpus content and embedder, or build (resuming an
        interrupted build) and save it."""
        name = f"index-{embedder_name}-{corpus_digest(corpus)}"
        folders = (corpus.root / ".cache", Path(cache_dir) / "indexes" / corpus.name)
        for folder in folders:
            path = folder / f"{name}.faiss"
            if path.exists():
                ids = json.loads((folder / f"{name}.ids.json").read_text())
                return cls(_tune(faiss.read_index(str(path))), ids, embedder)
        folder = next((f for f in folders if _writable(f)), None)
        built = cls.build(corpus, embedder, progress=progress, spill=folder / name if folder else None)
        if folder is not None:
            built.save(folder, name)
            for path in _spill_files(folder / name):
                path.unlink(missing_ok=True)
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
