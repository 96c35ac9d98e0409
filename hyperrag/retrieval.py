"""Dense retrieval: a faiss-cpu inner-product index over normalized document embeddings.

The index is the CPU-side first stage of the paper's system. It is built once per (corpus
content, embedder) and saved beside the corpus (``<corpus>/.cache/``), or under the cache
folder when the corpus folder is read-only.
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
        texts = [doc.text for doc in corpus.docs]
        parts = []
        for start in range(0, len(texts), batch_size):
            parts.append(embedder.encode(texts[start : start + batch_size], normalize_embeddings=True,
                                         convert_to_numpy=True, show_progress_bar=False))
            if progress:
                progress(min(start + batch_size, len(texts)), len(texts))
        vectors = np.concatenate(parts).astype(np.float32)
        index = faiss.IndexFlatIP(vectors.shape[1])
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
                return cls(faiss.read_index(str(path)), ids, embedder)
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
