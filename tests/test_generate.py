"""The generator's cached-head greedy decoding gives exactly Hugging Face's greedy tokens."""
import torch

from hyperrag.generate import Generator


def test_greedy_matches_transformers(llm):
    gen = Generator(llm, max_new_tokens=8)
    docs = ["The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France."]
    question = "What region is named after the Normans?"
    result = gen.answer(question, docs)
    ids = gen.prompt.head_ids + gen.prompt.question_ids(question, docs)
    with torch.no_grad():
        out = llm.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                 eos_token_id=sorted(gen.stop_ids), pad_token_id=llm.tokenizer.eos_token_id)
    expected = [t for t in out[0, len(ids):].tolist() if t not in gen.stop_ids]
    assert llm.tokenizer.decode(expected, skip_special_tokens=True).strip() == result.text
    assert result.text and result.prompt_tokens == len(ids)
    # the head is computed once: a second answer reuses it and gives the same text
    assert gen.answer(question, docs).text == result.text
