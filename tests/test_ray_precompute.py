"""Precompute on Ray (two actors on a local Ray of 2 CPUs, or on a Ray cluster started apart with
``ray start`` and reached as a remote one through Ray Client) writes the single-process entries
bit for bit into a real Redis, and a second run finds everything and encodes nothing."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.servers import Server, free_port, redis_server  # noqa: F401 - fixture

ray = pytest.importorskip("ray")


def _entries(url: str, flush: bool = False) -> dict[bytes, bytes]:
    """Every key and value in the Redis at ``url`` (emptied afterwards with ``flush``)."""
    import redis

    host, port = url.rsplit("//", 1)[1].split(":")
    client = redis.Redis(host=host, port=int(port))
    try:
        entries = {key: client.get(key) for key in client.scan_iter(count=1000)}
        if flush:
            client.flushall()
        return entries
    finally:
        client.close()


@contextlib.contextmanager
def _ray(kind: str):
    """``local``: a Ray started in this process (address None). ``cluster``: a head node started
    with the ``ray`` CLI in processes of its own, as on a cluster, reached by its ``ray://``
    address: what a user pointing precompute at a remote cluster does."""
    if kind == "local":
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield None
        finally:
            ray.shutdown()
        return
    cli = Path(sys.executable).with_name("ray")
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    client_port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([str(cli), "start", "--head", f"--port={free_port()}", f"--ray-client-server-port={client_port}",
                    "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"ray://127.0.0.1:{client_port}"
    finally:
        ray.shutdown()
        subprocess.run([str(cli), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.servers
@pytest.mark.slow  # ~70 s (local) / ~90 s (cluster) on 2 busy cores: Ray start, two actors loading the model
@pytest.mark.parametrize("kind", ["local", "cluster"])
def test_ray_precompute_equals_single_process(kind, tiny_corpus_dir, cache_dir, redis_server):
    from hyperrag.data.corpus import load_corpus
    from hyperrag.rag.precompute import precompute
    from hyperrag.rag.ray_precompute import _open_store, precompute_ray
    from hyperrag.rag.runtime import load_reranker
    from hyperrag.common.settings import Settings

    texts = sorted((d.text for d in load_corpus(tiny_corpus_dir).docs), key=len)[:10]
    settings = Settings.from_env(corpus=str(tiny_corpus_dir), cache_dir=cache_dir, store_url=redis_server.url,
                                 codec="fp16", dtype="float32", adapter="", batch_size=3, hot_cache_gb=0.0,
                                 cpu_linear="aten")
    # The reference: the single-process precompute into another Redis server, computed as each
    # actor computes (one thread, the same kernels). Bit-for-bit equality holds only then: another
    # thread count or kernel may round an fp32 KV value differently in the last bit, and that can
    # flip its fp16 rounding (seen on an Intel Xeon, where the probe picks ATen/MKL).
    other = Server("redis").start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reranker = load_reranker(settings)  # built as the Ray actors build it
        store = _open_store(settings.replace(store_url=other.url), reranker)
        try:
            single = precompute(reranker, store, texts)
        finally:
            store.close()
        assert single.complete and single.encoded == len(texts), single
        reference = _entries(other.url)
    finally:
        torch.set_num_threads(threads)
        other.kill()

    _entries(redis_server.url, flush=True)  # the module's server: another kind's run may have filled it
    with _ray(kind) as address:
        seen = []
        first = precompute_ray(settings, texts, address, workers=2, progress=lambda d, t: seen.append((d, t)))
        assert first.complete and first.encoded == len(texts) and first.skipped == 0, first
        assert first.tokens == single.tokens and first.bytes == single.bytes
        assert seen[-1] == (len(texts), len(texts))
        written = _entries(redis_server.url)
        assert len(reference) >= len(texts)
        assert written.keys() == reference.keys()  # same keys ...
        assert all(written[k] == reference[k] for k in reference)  # ... and the same bytes

        again = precompute_ray(settings, texts + texts[:2], address, workers=2)  # duplicates count once
        assert again.complete and again.encoded == 0 and again.skipped == len(texts), again
        assert _entries(redis_server.url) == written
        print(f"{kind}: single process {single.seconds:.1f} s, ray first run {first.seconds:.1f} s "
              f"(encode {first.encode_seconds:.1f} s), second run {again.seconds:.1f} s")


def test_ray_precompute_refuses_memory_store(tiny_corpus_dir):
    from hyperrag.rag.ray_precompute import precompute_ray
    from hyperrag.common.settings import Settings

    with pytest.raises(ValueError, match="shared store"):
        precompute_ray(Settings.from_env(corpus=str(tiny_corpus_dir), store_url="memory://"), ["a text"])
