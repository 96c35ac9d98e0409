"""The LMCache-backed KV store: exact round trips on every backend, misses, content addresses,
precompute (resumable, verified) and the storage planner."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from hyperrag.kv.codec import get_codec
from hyperrag.kv.frame import content_address
from hyperrag.kv.store import KVStore
from hyperrag.kv.urls import StoreError, parse_store_url, redact_url
from tests.servers import lm_server, redis_server  # noqa: F401 - fixtures

SHAPE = (30, 2, 3, 0, 64)  # SmolLM2-135M document KV; tokens filled in per document


def fake_kv(tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(SHAPE[:3] + (tokens,) + SHAPE[4:], generator=g) * 3
    kv[:, 0, :, :, 5] += 40  # a key outlier channel, as real keys have
    return kv


@pytest.fixture
def make_store():
    """KVStore factory; every store is closed after the test (each holds its CPU tier in RAM)."""
    made = []

    def make(url, codec="fp16", identity="test-identity", **kw) -> KVStore:
        kw.setdefault("hot_cache_gb", 0.05)
        store = KVStore(url, get_codec(codec), identity, **{"timeout_s": 5, "backoff_s": 1, **kw})
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def url_for(tmp_path, scheme, servers) -> str:
    return {"fs": f"fs://{tmp_path / 'kv'}", "memory": "memory://"}.get(scheme) or servers[scheme].url


@pytest.fixture
def servers(request):
    """The server fixtures a parametrized backend needs, started lazily."""
    class Lazy(dict):
        def __missing__(self, scheme):
            self[scheme] = request.getfixturevalue(f"{scheme}_server")
            return self[scheme]
    return Lazy()


@pytest.mark.servers
@pytest.mark.parametrize("scheme", ["fs", "lm", "redis", "memory"])
def test_exact_round_trip_and_miss(tmp_path, scheme, servers, make_store):
    """fp32 and fp16 come back bit-identical through each backend; a fresh process-like store
    (new LMCache manager, no CPU tier) reads what the first wrote; a miss leaves ``out`` alone."""
    docs = {f"document {i} " * (i + 1): fake_kv(17 + 40 * i, i) for i in range(3)}
    for codec, expect in (("fp32", lambda kv: kv), ("fp16", lambda kv: kv.half().float())):
        url = url_for(tmp_path, scheme, servers)
        writer = make_store(url, codec)
        for text, kv in docs.items():
            assert writer.put(text, kv) > kv.numel() * (4 if codec == "fp32" else 2)
        assert writer.flush(timeout_s=20) and writer.pending == 0
        reader = writer if scheme == "memory" else make_store(url, codec, hot_cache_gb=0)
        for text, kv in docs.items():
            out = torch.full_like(kv, float("nan"))
            assert reader.contains(text, durable=True)
            assert reader.load_into(text, out), (scheme, codec)
            assert torch.equal(out, expect(kv)), (scheme, codec)
        sentinel = torch.full((30, 2, 3, 9, 64), 7.0)
        assert not reader.load_into("a document nobody stored", sentinel)
        assert torch.equal(sentinel, torch.full_like(sentinel, 7.0)), "a miss must not write anything"
        assert not reader.contains("a document nobody stored")
        assert reader.stats.misses == 1 and reader.stats.corrupt == 0 and reader.stats.errors == 0
        assert reader.take_warnings() == []


def test_hot_tier_serves_repeat_loads(tmp_path, make_store):
    store = make_store(f"fs://{tmp_path / 'kv'}")
    kv = fake_kv(33, 1)
    store.put("doc", kv)
    store.flush()
    out = torch.empty_like(kv)
    assert store.load_into("doc", out) and store.load_into("doc", out)
    assert store.stats.hot_hits == 2 and torch.equal(out, kv.half().float())
    cold = make_store(f"fs://{tmp_path / 'kv'}")  # promotes on first load
    assert cold.load_into("doc", out) and cold.load_into("doc", out)
    assert cold.stats.hot_hits == 1



def test_concurrent_loads_count_their_wall_time_once(make_store):
    """The reranker's row streams load at once; ``load_s`` (and so the reported GB/s) counts
    time with any load in flight, not the sum over threads. Every load is still counted."""
    import threading
    import time

    store = make_store("memory://")
    kvs = {f"doc{i}": fake_kv(40, i) for i in range(6)}
    for text, kv in kvs.items():
        store.put(text, kv)
    t0 = time.perf_counter()
    with store._load_clock():  # a second load overlapping the whole of a first one
        time.sleep(0.05)
        with store._load_clock():
            time.sleep(0.05)
    assert 0.1 <= store.stats.load_s <= time.perf_counter() - t0
    outs = {text: torch.empty_like(kv) for text, kv in kvs.items()}
    halves = [list(kvs)[0::2], list(kvs)[1::2]]
    threads = [threading.Thread(target=store.load_many, args=(h, [outs[t] for t in h])) for h in halves]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.stats.hits == len(kvs) and all(torch.equal(outs[t], kv.half().float()) for t, kv in kvs.items())

def test_bad_urls(tmp_path):
    assert parse_store_url("redis://127.0.0.1:6379") == ("redis", "redis://127.0.0.1:6379")
    assert parse_store_url("redis://:pw@127.0.0.1:6379") == ("redis", "redis://:pw@127.0.0.1:6379")
    assert redact_url("redis://:pw@127.0.0.1:6379") == "redis://:***@127.0.0.1:6379"
    assert redact_url("lm://127.0.0.1:1") == "lm://127.0.0.1:1"
    assert parse_store_url(f"fs://{tmp_path}/x")[1] == f"fs://host:0{tmp_path}/x"
    for bad in ("s3://bucket", "lm://nohost", "fs://", "127.0.0.1:80", "redis://host:port"):
        with pytest.raises(StoreError):
            KVStore(bad, get_codec("fp16"), "id")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create"):
        KVStore(f"fs://{blocker}/kv", get_codec("fp16"), "id")


def test_key_changes_with_model_template_codec_text_adapter(llm, tmp_path, make_store):
    """Every input of a document's KV is in its address, so a change can only miss."""
    from hyperrag.model.loading import adapter_hash
    from hyperrag.model.prompts import RerankTemplate
    from hyperrag.rag.rerank import Reranker

    base = Reranker(llm, batch_size=1)
    variants = {
        "base": base.kv_identity,
        "template": Reranker(llm, RerankTemplate(instruction="Is the passage relevant? Yes or No."), batch_size=1).kv_identity,
        "doc limit": Reranker(llm, max_doc_tokens=200, batch_size=1).kv_identity,
        "model": Reranker(dataclasses.replace(llm, fingerprint="other-model"), batch_size=1).kv_identity,
    }
    # An adapter enters through the LLM fingerprint (load_llm appends +lora-<content hash>).
    for name, content in (("adapter a", b"weights-a"), ("adapter b", b"weights-b")):
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(content)
        (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
        fingerprint = f"{llm.fingerprint}+lora-{adapter_hash(folder)}"
        variants[name] = Reranker(dataclasses.replace(llm, fingerprint=fingerprint), batch_size=1).kv_identity
        # the training notes beside the weights (metrics, query-time weights) leave the key alone
        (folder / "hyperrag.json").write_text(json.dumps({"val": {"f1": 0.7}, "retrieval_weight": 2.0}))
        assert f"{llm.fingerprint}+lora-{adapter_hash(folder)}" == fingerprint
    assert len(set(variants.values())) == len(variants), variants
    text = "The Normans gave their name to Normandy."
    addresses = {content_address(ident, get_codec(c), t) for ident in variants.values()
                 for c in ("fp16", "int8", "int4") for t in (text, text + " ")}
    assert len(addresses) == len(variants) * 3 * 2
    # And on disk: an entry written under one identity is a miss under another.
    url = f"fs://{tmp_path / 'kv'}"
    a = make_store(url, "fp16", variants["base"], hot_cache_gb=0)
    b = make_store(url, "fp16", variants["template"], hot_cache_gb=0)
    a.put(text, fake_kv(8, 0))
    a.flush()
    assert not b.load_into(text, torch.empty(30, 2, 3, 8, 64)) and b.stats.corrupt == 0


def test_precompute_resumes_and_reports(reranker, tiny_corpus_dir, tmp_path, make_store):
    from hyperrag.data.corpus import load_corpus
    from hyperrag.kv.planner import plan_corpus
    from hyperrag.rag.precompute import precompute

    texts = [d.text for d in load_corpus(tiny_corpus_dir).docs][:5]
    store = make_store(f"fs://{tmp_path / 'kv'}", "fp16", reranker.kv_identity, hot_cache_gb=0)
    calls = []
    first = precompute(reranker, store, texts[:3] + texts[:1], progress=lambda d, t: calls.append((d, t)))
    assert (first.docs, first.encoded, first.skipped, first.failed) == (3, 3, 0, 0) and first.complete
    assert calls[0] == (0, 3) and calls[-1] == (3, 3)
    plan = plan_corpus(reranker, texts[:3], get_codec("fp16"))
    assert first.bytes == plan.total_bytes and first.tokens == plan.tokens  # the planner is exact
    second = precompute(reranker, store, texts)
    assert (second.encoded, second.skipped, second.replaced) == (2, 3, 0) and second.verified
    out = torch.empty(reranker.decoder.kv_shape(1, reranker.doc_tokens(texts[4]))).squeeze(2)
    assert store.load_into(texts[4], out)


def test_planner_matches_store(make_store):
    from hyperrag.kv.codec import CODECS
    from hyperrag.kv.planner import codec_table, entry_bytes, estimate, geometry_for
    from hyperrag.model.geometry import KVGeometry

    g = geometry_for("smollm2-135m")
    assert g == KVGeometry(30, 3, 64)
    for name in CODECS:
        store = make_store("memory://", name)
        for tokens in (1, 31, 200):
            assert store.put(f"d{tokens}", fake_kv(tokens, tokens)) == entry_bytes(CODECS[name], g, tokens), (name, tokens)
    fp16, int4 = get_codec("fp16"), get_codec("int4")
    plan = estimate(1000, 200, fp16)
    assert plan.total_bytes == 1000 * entry_bytes(fp16, g, 200)
    assert 23040 < plan.bytes_per_token < 23050 and "1,000 docs" in plan.human()
    ragged = estimate(3, [10, 20, 20], int4)
    assert ragged.tokens == 50 and ragged.max_doc_bytes == entry_bytes(int4, g, 20)
    table = {p.codec: p.bytes_per_token for p in codec_table(100, 256)}
    assert table["fp32"] > table["fp16"] > table["int8"] > table["int4"]
    assert table["fp16"] / table["int4"] > 3
    with pytest.raises(ValueError):
        estimate(2, [10], fp16)
    with pytest.raises(ValueError, match="no KV geometry"):
        estimate(1, 10, fp16, model="gpt-9")


def test_auto_cpu_tier_holds_the_corpus(reranker, tmp_path):
    """``hot_cache_gb = -1`` (the default) sizes the CPU tier to the corpus's entries, so a
    server's steady-state loads never wait on the backend; bounded by a quarter of memory and
    by what the memory budget leaves."""
    from hyperrag.data.corpus import load_corpus
    from hyperrag.kv.planner import budget_room_gb, hot_tier_gb, memory_bytes, memory_fit, plan_corpus
    from hyperrag.model.loading import MODELS
    from hyperrag.common.memory import resident_bytes
    from hyperrag.rag.runtime import open_store
    from hyperrag.common.settings import Settings

    gib = 2**30
    assert hot_tier_gb(1 * gib, memory=64 * gib) == pytest.approx(1.1)
    assert hot_tier_gb(10 * 2**20, memory=64 * gib) == 0.5  # small corpora keep room for uploads
    assert hot_tier_gb(100 * gib, memory=16 * gib) == 4.0  # never more than a quarter of memory
    assert hot_tier_gb(1 * gib, memory=64 * gib, room_gb=0.4) == 0.4  # within what the budget leaves
    assert hot_tier_gb(1 * gib, memory=64 * gib, room_gb=-0.3) == 0.0  # nothing left: no tier
    smol, gemma = memory_fit("smollm2-135m"), memory_fit("gemma3-270m")
    assert budget_room_gb(3.0, "smollm2-135m", resident_bytes=2 * gib) == pytest.approx(3e9 / gib - 2 - smol.margin_gb)  # decimal GB
    assert budget_room_gb(0.0, "smollm2-135m") is None  # no budget
    # -1: the packaged model's own budget and margin; another model has none unless one is set,
    # and then the largest measured margin
    assert budget_room_gb(-1, "gemma3-270m", resident_bytes=2 * gib) == pytest.approx(gemma.budget_gb * 1e9 / gib - 2 - gemma.margin_gb)
    assert budget_room_gb(-1, "some/folder") is None
    assert budget_room_gb(4.0, "some/folder", resident_bytes=2 * gib) == pytest.approx(
        4e9 / gib - 2 - max(m.memory.margin_gb for m in MODELS.values() if m.memory))
    assert 0 < memory_bytes() <= 2**60

    settings = Settings.from_env(store_url=f"fs://{tmp_path / 'kv'}", codec="fp16", memory_budget_gb=0.0)
    assert settings.hot_cache_gb == -1
    texts = [d.text for d in load_corpus(settings.corpus).docs]  # the shipped corpus, ~1.2 GB in fp16
    need = plan_corpus(reranker, texts, get_codec("fp16")).total_bytes / gib
    store = open_store(settings, reranker, texts)
    try:
        assert store.hot_cache_gb == pytest.approx(hot_tier_gb(need * gib)) and store.hot_cache_gb >= min(need, memory_bytes() / 4 / gib)
        assert store.describe()["cpu_tier_gb"] == store.hot_cache_gb
    finally:
        store.close()
    # With a budget the tier takes what the process has not used of it (this one holds a model).
    budget = (resident_bytes() / gib + memory_fit(settings.model).margin_gb + 0.3) * gib / 1e9  # decimal GB
    store = open_store(settings.replace(memory_budget_gb=budget), reranker, texts)
    try:
        assert 0.2 <= store.hot_cache_gb <= 0.3
    finally:
        store.close()
    # The default (-1) is the model's own budget: the one its MemoryFit names
    own = memory_fit(settings.model).budget_gb
    sizes = []
    for value in (-1.0, own):
        store = open_store(settings.replace(memory_budget_gb=value), reranker, texts)
        sizes.append(store.hot_cache_gb)
        store.close()
    assert sizes[0] == pytest.approx(sizes[1], abs=0.02)
    store = open_store(settings.replace(hot_cache_gb=0.2), reranker, texts)  # a set size is kept
    try:
        assert store.hot_cache_gb == 0.2
    finally:
        store.close()


def test_resize_tier_reopens_the_store_at_the_size_it_planned(reranker, tmp_path, monkeypatch):
    """A model switch's ``Runtime.resize_tier``: the store re-opens with the tier size it planned
    (planned once), keeps the settings' automatic -1, and what was stored is still there."""
    from hyperrag.common.settings import Settings
    from hyperrag.rag import runtime
    from hyperrag.rag.runtime import Runtime, open_store

    settings = Settings.from_env(store_url=f"fs://{tmp_path / 'kv'}", codec="fp16", hot_cache_gb=-1)
    text = "Oxygen is a chemical element with symbol O and atomic number 8."
    live = Runtime(settings, None, reranker, open_store(settings.replace(hot_cache_gb=0.0), reranker))
    live.store.put(text, reranker.encode_docs([text])[0])
    live.store.close()  # flushed to the folder
    live.store = open_store(settings.replace(hot_cache_gb=0.0), reranker)
    plans = []
    monkeypatch.setattr(runtime, "auto_tier_gb", lambda *args: plans.append(args) or 0.25)
    try:
        assert live.resize_tier([text]) == "store CPU tier 0 -> 0.25 GB"
        assert len(plans) == 1 and live.store.hot_cache_gb == 0.25 and live.settings.hot_cache_gb == -1
        out = torch.empty(reranker.decoder.kv_shape(1, reranker.doc_tokens(text))).squeeze(2)
        assert live.store.load_into(text, out)
        assert live.resize_tier([text]) is None  # already that size
    finally:
        live.store.close()
