"""The generator's cached-head greedy decoding gives exactly Hugging Face's greedy tokens, with
the prompt prefilled in one piece or as two chunks at once."""
import threading

import pytest
import torch

from hyperrag.model.decoder import LayerSync
from hyperrag.rag.generate import MIN_CHUNK_TOKENS, Generator

NORMANS = "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France."
LONG_DOCS = [
    NORMANS + " They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under "
    "their leader Rollo, agreed to swear fealty to King Charles III of West Francia.",
    "The Norman dynasty had a major political, cultural and military impact on medieval Europe and even the "
    "Near East. The Normans were famed for their martial spirit and eventually for their Christian piety.",
    "In the course of the 10th century, the initially destructive incursions of Norse war bands into the rivers "
    "of France evolved into more permanent encampments that included local women and personal property.",
]


@pytest.mark.parametrize("docs", [[NORMANS], LONG_DOCS], ids=["one-piece", "two-chunks"])
def test_greedy_matches_transformers(llm, docs):
    gen = Generator(llm, max_new_tokens=8)
    question = "What region is named after the Normans?"
    ids = gen.prompt.head_ids + gen.prompt.question_ids(question, docs)
    two_chunks = len(ids) - gen.head_len >= 2 * MIN_CHUNK_TOKENS
    assert two_chunks == (len(docs) > 1)  # each case takes the path it is named for
    result = gen.answer(question, docs)
    with torch.no_grad():
        out = llm.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                 eos_token_id=sorted(gen.stop_ids), pad_token_id=llm.tokenizer.eos_token_id)
    expected = [t for t in out[0, len(ids):].tolist() if t not in gen.stop_ids]
    assert llm.tokenizer.decode(expected, skip_special_tokens=True).strip() == result.text
    assert result.text and result.prompt_tokens == len(ids)
    # the head is computed once: a second answer reuses it and gives the same text
    assert gen.answer(question, docs).text == result.text


def test_two_chunk_prefill_equals_one_piece(llm):
    question = "Who was the leader of the Norse raiders?"
    two, one = Generator(llm, streams=2), Generator(llm, streams=1)
    ids = two.prompt.question_ids(question, LONG_DOCS)
    assert two._helper is not None and one._helper is None
    diff = (two._prefill(ids, two.head_len) - one._prefill(ids, one.head_len)).abs().max().item()
    assert diff <= 1e-4
    assert two.answer(question, LONG_DOCS).text == one.answer(question, LONG_DOCS).text


def test_failed_first_chunk_raises_instead_of_hanging(llm, monkeypatch):
    gen = Generator(llm, streams=2)
    ids = gen.prompt.question_ids("Where is Normandy?", LONG_DOCS)
    run_chunk = gen._run_chunk

    def broken_first(chunk, start, after_kv=None):
        if start == gen.head_len:
            raise MemoryError("first chunk broke")
        return run_chunk(chunk, start, after_kv)

    monkeypatch.setattr(gen, "_run_chunk", broken_first)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            gen._prefill(ids, gen.head_len)
        except BaseException as err:  # noqa: BLE001 - recorded for the assertion below
            outcome.append(err)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the second chunk kept waiting for a first chunk that had failed"
    assert isinstance(outcome[0], MemoryError)


def test_layer_sync_releases_the_waiter_on_failure():
    sync = LayerSync(2)
    sync.written(0)
    sync.wait(0)  # marked: returns at once
    sync.fail()
    with pytest.raises(RuntimeError, match="first chunk"):
        sync.wait(1)
