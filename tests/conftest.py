"""Shared fixtures: real models and a small real corpus cut from the shipped SQuAD subset."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hyperrag.common.settings import SHIPPED_CORPUS as SHIPPED  # the default corpus, cut into test corpora

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Engines built here take one OpenMP thread per reuse row stream instead of timing both choices at
# each start until two starts agree (seconds per batch shape, on every fresh machine): the tests
# check what is computed, not which is faster; test_rerank tests the probe itself.
os.environ.setdefault("HYPERRAG_CPU_STREAM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="session")
def cache_dir() -> str:
    """The model cache is shared across runs (the GGUF -> safetensors copy is made once)."""
    return os.environ.get("HYPERRAG_CACHE_DIR") or str(Path.home() / ".cache" / "hyperrag")


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory) -> Path:
    """24 paragraphs of two shipped articles with their questions: real text, fast to encode."""
    docs = [json.loads(line) for line in (SHIPPED / "docs.jsonl").read_text().splitlines()]
    keep = [d for d in docs if d["id"].startswith(("normans-", "oxygen-"))]
    keep = [d for d in keep if int(d["id"].rsplit("-", 1)[1]) < 12]
    ids = {d["id"] for d in keep}
    queries = [json.loads(line) for line in (SHIPPED / "queries.jsonl").read_text().splitlines()]
    queries = [q for q in queries if q["doc_ids"][0] in ids]
    folder = tmp_path_factory.mktemp("tiny-corpus")
    write_jsonl(folder / "docs.jsonl", keep)
    write_jsonl(folder / "queries.jsonl", queries)
    return folder


@pytest.fixture(scope="session")
def llm(cache_dir):
    from hyperrag.model.loading import load_llm

    return load_llm("smollm2-135m", cache_dir, device="auto", dtype="float32")


@pytest.fixture(scope="session")
def reranker(llm):
    from hyperrag.rag.rerank import Reranker

    return Reranker(llm, batch_size=8)


@pytest.fixture(scope="session")
def tiny_engine(tiny_corpus_dir, cache_dir, tmp_path_factory):
    """An engine on the tiny corpus with an fp32 fs:// store in a temporary folder."""
    from hyperrag.rag.pipeline import Engine
    from hyperrag.common.settings import Settings

    store = tmp_path_factory.mktemp("kv")
    settings = Settings.from_env(corpus=str(tiny_corpus_dir), cache_dir=cache_dir, store_url=f"fs://{store}",
                                 codec="fp32", dtype="float32", top_k=6, top_n=2, batch_size=6, max_new_tokens=12)
    engine = Engine.load(settings)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def real_batch(reranker):
    """One SQuAD question with 20 candidates (its article's paragraphs, gold first, and other
    articles'), encoded once in fp32."""
    docs = [json.loads(line) for line in (SHIPPED / "docs.jsonl").read_text().splitlines()]
    query = json.loads((SHIPPED / "queries.jsonl").read_text().splitlines()[0])
    gold = query["doc_ids"][0]
    article = gold.rsplit("-", 1)[0]
    same = [d["text"] for d in docs if d["id"].startswith(article) and d["id"] != gold]
    others = [d["text"] for d in docs if not d["id"].startswith(article)]
    candidates = [next(d["text"] for d in docs if d["id"] == gold)] + same[:11] + others[::37][:8]
    kvs = dict(zip(candidates, reranker.encode_docs(candidates)))
    return query["question"], candidates, kvs
