"""The reader: answers read from stored document KV equal a full prefill of the same prompt.

- every row's greedy tokens equal Hugging Face's greedy decoding of the whole prompt
  ``[prefix][doc][question][suffix][cue]``, and their log-likelihood equals the one the plain
  model gives those tokens, within the documented fp32 bound per token;
- reading from stored KV (``kv``) and computing the documents (``full``) give the same answers;
- span decoding only ever emits a span of the row's document; the selection rule;
- the engine's reader modes end to end, with timings and the answer's place in its document.
"""
from __future__ import annotations

import json

import pytest
import torch

from hyperrag.kv.local import LocalKV
from hyperrag.rag.reader import Candidate, Reader, SpanConstraint, draft, select
from hyperrag.rag.rerank import FP32_SCORE_BOUND
from tests.conftest import SHIPPED


@pytest.fixture(scope="module")
def docs_and_question():
    docs = [json.loads(line) for line in (SHIPPED / "docs.jsonl").read_text().splitlines()]
    normans = [d["text"] for d in docs if d["id"].startswith("normans-")]
    # different lengths, so the rows form two groups and attend over different columns
    picked = sorted(normans[:6], key=len)
    return [picked[0], picked[-1], picked[2]], "Who was the leader of the Norse raiders?"


def three_questions(question: str, docs: list[str]) -> list[tuple[str, list[str], list[float]]]:
    """Reading requests with questions of three lengths (padded query columns when batched)."""
    return [(question, docs, [0.0, 1.0, 2.0]),
            ("When did the Normans first reach Italy, and who led them there?", docs[1:], [1.0, 0.0]),
            ("Who?", docs[::-1], [0.5, 0.0, 1.0])]


def assert_same_reading(a, b) -> None:
    """Same answer and document, every candidate the same text within the fp32 bound per token."""
    assert (a.answer, a.doc) == (b.answer, b.doc)
    for x, y in zip(a.candidates, b.candidates):
        assert (x.doc, x.text) == (y.doc, y.text)
        assert abs(x.logprob - y.logprob) <= FP32_SCORE_BOUND * (x.tokens + 1)


def hf_greedy(llm, ids: list[int], steps: int, stop: set[int]) -> tuple[list[int], float]:
    """Greedy tokens and their summed log-probability from the plain model on the whole prompt
    (Hugging Face's own forward and KV cache, as its ``generate`` decodes)."""
    seq, total, past, new = list(ids), 0.0, None, list(ids)
    with torch.no_grad():
        for step in range(steps + 1):  # as the reader: the token after the last one is scored, not kept
            out = llm.model(torch.tensor([new]), past_key_values=past, use_cache=True, logits_to_keep=1)
            past, logp = out.past_key_values, torch.log_softmax(out.logits[0, -1].float(), -1)
            token = int(logp.argmax())
            total += float(logp[token])
            if token in stop or step == steps:
                break
            seq.append(token)
            new = [token]
    return seq[len(ids):], total


def test_reading_stored_kv_equals_full_prompt(llm, reranker, docs_and_question):
    docs, question = docs_and_question
    reader = Reader(reranker.runner, max_rows=4, max_new_tokens=6, span=False, prune=False)  # every row to its end
    source = LocalKV()
    for text, kv in zip(docs, reranker.encode_docs(docs)):
        source.put(text, kv)
    from_kv = reader.read(question, docs, [0.0] * len(docs), "kv", source)
    computed = reader.read(question, docs, [0.0] * len(docs), "full")
    assert from_kv.encoded_docs == 0 and from_kv.load_s > 0
    prompt = reranker.prompt
    query = prompt.read_query(question).ids
    for kv_c, full_c in zip(from_kv.candidates, computed.candidates):
        assert (kv_c.doc, kv_c.text) == (full_c.doc, full_c.text)
        assert abs(kv_c.logprob - full_c.logprob) <= FP32_SCORE_BOUND * (kv_c.tokens + 1)
        ids = prompt.prefix_ids + list(prompt.doc_ids(docs[kv_c.doc])) + query
        tokens, logprob = hf_greedy(llm, ids, reader.max_new_tokens, reader.stop_ids)
        assert llm.tokenizer.decode(tokens, skip_special_tokens=True).strip() == kv_c.text
        # each step's log-probability within the fp32 bound of the plain model's
        assert abs(logprob - kv_c.logprob) <= FP32_SCORE_BOUND * (len(tokens) + 1), (logprob, kv_c.logprob)


def test_reading_on_the_rerankers_question_kv_equals_running_the_question(reranker, docs_and_question):
    """The reader continues from the question KV the reranker's reuse run computed (only the
    cue runs): the same answers, within the fp32 bound, for questions of different lengths read
    together (padded query columns) and documents in two row groups."""
    docs, question = docs_and_question
    reader = Reader(reranker.runner, max_rows=3, max_new_tokens=6, span=False, prune=False)  # every row to its end
    source = LocalKV()
    requests = three_questions(question, docs)
    ranked = reranker.score_many([(q, ds) for q, ds, _ in requests], "reuse", source, keep_question_kv=True)
    for (q, ds, _), r in zip(requests, ranked):
        assert [kv.shape[3] for kv in r.question_kv] == [len(reranker.prompt.query(q).ids)] * len(ds)
    continued = reader.read_many(requests, "kv", source, [r.question_kv for r in ranked])
    for (q, ds, scores), cont in zip(requests, continued):
        assert_same_reading(reader.read(q, ds, scores, "kv", source), cont)
    with pytest.raises(ValueError, match="only reuse mode"):
        reranker.score_many([(question, docs)], "full", keep_question_kv=True)


@pytest.mark.slow  # reader_first_tokens > 1 is an off-by-default setting
def test_rows_from_the_likeliest_first_tokens(llm, reranker, docs_and_question):
    """``first_tokens=2`` reads each document twice: one row is greedy (as a reader of one row
    per document), the other starts with the second likeliest first token and then goes on
    greedily, as the plain model does on the whole prompt; the answer is the best candidate of all."""
    docs, question = docs_and_question
    source = LocalKV()
    one = Reader(reranker.runner, max_rows=3, max_new_tokens=6, span=False, prune=False)
    two = Reader(reranker.runner, max_rows=3, max_new_tokens=6, span=False, prune=False, first_tokens=2)
    scores = [0.5, 0.0, 1.0]
    greedy, both = one.read(question, docs, scores, "kv", source), two.read(question, docs, scores, "kv", source)
    assert len(both.candidates) == 2 * len(docs)
    prompt, tok = reranker.prompt, llm.tokenizer
    for d in range(len(docs)):
        g = [c for c in greedy.candidates if c.doc == d][0]
        pair = [c for c in both.candidates if c.doc == d]
        same = [c for c in pair if c.text == g.text]
        assert same and abs(same[0].logprob - g.logprob) <= FP32_SCORE_BOUND * (g.tokens + 1)
        other = [c for c in pair if c is not same[0]][0]
        ids = prompt.prefix_ids + list(prompt.doc_ids(docs[d])) + prompt.read_query(question).ids
        with torch.no_grad():
            first = torch.log_softmax(llm.model(torch.tensor([ids])).logits[0, -1].float(), -1)
        second = int(first.topk(2).indices[1])
        rest, logprob = hf_greedy(llm, ids + [second], two.max_new_tokens - 1, two.stop_ids)
        assert other.text == tok.decode([second] + rest, skip_special_tokens=True).strip()
        expected = float(first[second]) + logprob
        assert abs(other.logprob - expected) <= FP32_SCORE_BOUND * (other.tokens + 1), (other.logprob, expected)
    values = [scores[c.doc] + two.selection_weight * c.logprob for c in both.candidates if c.text]
    chosen = [c for c in both.candidates if (c.text, c.doc) == (both.answer, both.doc)][0]
    assert scores[chosen.doc] + two.selection_weight * chosen.logprob == max(values)
    with pytest.raises(ValueError, match="first_tokens"):
        Reader(reranker.runner, first_tokens=0)


def test_a_missing_document_is_computed_and_stored(reranker, docs_and_question):
    docs, question = docs_and_question
    reader = Reader(reranker.runner, max_rows=4, max_new_tokens=3)
    source = LocalKV()
    first = reader.read(question, docs, [0.0] * 3, "kv", source)
    assert first.encoded_docs == 3 and len(source.entries) == 3 and first.warnings
    again = reader.read(question, docs, [0.0] * 3, "kv", source)
    assert again.encoded_docs == 0 and [c.text for c in again.candidates] == [c.text for c in first.candidates]


def test_span_decoding_emits_spans_of_the_row_document(reranker, docs_and_question):
    docs, question = docs_and_question
    reader = Reader(reranker.runner, max_rows=4, max_new_tokens=8, span=True)
    reading = reader.read(question, docs, [3.0, 2.0, 1.0], "full")
    tail = len(reranker.prompt.tail_ids)
    for c in reading.candidates:
        doc_ids = list(reranker.prompt.doc_ids(docs[c.doc]))[:-tail]
        ids = reranker.llm.tokenizer.encode(" " + c.text, add_special_tokens=False) if c.text else []
        answer = reranker.llm.tokenizer.decode(ids)
        assert c.text == "" or answer.strip() in reranker.llm.tokenizer.decode(doc_ids)
        assert c.start < 0 or docs[c.doc][c.start : c.end] == c.text


def test_span_constraint():
    span = SpanConstraint([5, 6, 7, 5, 8], end_id=0)
    assert span.allowed() == [5, 6, 7, 8]  # any token of the document may start; no empty answer
    span.advance(5)
    assert span.allowed() == [0, 6, 8]  # continue either occurrence of 5, or stop
    span.advance(8)
    assert span.allowed() == [0]  # the document ends there: only stopping is left


def test_selection_combines_ranking_and_likelihood():
    cands = [Candidate(0, "Rollo", -4.0, 2), Candidate(1, "Paris", -0.5, 2), Candidate(2, "", 0.0, 0)]
    assert select(cands, [2.0, 1.0, 9.0], weight=0.0) == 0  # ranking alone; an empty answer never wins
    assert select(cands, [2.0, 1.0, 9.0], weight=1.0) == 1  # 1 - 0.5 beats 2 - 4
    assert select([], [], 1.0) == -1


def test_engine_reader_modes(tiny_engine, monkeypatch):
    q = next(q for q in tiny_engine.corpus.queries if q.doc_ids)
    given = []
    read_many = tiny_engine.reader.read_many
    monkeypatch.setattr(tiny_engine.reader, "read_many",
                        lambda requests, mode, source, question_kv=None, **kw: given.append(question_kv) or
                        read_many(requests, mode, source, question_kv, **kw))
    kv = tiny_engine.ask(q.question, "reader_kv")
    full = tiny_engine.ask(q.question, "reader_full")
    assert kv.answer == full.answer and kv.reading.doc == full.reading.doc
    # reader_kv continues from the rerank's question KV of each top document; reader_full runs it
    assert [len(g) for g in given[0]] == [kv.top_n] and all(isinstance(t, torch.Tensor) for t in given[0][0])
    assert given[1] is None and kv.rerank.question_kv == []  # and the result does not hold it
    assert kv.timings["generate"] > 0 and kv.reading.encoded_docs == 0
    assert kv.ranked_ids == full.ranked_ids
    doc = kv.docs[kv.reading.doc]
    assert kv.reading.start < 0 or doc.text[kv.reading.start : kv.reading.end] == kv.reading.answer


def test_questions_read_together_as_alone(reranker, docs_and_question):
    """The reader's rows of several questions (different question lengths, so padded query
    columns) decode together to the answers each question gets alone."""
    docs, question = docs_and_question
    reader = Reader(reranker.runner, max_rows=3, max_new_tokens=6, span=True, prune=False)  # every row to its end
    source = LocalKV()
    requests = three_questions(question, docs)
    assert len({len(reranker.prompt.read_query(q).ids) for q, _, _ in requests}) == 3
    together = reader.read_many(requests, "kv", source)
    for (q, ds, scores), batched in zip(requests, together):
        assert_same_reading(reader.read(q, ds, scores, "kv", source), batched)


# Free decoding is the shipped adapter's choice; span decoding (a setting) runs with -m slow, and
# test_span_decoding_emits_spans_of_the_row_document keeps it in the default run.
SPAN_MODES = [False, pytest.param(True, marks=pytest.mark.slow)]


def test_draft_is_what_follows_the_answer_in_the_document():
    doc = [7, 1, 2, 3, 9, 1, 2, 4, 5]
    assert draft(doc, [1, 2], 3) == [3, 9, 1]  # the first occurrence of the longest suffix
    assert draft(doc, [9, 1, 2], 2) == [4, 5]  # a longer suffix picks the later occurrence
    assert draft(doc, [8, 4], 5) == [5]  # only the last token is there
    assert draft(doc, [8], 3) == [] and draft(doc, [1], 0) == [] and draft(doc, [], 3) == []


@pytest.mark.parametrize("span", SPAN_MODES)
def test_drafted_decoding_equals_one_token_steps(tiny_engine, span):
    """Prompt-lookup drafts change how many forwards a reading takes, not what it reads: the
    trained reader's answers (mostly spans, so drafts are kept) equal one-token steps', with
    the log-likelihood within the fp32 bound per token, in fewer forwards."""
    engine = tiny_engine
    reranker = engine.runtime.reranker
    calls = {"n": 0}
    forward = reranker.decoder.forward_groups

    def counted(*args, **kwargs):
        calls["n"] += 1
        return forward(*args, **kwargs)

    questions = [q for q in engine.corpus.queries if q.doc_ids][:4]
    requests = [(q.question, [engine.corpus.by_id[d].text for d, _ in engine.retrieve(q.question, 3)], [0.0] * 3)
                for q in questions]
    forwards = {}
    readings = {}
    reranker.decoder.forward_groups = counted
    try:
        for k in (0, 8):
            reader = Reader(reranker.runner, max_rows=3, max_new_tokens=12, span=span, draft_tokens=k, prune=False)
            calls["n"] = 0
            readings[k] = [reader.read(q, ds, sc, "kv", engine.runtime.store) for q, ds, sc in requests]
            forwards[k] = calls["n"]
    finally:
        reranker.decoder.forward_groups = forward
    for plain, drafted in zip(readings[0], readings[8]):
        for a, b in zip(plain.candidates, drafted.candidates):
            assert (a.doc, a.text, a.tokens) == (b.doc, b.text, b.tokens)
            assert abs(a.logprob - b.logprob) <= FP32_SCORE_BOUND * (a.tokens + 1)
    assert sum(c.tokens > 1 for r in readings[0] for c in r.candidates) >= 3  # answers long enough to draft
    assert forwards[8] < forwards[0], forwards


@pytest.mark.parametrize("span", SPAN_MODES)
def test_pruning_stops_rows_that_cannot_win_and_keeps_the_answer(tiny_engine, span):
    """A row whose ranking score + w x log-likelihood so far is below a finished answer's can
    never be chosen (the value only falls as it decodes): it stops, and the reading's answer,
    document and log-likelihood are those of decoding every row to its end."""
    engine = tiny_engine
    reranker = engine.runtime.reranker
    questions = [q for q in engine.corpus.queries if q.doc_ids][:4]
    requests = [(q.question, [engine.corpus.by_id[d].text for d, _ in engine.retrieve(q.question, 3)]) for q in questions]
    source = engine.runtime.store
    stopped = 0
    for weight in (0.0, 1.0, 4.0):
        whole = Reader(reranker.runner, max_rows=3, max_new_tokens=12, span=span, selection_weight=weight, prune=False)
        pruning = Reader(reranker.runner, max_rows=3, max_new_tokens=12, span=span, selection_weight=weight)
        for q, docs in requests:
            scores = [2.0, 1.0, 0.0]
            a, b = whole.read(q, docs, scores, "kv", source), pruning.read(q, docs, scores, "kv", source)
            assert (b.answer, b.doc, b.start, b.end) == (a.answer, a.doc, a.start, a.end), (weight, q)
            chosen = next(c for c in b.candidates if c.doc == b.doc)
            assert not chosen.pruned and abs(chosen.logprob - a.candidates[a.doc].logprob) <= FP32_SCORE_BOUND * (chosen.tokens + 1)
            for cut, full in zip(b.candidates, a.candidates):
                assert cut.pruned or cut.text == full.text
                stopped += cut.pruned
                if cut.pruned:  # stopped early (at the latest before its end token): valued at least as high
                    assert cut.tokens <= full.tokens and cut.logprob >= full.logprob - FP32_SCORE_BOUND * (full.tokens + 1)
    assert stopped, "no row was pruned: the test did not exercise pruning"
