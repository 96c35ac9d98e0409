"""Reuse, prefix-cached and full prefill must score the same: the core claim of the project."""
from __future__ import annotations

import json

import pytest
import torch

from hyperrag.kv.local import LocalKV
from hyperrag.rag.rerank import FP32_SCORE_BOUND
from tests.conftest import SHIPPED


@pytest.fixture(scope="module")
def squad_batch():
    docs = [json.loads(line) for line in (SHIPPED / "docs.jsonl").read_text().splitlines()]
    queries = [json.loads(line) for line in (SHIPPED / "queries.jsonl").read_text().splitlines()]
    by_id = {d["id"]: d["text"] for d in docs}
    picked = [queries[0], queries[700], queries[1400]]
    # Gold paragraph plus paragraphs of very different lengths, some from other articles.
    others = sorted(by_id.values(), key=len)
    candidates = [others[0], others[5], others[len(others) // 2], others[-40], others[-1][:1500]]
    return [(q["question"], [by_id[q["doc_ids"][0]]] + candidates) for q in picked]


def test_batch_kv_cuts_are_views_of_one_buffer():
    """Rows, a row's columns and the shared prefix all write the one preallocated tensor."""
    from hyperrag.model.batch_kv import BatchKV

    kv = BatchKV(torch.zeros(3, 2, 4, 2, 10, 5))  # layers, K/V, rows, kv heads, columns, head dim
    assert kv.shape[2] == 4 and kv.nbytes == 3 * 2 * 4 * 2 * 10 * 5 * 4
    prefix = torch.randn(3, 2, 2, 3, 5)
    kv.rows(slice(1, 3)).fill_prefix(prefix)
    assert torch.equal(kv.row_view(2, 0, 3), prefix) and not kv.row_view(0, 0, 3).any()
    doc = torch.randn(3, 2, 2, 4, 5)
    kv.rows(slice(1, 3)).row_view(0, 3, 4).copy_(doc)  # row 1 of the whole buffer
    assert torch.equal(kv.tensor[:, :, 1, :, 3:7], doc) and not kv.tensor[:, :, 1, :, 7:].any()
    with pytest.raises(ValueError, match="a batch KV is"):
        BatchKV(torch.zeros(3, 2, 2, 10, 5))


def test_decoder_matches_transformers(llm):
    """Our explicit forward gives the same logits as the Hugging Face model, with F.linear and
    with the kernels measured fastest on this machine for the projections and the output head."""
    from hyperrag.model.decoder import Decoder

    ids = llm.tokenizer("The Normans gave their name to Normandy, a region in France.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = llm.model(ids).logits[0]
    for dec in (Decoder(llm.model), Decoder(llm.model, llm.linear, llm.head_linear)):
        hidden = dec.forward(ids, torch.arange(ids.shape[1])[None], dec.new_kv(1, ids.shape[1]), start=0)
        assert (dec.logits(hidden)[0] - expected).abs().max().item() < FP32_SCORE_BOUND


def test_output_positions_skip_nothing_they_need(llm):
    """With ``out_index`` the last layer runs queries, MLP and norm for one position per row:
    the same hidden states as the whole forward, and the same K/V written for every token
    (causal from column 0, and with a mask after cached columns)."""
    from hyperrag.model.decoder import Decoder, causal_mask

    dec = Decoder(llm.model)
    ids = llm.tokenizer(["The Normans gave their name to Normandy, a region in France.",
                         "Water boils at one hundred degrees Celsius at sea level, said the teacher."],
                        return_tensors="pt", padding=True).input_ids
    bsz, n = ids.shape
    pos = torch.arange(n).expand(bsz, -1)
    every_kv = dec.new_kv(bsz, n)
    every = dec.forward(ids, pos, every_kv, start=0)
    out = torch.tensor([n - 1, 6])
    picked_kv = dec.new_kv(bsz, n)
    picked = dec.forward(ids, pos, picked_kv, start=0, out_index=out)
    # Fewer rows in the last layer's GEMMs may round differently: the fp32 bound, not 1e-5.
    assert torch.allclose(picked, every[torch.arange(bsz), out], atol=FP32_SCORE_BOUND)
    assert torch.allclose(picked_kv.tensor, every_kv.tensor, atol=FP32_SCORE_BOUND)
    p = 4  # the first tokens cached, the rest under a mask, as prefix caching runs them
    tail = dec.forward(ids[:, p:], pos[:, p:], picked_kv, start=p, mask=causal_mask(n - p, p), out_index=out - p)
    assert torch.allclose(tail, picked, atol=FP32_SCORE_BOUND)


def test_load_reranker_builds_on_a_given_model(llm, tmp_path):
    """The one way to build a reranker: on a loaded model as given, with the wording asked for
    and every size from the settings, keyed by all of them."""
    from hyperrag.model.prompts import RerankTemplate
    from hyperrag.rag.runtime import load_reranker
    from hyperrag.common.settings import Settings

    s = Settings(adapter="", cache_dir=str(tmp_path), batch_size=3, max_doc_tokens=100, max_question_tokens=20,
                 max_new_tokens=5, cpu_streams=1)
    template = RerankTemplate(instruction="Does the passage answer the question?")
    r = load_reranker(s, llm, template)
    assert r.llm is llm and r.template is template
    assert (r.batch_size, r.prompt.max_doc_tokens, r.prompt.max_question_tokens, r.runner.answer_tokens) == (3, 100, 20, 5)
    assert r.kv_identity == f"{llm.fingerprint}|{r.decoder.dtype}|{template.digest}|100|hadamard"
    assert load_reranker(s.replace(kv_rotation=0), llm).kv_identity == f"{llm.fingerprint}|{r.decoder.dtype}|" \
        f"{RerankTemplate().digest}|100"
    assert load_reranker(s, llm).template == RerankTemplate()


def test_adapter_model_shares_unchanged_weights_with_the_base(llm, cache_dir):
    """The merged reranker holds only the tensors its adapter changed; the rest are the base
    model's own (held once). Sharing changes no value: every tensor equals the unshared merge,
    and the base model is untouched."""
    from hyperrag.model.loading import load_llm
    from hyperrag.common.settings import SHIPPED_ADAPTER

    top_q = llm.model.model.layers[-1].self_attn.q_proj.weight
    before = top_q.clone()
    shared = load_llm("smollm2-135m", cache_dir, device="cpu", dtype="float32", adapter=str(SHIPPED_ADAPTER),
                      shares=llm.model)
    alone = load_llm("smollm2-135m", cache_dir, device="cpu", dtype="float32", adapter=str(SHIPPED_ADAPTER))
    base = dict(llm.model.named_parameters(remove_duplicate=False))
    same = {n for n, p in shared.model.named_parameters(remove_duplicate=False) if p is base[n]}
    assert "model.embed_tokens.weight" in same and "model.layers.0.mlp.down_proj.weight" in same
    assert "model.layers.29.self_attn.q_proj.weight" not in same  # the adapter changed it
    assert shared.model.lm_head.weight is shared.model.model.embed_tokens.weight  # still tied
    for (name, p), (_, q) in zip(shared.model.named_parameters(), alone.model.named_parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(top_q, before)


def test_reuse_equals_full_prefill(reranker, squad_batch):
    source = LocalKV()
    lengths = {reranker.doc_tokens(d) for _, docs in squad_batch for d in docs}
    assert max(lengths) > 3 * min(lengths), "candidates must differ in length"
    question, docs = squad_batch[0]
    lens = sorted(reranker.doc_tokens(d) for d in docs)
    groups = reranker.runner.layout.query_groups(lens, len(reranker.prompt.query(question).ids))[1]
    assert len(groups) == 2, "the reuse batch must run in two row groups (short and long documents)"
    for question, docs in squad_batch[:2]:
        full = reranker.score(question, docs, "full")
        prefix = reranker.score(question, docs, "prefix")
        reuse = reranker.score(question, docs, "reuse", source)
        for other in (prefix, reuse):
            diff = max(abs(a - b) for a, b in zip(full.scores, other.scores))
            assert diff <= FP32_SCORE_BOUND, diff
            assert sorted(range(len(docs)), key=lambda i: -full.scores[i]) == \
                sorted(range(len(docs)), key=lambda i: -other.scores[i])
    # the second pass over the same documents loaded everything from the source
    again = reranker.score(squad_batch[0][0], squad_batch[0][1], "reuse", source)
    assert again.encoded_docs == 0 and again.query_tokens < min(again.prompt_tokens) / 4


def test_reuse_batches_larger_than_buffer(llm, squad_batch):
    """More candidates than the batch size: chunks through the same buffer, same scores."""
    from hyperrag.rag.rerank import Reranker

    small = Reranker(llm, batch_size=2)
    question, docs = squad_batch[1]
    many = docs[:4] + [docs[0][::-1]]  # 5 candidates, three chunks of at most 2 rows
    source = LocalKV()
    full = small.score(question, many, "full").scores
    reuse = small.score(question, many, "reuse", source).scores
    assert max(abs(a - b) for a, b in zip(full, reuse)) <= FP32_SCORE_BOUND


def test_one_buffer_serves_every_mode(reranker, squad_batch):
    """Full prefill, precompute, KV the store lacks (computed in its own rows of the layout) and
    reuse share the reranker's one batch buffer: whatever ran in it before, reuse equals full
    prefill, and a full prefill (which writes its own prefix) leaves reuse bit-identical."""
    question, docs = squad_batch[2]
    kvs = dict(zip(docs, reranker.encode_docs(docs)))
    full = reranker.score(question, docs, "full").scores
    partial = LocalKV()
    rows = sorted(docs, key=reranker.doc_tokens)  # the layout's row order
    for text in rows[1::2]:  # every other row held: the missing ones are non-adjacent
        partial.put(text, kvs[text])
    first = reranker.score(question, docs, "reuse", partial)
    assert first.encoded_docs == len(docs) - len(docs) // 2
    assert max(abs(a - b) for a, b in zip(full, first.scores)) <= FP32_SCORE_BOUND
    for text in docs:  # what it computed and stored is the document's KV
        assert torch.allclose(partial.entries[text][1], kvs[text], atol=1e-4, rtol=1e-4)
    again = reranker.score(question, docs, "reuse", partial)
    assert again.encoded_docs == 0
    reranker.score(question, docs, "full")
    assert reranker.score(question, docs, "reuse", partial).scores == again.scores


def test_row_streams_keep_row_order():
    from hyperrag.model.rowsplit import row_streams

    streams = row_streams(2)
    assert streams.slices(7) == [slice(0, 7, 2), slice(1, 7, 2)]
    assert streams.slices(3) == [slice(0, 3, 1)]  # one row per stream is not worth a hand-off
    assert streams.run(7, lambda part: [row * 10 for row in range(7)[part]], 1) == [row * 10 for row in range(7)]


def test_row_streams_size_openmp_teams_by_work():
    """Small streams run on their thread count (here one), big ones on the caller's; neither changes
    the caller's count nor the one threads started later begin with."""
    import threading

    import torch

    from hyperrag.model.rowsplit import SMALL_STREAM_TOKENS, row_streams

    streams, caller = row_streams(2), torch.get_num_threads()
    measured, streams.small_threads = streams.small_threads, 1  # what the machine chose, put back below

    def seen(part: slice) -> list[int]:
        return [torch.get_num_threads()] * len(range(4)[part])

    try:
        assert streams.run(4, seen, 1) == [1] * 4
        assert streams.run(4, seen, SMALL_STREAM_TOKENS) == [caller] * 4
        assert streams.run(4, seen, 1) == [1] * 4
    finally:
        streams.small_threads = measured
    later: list[int] = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert torch.get_num_threads() == caller and later == [caller]


def test_row_streams_score_as_one_batch(llm, reranker, squad_batch):
    """Rows run as two concurrent streams score as one batch does, in every mode, and encode
    the same document KV."""
    from hyperrag.rag.rerank import Reranker

    one, two = Reranker(llm, batch_size=8, streams=1), reranker  # the shared fixture runs two streams
    assert (one.runner.rows.size, two.runner.rows.size) == (1, 2)
    source = LocalKV()
    for question, docs in squad_batch[:1]:
        for mode in ("full", "prefix", "reuse"):
            a, b = one.score(question, docs, mode, source).scores, two.score(question, docs, mode, source).scores
            assert max(abs(x - y) for x, y in zip(a, b)) <= FP32_SCORE_BOUND, mode
    docs = squad_batch[0][1]
    for a, b in zip(one.encode_docs(docs), two.encode_docs(docs)):
        assert a.shape == b.shape and (a - b).abs().max().item() <= FP32_SCORE_BOUND


def test_reuse_loads_in_the_row_streams(reranker, squad_batch):
    """Each row stream decodes its own rows into the batch buffer. In the calling thread the
    decode ran on an OpenMP team that libgomp throttles once big streams have run (a full
    prefill): int4 decoding then took ~2.3x as long on 2 cores."""
    import threading

    class Recording(LocalKV):
        def load_into(self, text: str, out: torch.Tensor) -> bool:
            loaders.append((threading.current_thread().name, text))
            return super().load_into(text, out)

    loaders: list[tuple[str, str]] = []
    two = reranker  # the shared fixture: two row streams
    question, docs = squad_batch[0]
    source = Recording()
    for text, kv in zip(docs, two.encode_docs(docs)):
        source.put(text, kv)
    result = two.score(question, docs, "reuse", source)
    assert result.encoded_docs == 0 and sorted(t for _, t in loaders) == sorted(docs)
    names = {name for name, _ in loaders}
    assert len(names) == 2 and all(name.startswith("hyperrag-rows") for name in names), names


def test_long_question_is_truncated_with_notice(reranker, squad_batch):
    _, docs = squad_batch[0]
    result = reranker.score("why " * 500, docs[:2], "full")
    assert result.query_tokens <= reranker.prompt.max_question_tokens + len(reranker.prompt.suffix_ids)
    assert any("cut" in w for w in result.warnings)


def test_length_batches_bound_padding():
    from hyperrag.rag.batch_runner import length_batches

    lengths = [10, 200, 11, 190, 12, 205, 100]
    batches = length_batches(lengths, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        longest = max(lengths[i] for i in batch)
        assert len(batch) * longest <= 1.15 * sum(lengths[i] for i in batch) or len(batch) == 1


# reuse is the serving path; full prefill batched alike runs with -m slow
@pytest.mark.parametrize("mode", ["reuse", pytest.param("full", marks=pytest.mark.slow)])
def test_questions_batched_together_score_as_alone(reranker, squad_batch, mode):
    """Concurrent requests share batches (rows of several questions of different lengths,
    right-padded): each question's scores equal asking alone within the fp32 bound."""
    source = LocalKV()
    requests = [(q, docs[i:]) for i, (q, docs) in enumerate(squad_batch)]  # different doc sets
    assert len({len(reranker.prompt.query(q).ids) for q, _ in requests}) > 1  # padding is exercised
    together = reranker.score_many(requests, mode, source if mode == "reuse" else None)
    for (question, docs), batched in zip(requests, together):
        alone = reranker.score(question, docs, mode, source if mode == "reuse" else None)
        assert len(batched.scores) == len(docs)
        assert max(abs(a - b) for a, b in zip(alone.scores, batched.scores)) <= FP32_SCORE_BOUND
    if mode == "reuse":  # every document was computed once, for the request that met it first
        assert sum(r.encoded_docs for r in together) == len({d for _, docs in requests for d in docs})


def test_stream_threads_are_measured_cached_or_set(llm, tmp_path, monkeypatch):
    """A small row stream's OpenMP thread count comes from timing a reuse-shaped batch on this
    machine (one against all of torch's threads), is cached per CPU model, and a setting wins."""
    import torch

    from hyperrag.model import kernels
    from hyperrag.rag.rerank import Reranker

    monkeypatch.setattr(kernels, "machine_busy", lambda: False)  # caching is what is tested here

    reranker = Reranker(llm, batch_size=4, streams=2)
    first = reranker.tune_streams(str(tmp_path), repeats=1)
    choices = {1, torch.get_num_threads()}
    assert first["source"].startswith("probe") and first["small_stream_threads"] in choices
    assert set(first["figures_ms"]) == {str(n) for n in choices} and all(v > 0 for v in first["figures_ms"].values())
    assert reranker.runner.rows.small_threads == first["small_stream_threads"]
    assert json.loads(next((tmp_path / "kernels").glob("streams-*.json")).read_text())["probes"] == [
        {k: first[k] for k in ("small_stream_threads", "figures_ms")}], "cached (pending a second start's probe)"
    again = reranker.tune_streams(str(tmp_path))
    assert again == first, "one probe per start"
    assert reranker.tune_streams(str(tmp_path), setting=3)["source"] == "setting" and reranker.runner.rows.small_threads == 3
    reranker.tune_streams(str(tmp_path))  # back to the machine's choice for the other tests
    assert reranker.runner.rows.small_threads == first["small_stream_threads"]
    one = Reranker(llm, batch_size=4, streams=1).tune_streams(str(tmp_path))
    assert one == {"small_stream_threads": 1, "source": "one stream"}
