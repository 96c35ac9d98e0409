"""Every supported model family runs exactly: tiny random models built here, no download.

For Llama, Mistral (a sliding window on every layer), Qwen2 (q/k/v biases), Qwen3 (q/k norms)
and Gemma 3 (q/k norms, (1 + w) norms around attention and the MLP, scaled embeddings, an
attention scale of its own, sliding layers with their own RoPE base next to full ones, one KV
head of 256 dims, a final logit cap), each saved as a Hugging Face folder and loaded as users
load one:

- the decoder's logits equal transformers' own forward in fp32 (<= 1e-5);
- the reranker's scores with stored KV equal full and prefix-cached prefill (the fp32 bound),
  and full prefill equals transformers' hidden state;
- the reader (stored KV, drafts, padded rows) and the generator answer with transformers'
  greedy tokens;
- prompts longer than the sliding windows (so the windows cut keys in every mode);
- anything else is refused by name; the KV codecs and the planner take the model's geometry.

Norm weights and biases are perturbed after init (they start at 1 or 0: a forward that skipped
them would still match).
"""
from __future__ import annotations

import json

import pytest
import torch

from hyperrag.kv.codec import get_codec
from hyperrag.kv.local import LocalKV
from hyperrag.kv.planner import geometry_for
from hyperrag.model.geometry import KVGeometry
from hyperrag.model import kernels
from hyperrag.model.families import SLIDING, FULL, UnsupportedModel, architecture, family_of
from hyperrag.rag.rerank import FP32_SCORE_BOUND
from tests.conftest import SHIPPED

WINDOW = 24  # Gemma 3's and Mistral's sliding window: shorter than every prompt below
# Longer than the window by itself: its own tokens, which sit after padded document slots in
# the reuse buffer (columns are not positions there), fall out of each other's window.
LONG_QUESTION = ("In the years after the first raids on the coast, which leader of the Norse raiders agreed to swear "
                 "fealty to the king of West Francia, and what land did he receive in return for it?")
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


def tiny_config(family: str, tok):
    import transformers as tf

    common = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=4096, initializer_range=0.1,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    if family == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**common, num_key_value_heads=1, head_dim=32, sliding_window=WINDOW)
    if family == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=2)
    if family == "qwen3":
        return tf.Qwen3Config(**common, num_key_value_heads=2, head_dim=64)
    return tf.Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=256, sliding_window=WINDOW,
                               layer_types=[SLIDING, SLIDING, FULL, SLIDING], query_pre_attn_scalar=192,
                               final_logit_softcapping=5.0)


@pytest.fixture(scope="session")
def family_folders(cache_dir, tmp_path_factory):
    """One Hugging Face folder per family (config, safetensors, SmolLM2's tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hyperrag.model.loading import model_folder

    tok = AutoTokenizer.from_pretrained(model_folder("smollm2-135m", cache_dir))
    root = tmp_path_factory.mktemp("families")
    folders = {}
    for i, family in enumerate(FAMILIES):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(tiny_config(family, tok), dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.3)
        folders[family] = root / family
        model.save_pretrained(folders[family])
        tok.save_pretrained(folders[family])
    return folders


@pytest.fixture(scope="module", params=FAMILIES)
def family_llm(request, family_folders, tmp_path_factory):
    from hyperrag.model.loading import load_llm

    llm = load_llm(str(family_folders[request.param]), str(tmp_path_factory.mktemp("cache")), device="cpu",
                   dtype="float32", adapter="", cpu_linear="aten")
    assert llm.model.config.model_type == request.param
    return llm


@pytest.fixture(scope="module")
def family_reranker(family_llm):
    from hyperrag.rag.rerank import Reranker

    return Reranker(family_llm, max_doc_tokens=160, batch_size=6)


@pytest.fixture(scope="module")
def texts():
    """Shipped paragraphs of very different lengths (cut to the reranker's limit)."""
    docs = [json.loads(line)["text"] for line in (SHIPPED / "docs.jsonl").read_text().splitlines()]
    by_len = sorted(docs, key=len)
    return ["Rollo led the Norse raiders.", by_len[len(by_len) // 3], by_len[-1], by_len[5], by_len[len(by_len) // 2]]


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_decoder_logits_equal_transformers(family_llm):
    from hyperrag.model.decoder import Decoder

    model = family_llm.model
    ids = family_llm.tokenizer("The Normans were the people who in the 10th and 11th centuries gave their name to "
                               "Normandy, a region in France. They were descended from Norse raiders and pirates from Denmark, "
                               "Iceland and Norway who, under their leader Rollo, agreed to swear fealty to King Charles "
                               "III of West Francia.").input_ids
    windows = [w for w in architecture(model.config).windows if w]
    assert all(len(ids) > 2 * w for w in windows)  # the windows cut keys
    dec = Decoder(model)
    hidden = dec.forward(torch.tensor([ids]), torch.arange(len(ids))[None], dec.new_kv(1, len(ids)), start=0)
    expected = hf_logits(model, ids)
    assert (dec.logits(hidden)[0] - expected).abs().max().item() <= 1e-5
    # the same over cached columns, a second chunk under an explicit mask, at output positions only
    from hyperrag.model.decoder import causal_mask

    kv, p = dec.new_kv(1, len(ids)), 7
    dec.forward(torch.tensor([ids[:p]]), torch.arange(p)[None], kv, start=0)
    tail = dec.forward(torch.tensor([ids[p:]]), torch.arange(p, len(ids))[None], kv, start=p,
                       mask=causal_mask(len(ids) - p, p), out_index=torch.tensor([len(ids) - p - 1]))
    assert (dec.logits(tail)[0] - expected[-1]).abs().max().item() <= 1e-5
    # a rejected draft's column that the rest skips: columns are no longer positions after it
    kv = dec.new_kv(1, len(ids) + 1)
    dec.forward(torch.tensor([ids[:p]]), torch.arange(p)[None], kv, start=0)
    dec.forward(torch.tensor([[ids[0]]]), torch.tensor([[p]]), kv, start=p)
    mask = causal_mask(len(ids) - p, p + 1)
    mask[..., p] = False
    rest = dec.forward(torch.tensor([ids[p:]]), torch.arange(p, len(ids))[None], kv, start=p + 1, mask=mask)
    assert (dec.logits(rest)[0] - expected[p:]).abs().max().item() <= 1e-5


def test_reuse_equals_full_prefill_and_transformers(family_reranker, texts):
    reranker, model = family_reranker, family_reranker.llm.model
    lens = [reranker.doc_tokens(t) for t in texts]
    assert max(lens) > 4 * min(lens) and min(lens) + reranker.runner.prefix_len > WINDOW
    source = LocalKV()
    questions = ["Who led the Norse raiders?", LONG_QUESTION]
    assert len(reranker.prompt.query(LONG_QUESTION).ids) > WINDOW + 16  # + the layout's bucket of padding
    for question in questions:
        full = reranker.score(question, texts, "full")
        for mode in ("prefix", "reuse"):
            other = reranker.score(question, texts, mode, source if mode == "reuse" else None)
            diff = max(abs(a - b) for a, b in zip(full.scores, other.scores))
            assert diff <= FP32_SCORE_BOUND, (mode, diff)
        # full prefill (padded rows) against transformers' last hidden state, read as the reranker does
        query = reranker.prompt.query(question).ids
        for text, score in zip(texts[:2], full.scores):
            ids = reranker.prompt.prefix_ids + list(reranker.prompt.doc_ids(text)) + query
            with torch.no_grad():
                last = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
            assert abs(float(last @ reranker.score_vec) - score) <= FP32_SCORE_BOUND
    again = reranker.score_many([(q, texts) for q in questions], "reuse", source)
    assert all(r.encoded_docs == 0 for r in again)


def test_reader_and_generator_equal_transformers_generate(family_reranker, texts):
    from hyperrag.rag.generate import MIN_CHUNK_TOKENS, Generator
    from hyperrag.rag.reader import Reader

    reranker, llm = family_reranker, family_reranker.llm
    tok, steps, question = llm.tokenizer, 8, LONG_QUESTION
    docs = [texts[0], texts[2], texts[1]]
    reader = Reader(reranker.runner, max_rows=3, max_new_tokens=steps, span=False, prune=False)
    source = LocalKV()
    from_kv = reader.read(question, docs, [0.0] * len(docs), "kv", source)
    computed = reader.read(question, docs, [0.0] * len(docs), "full")
    query = reranker.prompt.read_query(question).ids
    for kv_c, full_c in zip(from_kv.candidates, computed.candidates):
        ids = reranker.prompt.prefix_ids + list(reranker.prompt.doc_ids(docs[kv_c.doc])) + query
        with torch.no_grad():
            out = llm.model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False,
                                     eos_token_id=sorted(reader.stop_ids), pad_token_id=tok.eos_token_id)
        expected = tok.decode([t for t in out[0, len(ids):].tolist() if t not in reader.stop_ids],
                              skip_special_tokens=True).strip()
        assert kv_c.text == full_c.text == expected
    gen = Generator(llm, max_new_tokens=steps)
    few = [texts[0], texts[1]]  # a prompt long enough to prefill as two chunks at once
    ids = gen.prompt.head_ids + gen.prompt.question_ids(question, few)
    assert len(ids) - gen.head_len >= 2 * MIN_CHUNK_TOKENS
    result = gen.answer(question, few)
    with torch.no_grad():
        out = llm.model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False,
                                 eos_token_id=sorted(gen.stop_ids), pad_token_id=tok.eos_token_id)
    expected = [t for t in out[0, len(ids):].tolist() if t not in gen.stop_ids]
    assert tok.decode(expected, skip_special_tokens=True).strip() == result.text


def test_geometry_comes_from_the_model(family_reranker, family_folders):
    reranker = family_reranker
    cfg = reranker.llm.model.config
    geometry = KVGeometry.of(reranker)
    assert geometry == KVGeometry.from_config(cfg) == geometry_for(str(family_folders[cfg.model_type]))
    assert reranker.runner.layout.kv.shape[0] == cfg.num_hidden_layers and reranker.runner.layout.kv.shape[3] == cfg.num_key_value_heads
    assert reranker.runner.layout.kv.shape[-1] == reranker.decoder.head_dim
    layer = reranker.llm.model.model.layers[0]
    projections = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                   layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    assert kernels.projection_shapes(cfg) == [(p.in_features, p.out_features) for p in projections]
    rotation = reranker.decoder.rotation
    assert rotation.shape == (geometry.head_dim,) * 2
    assert torch.allclose(rotation @ rotation.T, torch.eye(geometry.head_dim), atol=1e-6)


def test_the_windows_matter():
    """A sliding layer cuts keys beyond its window: Gemma 3's logits with the window differ from
    the same weights without it (so the tests above could fail), and its layer types and RoPE
    bases are the config's."""
    from transformers import Gemma3TextConfig

    arch = architecture(Gemma3TextConfig(sliding_window=512, layer_types=[SLIDING] * 5 + [FULL],
                                         num_hidden_layers=6, query_pre_attn_scalar=256))
    assert arch.windows == (512,) * 5 + (None,) and arch.attn_scale == 256 ** -0.5
    assert family_of(Gemma3TextConfig()).norm_offset == 1.0
    from transformers import MistralConfig, LlamaConfig

    assert architecture(MistralConfig(sliding_window=None)).windows == (None,) * 32
    assert architecture(MistralConfig(sliding_window=64, num_hidden_layers=2)).windows == (64, 64)
    assert architecture(LlamaConfig(num_hidden_layers=2)).windows == (None, None)


def test_windowed_decoder_differs_from_unwindowed(family_folders):
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from hyperrag.model.decoder import Decoder

    model = AutoModelForCausalLM.from_pretrained(family_folders["gemma3_text"], dtype=torch.float32).requires_grad_(False)
    dec = Decoder(model)
    ids = torch.arange(100, 100 + 3 * WINDOW)[None]
    run = lambda d: d.logits(d.forward(ids, torch.arange(ids.shape[1])[None], d.new_kv(1, ids.shape[1]), start=0))
    windowed = run(dec)
    dec.arch = replace(dec.arch, windows=(None,) * dec.n_layers)
    assert (run(dec) - windowed)[0, WINDOW:].abs().max() > 1e-3
    assert (run(dec) - windowed)[0, :WINDOW].abs().max() <= 1e-5  # the first window's queries see every key anyway


@pytest.mark.parametrize("config", ["Phi3Config", "Gemma2Config", "GPT2Config"])
def test_other_architectures_are_refused_by_name(config):
    import transformers as tf

    cfg = getattr(tf, config)()
    with pytest.raises(UnsupportedModel, match=f"model type '{cfg.model_type}' is not supported; supported: "
                                               "llama, mistral, qwen2, qwen3, gemma3_text"):
        family_of(cfg)


def test_unsupported_options_are_refused():
    from transformers import Gemma3TextConfig

    with pytest.raises(UnsupportedModel, match="attn_logit_softcapping"):
        architecture(Gemma3TextConfig(attn_logit_softcapping=50.0))
    with pytest.raises(UnsupportedModel, match="use_bidirectional_attention"):
        architecture(Gemma3TextConfig(use_bidirectional_attention=True))
    with pytest.raises(UnsupportedModel, match="chunked_attention"):
        architecture(Gemma3TextConfig(num_hidden_layers=2, layer_types=[FULL, "chunked_attention"]))


@pytest.mark.parametrize("name", ["int8", "int4", "int2"])
def test_codecs_take_head_dim_256_and_one_kv_head(name):
    """Gemma 3 270M's KV geometry (one KV head of 256 dims): the compiled decoder equals torch's
    ops, the error is what the bits allow, and Hessian-aware rounding with an identity Hessian
    is nearest rounding."""
    torch.manual_seed(0)
    shape = (3, 2, 1, 70, 256)  # 70 tokens: a last key group shorter than the others
    kv = torch.randn(shape)
    codec = get_codec(name)
    payload = codec.encode(kv)
    assert payload.numel() == codec.nbytes(shape)
    fast, ops = torch.empty(shape), torch.empty(shape)
    codec._decode(payload, shape, fast, kernel=True)
    codec._decode(payload, shape, ops, kernel=False)
    assert torch.equal(fast, ops)
    step = (kv.amax() - kv.amin()) / codec.levels
    assert (fast - kv).abs().max() <= step
    identity = torch.eye(256).expand(3, 2, 1, 256, 256).contiguous()
    assert torch.equal(codec.rounded_by(identity).encode(kv), payload)


def test_planner_knows_the_packaged_models():
    assert geometry_for("smollm2-135m") == KVGeometry(30, 3, 64)
    assert geometry_for("gemma3-270m") == KVGeometry(18, 1, 256)
