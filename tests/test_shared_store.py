"""Two reranker workers, two processes, one shared store (an lm:// server and a Redis server):
what worker A precomputed, worker B finds; B encodes nothing and scores exactly as A does."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hyperrag.kv.codec import get_codec
from hyperrag.kv.store import KVStore
from hyperrag.rag.precompute import precompute
from hyperrag.rag.rerank import FP32_SCORE_BOUND
from tests.servers import lm_server, redis_server  # noqa: F401 - fixtures


@pytest.mark.servers
def test_second_worker_finds_everything(reranker, tiny_corpus_dir, cache_dir, tmp_path, lm_server, redis_server):
    from hyperrag.data.corpus import load_corpus

    corpus = load_corpus(tiny_corpus_dir)
    docs = sorted((d.text for d in corpus.docs), key=len)[:6]
    questions = [{"question": q.question, "docs": docs} for q in corpus.queries[:2]]
    settings = {"dtype": "float32", "codec": "fp16", "batch_size": reranker.batch_size, "hot_cache_gb": 0.05,
                "adapter": "",  # the `reranker` fixture's model: the zero-shot base
                "store_timeout_s": 5.0, "cache_dir": cache_dir}
    urls = [lm_server.url, redis_server.url]
    mine = {}
    for url in urls:  # worker A: this process
        store = KVStore(url, get_codec("fp16"), reranker.kv_identity, hot_cache_gb=0.05)
        try:
            report = precompute(reranker, store, docs)
            assert report.complete and report.encoded == len(docs), report
            mine[url] = [reranker.score(q["question"], docs, "reuse", store).scores for q in questions]
        finally:
            store.close()
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"stores": urls, "settings": settings, "questions": questions}))
    out = tmp_path / "out.json"
    env = {**os.environ, "HYPERRAG_CACHE_DIR": cache_dir}
    worker = subprocess.run([sys.executable, "-m", "tests.shared_worker", "--job", str(job), "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-4000:]
    theirs = json.loads(out.read_text())
    for url in urls:  # worker B: another process, same store
        b = theirs[url]
        assert b["identity"] == reranker.kv_identity, "both workers must key documents the same way"
        assert b["encoded_docs"] == 0, (url, b)
        assert b["stats"]["hits"] == len(docs) * len(questions) and b["stats"]["corrupt"] == 0, b["stats"]
        assert b["warnings"] == []
        for ours, their in zip(mine[url], b["scores"]):
            assert max(abs(x - y) for x, y in zip(ours, their)) <= FP32_SCORE_BOUND, url  # documented fp32 bound
