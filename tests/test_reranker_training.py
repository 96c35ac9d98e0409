"""The trained reranker and reader: the shipped LoRA adapter loads, ranks gold paragraphs first,
keys the KV store; the packed training forward is the inference computation for both jobs; the
training script runs, writes a loadable adapter and resumes from its checkpoint."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from hyperrag.common.settings import SHIPPED_ADAPTER as ADAPTER, Settings
from tests.conftest import SHIPPED


@pytest.fixture(scope="module")
def trained_reranker(tiny_engine):
    """The shipped adapter's reranker as the engine builds it (fp32), loaded once for every test file."""
    assert tiny_engine.runtime.settings.adapter == str(ADAPTER)
    return tiny_engine.runtime.reranker


@pytest.fixture(scope="module")
def trained_llm(trained_reranker):
    return trained_reranker.llm


@pytest.fixture(scope="module")
def dev():
    docs = {d["id"]: d for d in map(json.loads, (SHIPPED / "docs.jsonl").read_text().splitlines())}
    queries = {q["id"]: q for q in map(json.loads, (SHIPPED / "queries.jsonl").read_text().splitlines())}
    return docs, queries


def test_shipped_adapter_is_the_default_and_loads(trained_llm):
    from hyperrag.model.loading import adapter_hash

    assert Settings().adapter == str(ADAPTER)
    # a size budget for the repo, wheel and Space: rank 32 on 20 layers in fp32 is 26 MB
    assert (ADAPTER / "adapter_model.safetensors").stat().st_size < 32 * 2**20
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert trained_llm.fingerprint.startswith("smollm2-135m@")  # the packaged id and its weights hash
    assert trained_llm.fingerprint.endswith(f"+lora-{adapter_hash(ADAPTER)}")
    assert (ADAPTER / "README.md").exists()


# Held-out dev questions where the retriever ranks another paragraph first and the zero-shot model
# is wrong too: (question id, gold paragraph, negatives = the retriever's top two non-gold candidates
# and, where retrieved, a paragraph of another article). Picked from `python -m hyperrag.evaluate`.
CASES = [
    ("57265aaf5951b619008f706c", "ctenophora-016", ["ctenophora-019", "ctenophora-014", "rhine-037"]),
    ("572673f5708984140094c69e", "geology-012", ["geology-018", "geology-014", "ctenophora-006"]),
    ("571163172419e314009555e8", "steam-engine-040", ["steam-engine-012", "steam-engine-008"]),
    ("572985011d04691400779501", "prime-number-014", ["prime-number-001", "prime-number-000"]),
]


def test_trained_reranker_scores_gold_above_negatives(trained_reranker, dev):
    docs, queries = dev
    reranker = trained_reranker
    for qid, gold, negatives in CASES:
        question = queries[qid]["question"]
        assert queries[qid]["doc_ids"] == [gold]
        scores = reranker.score(question, [docs[d]["text"] for d in [gold, *negatives]], "full").scores
        assert scores[0] > max(scores[1:]), (question, scores)


def test_store_key_changes_with_the_adapter(llm, trained_llm, tmp_path):
    from hyperrag.kv.codec import get_codec
    from hyperrag.kv.frame import content_address
    from hyperrag.model.loading import adapter_hash
    from hyperrag.model.prompts import RerankTemplate

    assert llm.fingerprint.startswith("smollm2-135m@") and "+" not in llm.fingerprint  # no adapter: id@weights
    assert "+lora-" in trained_llm.fingerprint

    def identity(fingerprint: str) -> str:  # what Reranker.kv_identity builds from an LLM's fingerprint
        return f"{fingerprint}|torch.float32|{RerankTemplate().digest}|448"

    text, fp16 = "The Normans gave their name to Normandy.", get_codec("fp16")
    base_key = content_address(identity(llm.fingerprint), fp16, text)
    trained_key = content_address(identity(trained_llm.fingerprint), fp16, text)
    assert base_key != trained_key
    # Any change to the adapter's weights changes its hash, hence every document's key.
    other = tmp_path / "adapter"
    shutil.copytree(ADAPTER, other, ignore=shutil.ignore_patterns("checkpoint"))
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "adapter_model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] * 1.01
    save_file(weights, other / "adapter_model.safetensors")
    assert adapter_hash(other) != adapter_hash(ADAPTER)
    changed = f"{llm.fingerprint}+lora-{adapter_hash(other)}"
    assert content_address(identity(changed), fp16, text) != trained_key


def test_reranker_identity_carries_the_fingerprint(reranker):
    assert reranker.kv_identity.startswith(reranker.llm.fingerprint + "|")


TINY = ["--articles", "2", "--paragraphs-per-article", "4", "--val-articles", "0", "--docs", "3", "--hard", "1",
        "--questions", "2", "--gold-questions", "1", "--max-doc-tokens", "24", "--pool", "8", "--mine-k", "4",
        "--rank", "2", "--lora-layers", "2", "--save-every", "1", "--threads", "1", "--init-adapter", ""]


def test_training_runs_writes_a_loadable_adapter_and_resumes(tmp_path, cache_dir):
    from hyperrag.model.loading import adapter_hash, load_llm
    from hyperrag.train_reranker import main

    out, data = tmp_path / "lora", tmp_path / "data"
    common = TINY + ["--out", str(out), "--data-dir", str(data), "--cache-dir", cache_dir]
    first = main(common + ["--steps", "2"])
    assert first["steps"] == 2
    assert first["check"]["max_diff_train_forward_vs_reranker_full"] < 1e-4  # train and inference agree
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    history = json.loads((out / "checkpoint" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2]
    assert all(h["answer_tokens"] > 0 and h["read"] > 0 for h in history)  # both jobs are trained

    second = main(common + ["--steps", "3", "--no-check"])  # resumes at step 2, runs one more
    assert second["steps"] == 3
    resumed = json.loads((out / "checkpoint" / "history.json").read_text())
    assert [h["step"] for h in resumed] == [1, 2, 3]
    assert resumed[:2] == history  # the first two steps were not redone
    llm = load_llm("smollm2-135m", cache_dir, device="cpu", dtype="float32", adapter=str(out))
    assert llm.fingerprint.endswith(adapter_hash(out))
    assert all(torch.isfinite(p).all() for p in llm.model.parameters())
    with pytest.raises(SystemExit, match="compute"):  # a checkpoint resumes only in its own precision
        main(common + ["--steps", "4", "--no-check", "--compute", "bfloat16"])


def test_bfloat16_training_follows_the_float32_run(tmp_path, cache_dir):
    """bf16 autocast changes the forward's rounding only: the same first step's losses agree with
    fp32's to within bf16's precision (8-bit mantissa, 0.4% per rounding; 5% allows for the
    roundings accumulated over the layers), and the saved LoRA weights stay fp32."""
    from safetensors.torch import load_file

    from hyperrag.train_reranker import main

    runs = {}
    for compute in ("float32", "bfloat16"):
        out = tmp_path / compute
        main(TINY + ["--out", str(out), "--data-dir", str(tmp_path / "data"), "--cache-dir", cache_dir,
                     "--steps", "1", "--no-check", "--compute", compute])
        runs[compute] = json.loads((out / "checkpoint" / "history.json").read_text())[0]
        assert {t.dtype for t in load_file(str(out / "adapter_model.safetensors")).values()} == {torch.float32}
    fp, bf = runs["float32"], runs["bfloat16"]
    assert bf["loss"] != fp["loss"]  # the forward did run in bf16
    for key in ("loss", "ce", "read"):
        assert abs(bf[key] - fp[key]) <= 0.05 * fp[key], (key, fp[key], bf[key])


def test_packed_training_forward_is_the_inference_computation(llm, reranker, dev):
    """Appending a reading target to a question block leaves its relevance score unchanged, and
    the logits before each answer token are the plain model's on the reader's whole prompt."""
    from hyperrag.rag.rerank import FP32_SCORE_BOUND
    from hyperrag.train_reranker import forward_packed, packed_inputs

    docs, queries = dev
    q = next(q for q in queries.values() if q["doc_ids"][0] == "normans-002")
    texts = [docs["normans-002"]["text"], docs["normans-005"]["text"]]
    prompt = reranker.prompt
    plain = packed_inputs(prompt, texts, [q["question"], "Who ruled Normandy?"])
    reading = packed_inputs(prompt, texts, [q["question"], "Who ruled Normandy?"], {(0, 0): q["answers"][0]})
    with torch.no_grad():
        s_plain, _ = forward_packed(llm.model, reranker.score_vec, plain)
        s_read, logits = forward_packed(llm.model, reranker.score_vec, reading)
        assert (s_plain - s_read).abs().max().item() <= FP32_SCORE_BOUND
        target = prompt.answer_ids(q["answers"][0])
        assert reading.answer_ids.tolist() == target
        ids = prompt.prefix_ids + list(prompt.doc_ids(texts[0])) + prompt.read_query(q["question"]).ids + target[:-1]
        full = llm.model(torch.tensor([ids])).logits[0, -len(target):]
    assert (full - logits).abs().max().item() <= FP32_SCORE_BOUND  # 3.8e-5 measured (AMD EPYC)


def llama_packed_reference(model, score_vec: torch.Tensor, packed):
    """The packed forward as it was hand-written for Llama (before it became the model's own
    forward with a 4D mask): the reference the family-agnostic one must reproduce on SmolLM2."""
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    body, cfg = model.model, model.config
    n_heads, n_kv, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    bsz, width = packed.ids.shape
    x = body.embed_tokens(packed.ids)
    cos, sin = body.rotary_emb(x, packed.pos)
    for layer in body.layers:
        attn, h = layer.self_attn, layer.input_layernorm(x)
        q = attn.q_proj(h).view(bsz, width, n_heads, head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(bsz, width, n_kv, head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(bsz, width, n_kv, head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=packed.mask, enable_gqa=n_heads != n_kv)
        x = x + attn.o_proj(o.transpose(1, 2).reshape(bsz, width, n_heads * head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    picked = x[torch.arange(bsz)[:, None], packed.last]
    return body.norm(picked) @ score_vec, model.lm_head(body.norm(x[packed.answer_at[:, 0], packed.answer_at[:, 1]]))


def test_packed_forward_is_the_hand_written_llama_one(llm, reranker, dev):
    from hyperrag.train_reranker import forward_packed, packed_inputs

    docs, queries = dev
    q = next(q for q in queries.values() if q["doc_ids"][0] == "normans-002")
    packed = packed_inputs(reranker.prompt, [docs["normans-002"]["text"], docs["normans-005"]["text"]],
                           [q["question"], "Who ruled Normandy?"], {(0, 0): q["answers"][0]})
    with torch.no_grad():
        scores, logits = forward_packed(llm.model, reranker.score_vec, packed)
        ref_scores, ref_logits = llama_packed_reference(llm.model, reranker.score_vec, packed)
    assert (scores - ref_scores).abs().max().item() <= 1e-5  # 0.0 measured (AMD EPYC)
    assert (logits - ref_logits).abs().max().item() <= 1e-4


def test_packed_forward_runs_gemma3_past_its_sliding_window(llm):
    """Gemma 3 (scaled embeddings, q/k norms, sandwich norms, local/global layers): each packed
    block scores as its own full prompt even where the prompt is longer than the sliding window
    and the packed row is longer still."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from hyperrag.model.prompts import RerankPrompt, RerankTemplate
    from hyperrag.train_reranker import forward_packed, packed_inputs

    tok = llm.tokenizer
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=16, layer_types=["sliding_attention", "full_attention",
                                                                             "sliding_attention"],
        attn_implementation="sdpa")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    prompt = RerankPrompt(tok, RerankTemplate.for_tokenizer(tok), 40, 16)
    docs = ["The Normans gave their name to Normandy, a region in the north of France, in the tenth century.",
            "Oxygen is a chemical element."]
    questions = ["Who gave their name to Normandy?", "What is oxygen?"]
    packed = packed_inputs(prompt, docs, questions)
    assert len(prompt.prefix_ids) + len(prompt.doc_ids(docs[0])) > 16  # past the window
    yes_no = model.lm_head.weight[[prompt.yes_id, prompt.no_id]]
    with torch.no_grad():
        scores, _ = forward_packed(model, yes_no[0] - yes_no[1], packed)
        for d, doc in enumerate(docs):
            for j, question in enumerate(questions):
                ids = prompt.prefix_ids + list(prompt.doc_ids(doc)) + prompt.query(question).ids
                logits = model(torch.tensor([ids])).logits[0, -1]
                full = (logits[prompt.yes_id] - logits[prompt.no_id]).item()
                assert abs(scores[d, j].item() - full) <= 1e-5, (d, j, scores[d, j].item(), full)


def test_a_later_stage_on_new_articles_keeps_the_held_out_articles():
    from hyperrag.train_reranker import article_split

    train, val = article_split(442, 100, 3, seed=0)
    later, later_val = article_split(442, 100, 3, seed=0, first=103, val_start=100)
    assert later_val == val  # chosen on the same held-out questions as the stages before
    assert not set(later) & (set(train) | set(val)) and len(later) == 100
    with pytest.raises(ValueError, match="overlap"):
        article_split(442, 100, 3, seed=0, first=50, val_start=100)
    with pytest.raises(ValueError, match="only 442"):  # past the end: never a silently short stage
        article_split(442, 100, 3, seed=0, first=400, val_start=100)
