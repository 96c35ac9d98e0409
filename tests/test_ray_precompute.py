"""Precompute on Ray (two actors on a local Ray of 2 CPUs) writes the single-process entries bit
for bit into a real Redis, and a second run finds everything and encodes nothing."""
from __future__ import annotations

import pytest

from tests.servers import Server, redis_server  # noqa: F401 - fixture

ray = pytest.importorskip("ray")


def _entries(url: str) -> dict[bytes, bytes]:
    import redis

    host, port = url.rsplit("//", 1)[1].split(":")
    client = redis.Redis(host=host, port=int(port))
    try:
        return {key: client.get(key) for key in client.scan_iter(count=1000)}
    finally:
        client.close()


@pytest.mark.servers
@pytest.mark.slow  # ~70 s on 2 busy cores: Ray start, two actors loading the model, 20 documents encoded
def test_ray_precompute_equals_single_process(tiny_corpus_dir, cache_dir, redis_server):
    from hyperrag.corpus import load_corpus
    from hyperrag.precompute import precompute
    from hyperrag.ray_precompute import _load_reranker, _open_store, precompute_ray
    from hyperrag.settings import Settings

    texts = sorted((d.text for d in load_corpus(tiny_corpus_dir).docs), key=len)[:10]
    settings = Settings.from_env(corpus=str(tiny_corpus_dir), cache_dir=cache_dir, store_url=redis_server.url,
                                 codec="fp16", dtype="float32", adapter="", batch_size=3, hot_cache_gb=0.0)
    # The reference: the single-process precompute into another Redis server.
    other = Server("redis").start()
    try:
        reranker = _load_reranker(settings)  # built as precompute's CLI builds it
        store = _open_store(settings.replace(store_url=other.url), reranker)
        try:
            single = precompute(reranker, store, texts)
        finally:
            store.close()
        assert single.complete and single.encoded == len(texts), single
        reference = _entries(other.url)
    finally:
        other.kill()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        seen = []
        first = precompute_ray(settings, texts, workers=2, progress=lambda d, t: seen.append((d, t)))
        assert first.complete and first.encoded == len(texts) and first.skipped == 0, first
        assert first.tokens == single.tokens and first.bytes == single.bytes
        assert seen[-1] == (len(texts), len(texts))
        written = _entries(redis_server.url)
        assert len(reference) >= len(texts)
        assert written.keys() == reference.keys()  # same keys ...
        assert all(written[k] == reference[k] for k in reference)  # ... and the same bytes

        again = precompute_ray(settings, texts + texts[:2], workers=2)  # duplicates count once
        assert again.complete and again.encoded == 0 and again.skipped == len(texts), again
        assert _entries(redis_server.url) == written
        print(f"single process {single.seconds:.1f} s, ray first run {first.seconds:.1f} s "
              f"(encode {first.encode_seconds:.1f} s), second run {again.seconds:.1f} s")
    finally:
        ray.shutdown()


def test_ray_precompute_refuses_memory_store(tiny_corpus_dir):
    from hyperrag.ray_precompute import precompute_ray
    from hyperrag.settings import Settings

    with pytest.raises(ValueError, match="shared store"):
        precompute_ray(Settings.from_env(corpus=str(tiny_corpus_dir), store_url="memory://"), ["a text"])
