"""Where a model comes from and what it is: packaged ids, Hugging Face folders (relative or
absolute), GGUF files, Hub ids (refused at once offline); the weights hash in the KV identity
(one store, two models: nothing served across); and the refusals, each naming the model and
what is wrong before anything is stored. Tiny random models beside a small BPE tokenizer with
SmolLM2's chat template."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from hyperrag.model.loading import MODELS, ModelError, load_llm, model_folder, resolve_model

FAST = {"device": "cpu", "dtype": "float32", "cpu_linear": "aten"}  # no kernel timing in tests
TEXTS = ["The Normans gave their name to Normandy, a region in France.",
         "Oxygen is a chemical element with symbol O and atomic number 8.",
         "The Rhine flows from the Swiss Alps to the North Sea."]


@pytest.fixture(scope="module")
def smollm2_tokenizer(cache_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_folder("smollm2-135m", cache_dir))


def tiny_llama(tokenizer, seed: int, **changes):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **changes)
    return LlamaForCausalLM(config)


def save(folder: Path, model, tokenizer) -> Path:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("models")
    return {"a": save(root / "a", tiny_llama(tokenizer, 0), tokenizer),
            "a copy": save(root / "copy-of-a", tiny_llama(tokenizer, 0), tokenizer),
            "b": save(root / "b", tiny_llama(tokenizer, 1), tokenizer)}


def test_a_folder_loads_by_relative_and_absolute_path(folders, cache_dir, monkeypatch):
    absolute = load_llm(str(folders["a"]), cache_dir, **FAST)
    monkeypatch.chdir(folders["a"].parent)
    relative = load_llm("a", cache_dir, **FAST)
    assert relative.fingerprint == absolute.fingerprint
    assert absolute.fingerprint.startswith("llama@") and "/" not in absolute.fingerprint  # weights, not the path
    ids = torch.tensor([relative.tokenizer.encode("The Normans")])
    assert torch.equal(relative.model(ids).logits, absolute.model(ids).logits)


def test_the_fingerprint_is_the_weights(folders, cache_dir, tmp_path, tokenizer):
    from hyperrag.model.loading import weights_hash

    a, copy, b = (load_llm(str(folders[k]), cache_dir, **FAST).fingerprint for k in ("a", "a copy", "b"))
    assert a == copy  # the same weights wherever they lie
    assert a != b
    # Other weights saved at the same path: the cached digest (path, size, mtime) does not stick.
    reused = save(tmp_path / "m", tiny_llama(tokenizer, 0), tokenizer)
    first = weights_hash(reused, cache_dir)
    time.sleep(0.01)
    save(reused, tiny_llama(tokenizer, 1), tokenizer)
    assert weights_hash(reused, cache_dir) != first
    assert weights_hash(reused, cache_dir) == b.split("@")[1]


def test_one_store_two_models_nothing_served_across(folders, cache_dir, tmp_path):
    """Model b, its weights saved where model a's were, reads model a's store: every document is a
    miss and is encoded anew; a's entries are still there for a."""
    import shutil

    from hyperrag.kv.codec import get_codec
    from hyperrag.kv.store import KVStore
    from hyperrag.rag.precompute import precompute
    from hyperrag.rag.rerank import Reranker

    path = tmp_path / "model"
    shutil.copytree(folders["a"], path)
    url = f"fs://{tmp_path / 'kv'}"
    rerankers, reports = {}, {}
    for name in ("a", "b", "a again"):
        if name == "b":
            shutil.rmtree(path)
            shutil.copytree(folders["b"], path)
        if name == "a again":
            shutil.rmtree(path)
            shutil.copytree(folders["a"], path)
        reranker = Reranker(load_llm(str(path), cache_dir, **FAST), batch_size=4)
        store = KVStore(url, get_codec("fp32"), reranker.kv_identity, hot_cache_gb=0, timeout_s=5)
        try:
            reports[name] = precompute(reranker, store, TEXTS)
            store.flush()
        finally:
            store.close()
        rerankers[name] = reranker
    assert reports["a"].encoded == 3
    assert (reports["b"].encoded, reports["b"].skipped) == (3, 0)  # zero entries served across models
    assert (reports["a again"].encoded, reports["a again"].skipped) == (0, 3)
    assert rerankers["a"].kv_identity != rerankers["b"].kv_identity


def write_gguf(path: Path, model, tokenizer) -> Path:
    """A Llama GGUF as llama.cpp's converter writes it (q/k rows permuted, GPT-2 BPE tokenizer in
    the metadata), fp32 tensors."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [""] * len(tokenizer)
    for text, i in {**spec["model"]["vocab"], **{a["content"]: a["id"] for a in spec["added_tokens"]}}.items():
        tokens[i] = text
    added = {a["id"] for a in spec["added_tokens"]}
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(2048), w.add_embedding_length(cfg.hidden_size), w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size), w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads), w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps), w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(len(tokens)), w.add_tokenizer_model("gpt2"), w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_bos_token_id(tokenizer.bos_token_id), w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_chat_template(tokenizer.chat_template)

    def permuted(t, heads):  # llama.cpp's order of the rotary halves
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[f"{p}{hf}.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permuted(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permuted(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    """A byte-level BPE of 307 tokens with SmolLM2's chat template ('Yes' and 'No' single tokens):
    a GGUF's tokenizer is rebuilt token by token on load, so a small vocabulary keeps it fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(TEXTS) + " Yes No Answer Question Document"] * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    small = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                    unk_token="<|endoftext|>")
    small.chat_template = smollm2_tokenizer.chat_template
    return small


def test_a_gguf_file_loads(tmp_path, tokenizer, cache_dir, monkeypatch):
    model = tiny_llama(tokenizer, 0).eval()
    write_gguf(tmp_path / "tiny.gguf", model, tokenizer)
    monkeypatch.chdir(tmp_path)
    llm = load_llm("tiny.gguf", cache_dir, **FAST)
    assert llm.fingerprint.startswith("llama@")
    ids = torch.tensor([tokenizer.encode("The Normans gave their name to Normandy.")])
    assert llm.tokenizer.encode("The Normans gave their name to Normandy.") == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(llm.model(ids).logits, model(ids).logits)
    assert load_llm(str(tmp_path / "tiny.gguf"), cache_dir, **FAST).fingerprint == llm.fingerprint  # parsed once


def test_a_packaged_model_is_joined_from_its_chunks(tmp_path, monkeypatch):
    import hashlib

    from hyperrag.model import loading

    gemma = MODELS["gemma3-270m"]
    assert len(gemma.chunks) == 4 and gemma.sha256 and gemma.base_model == "google/gemma-3-270m"
    parts = []
    for i, c in enumerate(gemma.chunks):
        parts.append(tmp_path / c.path.rsplit("/", 1)[1])
        parts[-1].write_bytes(bytes([i]) * 1000)
    monkeypatch.setattr(loading, "packaged_path", lambda spec, cache: parts[gemma.chunks.index(spec)])
    joined = b"".join(p.read_bytes() for p in parts)
    with pytest.raises(ModelError, match="sha256"):  # a damaged or foreign chunk is refused
        loading.packaged_file(gemma, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "packages").iterdir())  # nothing half-written left behind
    spec = loading.PackagedModel(**{**gemma.__dict__, "sha256": hashlib.sha256(joined).hexdigest()})
    monkeypatch.setattr(loading, "packaged_path", lambda s, cache: parts[spec.chunks.index(s)])
    assert loading.packaged_file(spec, tmp_path / "cache").read_bytes() == joined


# -- refusals: each names the model and what is wrong --------------------------------------------

def test_unknown_ids_and_hub_ids_offline(cache_dir, monkeypatch):
    with pytest.raises(ModelError, match=r"unknown model 'no-such-model'.*smollm2-135m"):
        resolve_model("no-such-model", cache_dir)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match=r"'someorg/somemodel'.*offline.*--model DIR") as e:
        load_llm("someorg/somemodel", cache_dir, **FAST)
    assert time.perf_counter() - t0 < 1.0  # at once: no network tries, no retries
    assert "HF_HUB_OFFLINE" in str(e.value)
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve_model("missing.gguf", cache_dir)


def test_a_folder_without_weights_or_tokenizer(folders, tmp_path, tokenizer, cache_dir):
    import shutil

    no_weights = tmp_path / "no-weights"
    shutil.copytree(folders["a"], no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelError, match=r"no-weights.*no weights"):
        load_llm(str(no_weights), cache_dir, **FAST)
    no_tokenizer = save(tmp_path / "no-tokenizer", tiny_llama(tokenizer, 0), None)
    with pytest.raises(ModelError, match=r"no-tokenizer.*no tokenizer"):
        load_llm(str(no_tokenizer), cache_dir, **FAST)


def test_an_unsupported_architecture_is_refused_by_name(tmp_path, tokenizer, cache_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = save(tmp_path / "gpt2", GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1,
                                                                n_head=2)), tokenizer)
    with pytest.raises(ModelError, match=r"gpt2.*not supported.*gpt2"):
        load_llm(str(folder), cache_dir, **FAST)


def test_a_gguf_that_does_not_parse(tmp_path, cache_dir):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(256))
    with pytest.raises(ModelError, match=r"broken\.gguf.*does not load as a GGUF model"):
        load_llm(str(bad), cache_dir, **FAST)
    from hyperrag.model.loading import file_digest

    assert not (Path(cache_dir) / "models" / f"gguf-{file_digest(bad, cache_dir)[:16]}").exists()


def char_tokenizer():
    """A tokenizer of single characters: 'Yes' is three tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = "<>?" + "".join(chr(c) for c in range(32, 127)) + "\n"
    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(dict.fromkeys(chars))}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="?")),
                                   eos_token="<eos>", unk_token="?")


def test_yes_no_must_be_single_tokens(tmp_path, cache_dir):
    tok = char_tokenizer()
    assert len(tok.encode("Yes", add_special_tokens=False)) == 3
    folder = save(tmp_path / "chars", tiny_llama(tok, 0), tok)
    with pytest.raises(ModelError, match=r"chars.*cannot score relevance.*' Yes' is 4 tokens"):
        load_llm(str(folder), cache_dir, **FAST)


def test_an_adapter_for_another_model_is_refused(folders, cache_dir, tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    from hyperrag.common.settings import SHIPPED_ADAPTER
    from hyperrag.model.loading import weights_hash

    with pytest.raises(ModelError, match=r"does not fit model .*trained on 'smollm2-135m'.*--adapter ''"):
        load_llm(str(folders["a"]), cache_dir, adapter=str(SHIPPED_ADAPTER), **FAST)
    adapter = tmp_path / "lora-a"
    lora = get_peft_model(tiny_llama(tokenizer, 0),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(adapter)
    (adapter / "hyperrag.json").write_text(json.dumps({"engine_model_id": str(folders["a"]),
                                                       "model_hash": weights_hash(folders["a"], cache_dir)}))
    assert "+lora-" in load_llm(str(folders["a"]), cache_dir, adapter=str(adapter), **FAST).fingerprint
    assert "+lora-" in load_llm(str(folders["a copy"]), cache_dir, adapter=str(adapter), **FAST).fingerprint
    with pytest.raises(ModelError, match=r"does not fit model .*/b'.*weights hash"):
        load_llm(str(folders["b"]), cache_dir, adapter=str(adapter), **FAST)
    # peft's own record of the base model, where no hyperrag.json says more (an adapter from elsewhere)
    (adapter / "hyperrag.json").unlink()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "google/gemma-3-270m"}))
    with pytest.raises(ModelError, match=r"does not fit model 'smollm2-135m'.*base model is 'google/gemma-3-270m'"):
        load_llm("smollm2-135m", cache_dir, adapter=str(adapter), **FAST)


def test_nothing_is_stored_when_the_model_is_refused(tmp_path, cache_dir, folders):
    """The engine refuses a bad model before it opens the store: the store's files are untouched."""
    from hyperrag.common.settings import Settings
    from hyperrag.rag.pipeline import Engine

    store = tmp_path / "kv"
    store.mkdir()
    (store / "entry").write_bytes(b"kept")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in store.rglob("*"))
    bad = tmp_path / "empty-model"
    bad.mkdir()
    for model, adapter in ((str(bad), ""), ("no-such-model", ""), (str(folders["a"]), None)):
        s = Settings(model=model, cache_dir=cache_dir, store_url=f"fs://{store}", device="cpu", dtype="float32",
                     **({} if adapter is None else {"adapter": adapter}))
        with pytest.raises(ModelError):
            Engine.load(s)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in store.rglob("*")) == before


# -- prompts per tokenizer ------------------------------------------------------------------------

def test_prompts_follow_the_tokenizer(smollm2_tokenizer):
    from hyperrag.model.prompts import ChatFormat, GenerateTemplate, GenerationPrompt, RerankPrompt, RerankTemplate

    tokenizer = smollm2_tokenizer
    assert RerankTemplate.for_tokenizer(tokenizer) == RerankTemplate()  # SmolLM2's chat template: unchanged
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    template = RerankTemplate.for_tokenizer(plain)
    assert "<|im_start|>" not in template.prefix + template.suffix and template.digest != RerankTemplate().digest
    prompt = RerankPrompt(plain, template, 100, 20)
    assert (prompt.yes_id, prompt.no_id) == tuple(plain.encode(w, add_special_tokens=False)[0] for w in (" Yes", " No"))
    assert prompt.answer_end_id == plain.eos_token_id
    assert not ChatFormat.of(plain).chat and ChatFormat.of(tokenizer).chat
    assert "<|im_start|>" not in plain.decode(GenerationPrompt(plain, GenerateTemplate(), 50).head_ids)
