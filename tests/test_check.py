"""The answer check: a second LoRA on the top layers, run on the question over the same document KV.

- the reader's check scores equal the check as it is trained (transformers + peft, the prefix and
  document run without the check's LoRA, as the stored KV is computed) within the fp32 bound, and
  the check changes no answer;
- the check's layers are copies: the reranker's own weights and scores stay as they were;
- a check trained on other adapter weights is refused by name; an adapter without one has none.
"""
from __future__ import annotations

import json

import pytest
import torch

from hyperrag.common.settings import SHIPPED_ADAPTER, Settings
from hyperrag.model.loading import ADAPTER_META, CHECK_FOLDER, ModelError, adapter_hash, load_check_layers
from hyperrag.rag.rerank import FP32_SCORE_BOUND
from tests.conftest import SHIPPED


@pytest.fixture(scope="module")
def random_check(tmp_path_factory, cache_dir):
    """An adapter folder (the shipped adapter's files) with a check of random, non-zero LoRA
    weights on its top two layers, and the check's peft model (a model of its own)."""
    from hyperrag.train_verifier import build_model

    folder = tmp_path_factory.mktemp("adapter-with-check")
    for f in SHIPPED_ADAPTER.iterdir():
        if f.is_file():
            (folder / f.name).symlink_to(f)
    settings = Settings.from_env(cache_dir=cache_dir, adapter=str(SHIPPED_ADAPTER))
    torch.manual_seed(0)
    llm, model = build_model(settings, layers=2, rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.eval()
    model.save_pretrained(folder / CHECK_FOLDER)
    (folder / CHECK_FOLDER / ADAPTER_META).write_text(json.dumps({"adapter_hash": adapter_hash(SHIPPED_ADAPTER)}))
    return folder, llm, model


def docs_and_question() -> tuple[str, list[str]]:
    docs = [json.loads(line) for line in (SHIPPED / "docs.jsonl").read_text().splitlines()]
    query = json.loads((SHIPPED / "queries.jsonl").read_text().splitlines()[0])
    return query["question"], [d["text"] for d in docs[:3]]


def test_the_readers_check_is_the_trained_check(random_check, cache_dir):
    from hyperrag.model.loading import load_llm
    from hyperrag.model.prompts import RerankPrompt, RerankTemplate
    from hyperrag.rag.reader import Reader
    from hyperrag.rag.rerank import Reranker
    from hyperrag.train_verifier import check_scores

    folder, trained_llm, model = random_check
    llm = load_llm("smollm2-135m", cache_dir, dtype="float32", adapter=str(folder))
    reranker = Reranker(llm, batch_size=4)
    layers = load_check_layers(folder, llm.model)
    assert sorted(layers) == [28, 29]  # the top two of 30
    before = {n: p.clone() for n, p in llm.model.named_parameters() if ".28." in n or ".29." in n}
    check = reranker.decoder.with_layers(layers)
    question, docs = docs_and_question()
    plain = Reader(reranker.runner, max_rows=3).read(question, docs, [3.0, 2.0, 1.0], mode="full")
    checked = Reader(reranker.runner, max_rows=3, check=check).read(question, docs, [3.0, 2.0, 1.0], mode="full")
    assert [c.text for c in checked.candidates] == [c.text for c in plain.candidates]  # it changes no answer
    assert all(c.check is None for c in plain.candidates) and checked.check is not None

    prompt = RerankPrompt(trained_llm.tokenizer, RerankTemplate.for_tokenizer(trained_llm.tokenizer),
                          reranker.prompt.max_doc_tokens, reranker.prompt.max_question_tokens)
    head = model.get_base_model().lm_head.weight.detach()
    vec = head[prompt.yes_id] - head[prompt.no_id]
    with torch.no_grad():
        trained = [float(check_scores(model, prompt, vec, d, [question])[0]) for d in docs]
    engine = [c.check for c in checked.candidates]
    assert engine == pytest.approx(trained, abs=FP32_SCORE_BOUND)
    # the check differs from the reranker (its LoRA is not zero), and the reranker is untouched
    scores = reranker.score(question, docs, "full").scores
    assert max(abs(a - b) for a, b in zip(scores, engine)) > 100 * FP32_SCORE_BOUND
    assert all(torch.equal(p, before[n]) for n, p in llm.model.named_parameters() if n in before)


def test_a_check_of_other_adapter_weights_is_refused(random_check, tmp_path):
    folder, llm, _ = random_check
    meta = folder / CHECK_FOLDER / ADAPTER_META
    good = meta.read_text()
    try:
        meta.write_text(json.dumps({"adapter_hash": "0123456789abcdef"}))
        with pytest.raises(ModelError, match="trained on adapter weights 0123456789abcdef"):
            load_check_layers(folder, llm.model)
    finally:
        meta.write_text(good)
    assert load_check_layers(tmp_path, llm.model) == {} and load_check_layers("", llm.model) == {}
