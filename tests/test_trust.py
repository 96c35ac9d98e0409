"""Answers a user can check: calibrated relevance, declining ("not found in these documents"), the
unanswerable-question construction and the reader over the retriever's order.

- the relevance map (score and lead over the best rival) recovers a known logistic map and is
  calibrated on its own data (ECE), and the
  fitted models persist in the adapter's hyperrag.json without changing the adapter's hash;
- the decline threshold separates answerable from unanswerable questions, and the reader declines
  exactly below it; the engine then says so, with the closest passages;
- a question made unanswerable never has its gold passage, nor any passage holding its answer,
  among its candidates.
"""
from __future__ import annotations

import json
import math
import random

import pytest

from hyperrag.model.loading import ADAPTER_META
from hyperrag.rag.calibration import (LEAD_CAP, NOT_FOUND, Relevance, Trust, auroc, choose_threshold,
                                      expected_calibration_error, fit_relevance, leads, load_trust, save_trust, sigmoid)


def synthetic(n: int, a: float, b: float, c: float, seed: int = 0) -> list[tuple[list[float], list[int]]]:
    """``n`` questions of 20 candidates whose labels are drawn so that P(label 1 | score, lead) =
    sigmoid(a x score + c x lead + b) exactly."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        scores = [rng.uniform(-12, 8) for _ in range(20)]
        out.append((scores, [int(rng.random() < sigmoid(a * s + c * m + b)) for s, m in zip(scores, leads(scores))]))
    return out


def test_relevance_recovers_a_known_map_and_is_calibrated():
    questions = synthetic(1000, 0.6, -1.5, 0.4)
    relevance = fit_relevance(questions)
    assert (relevance.a, relevance.c) == pytest.approx((0.6, 0.4), abs=0.1)
    assert relevance.b == pytest.approx(-1.5, abs=0.5)  # the intercept is the loosest: scores sit far from 0
    probs = [p for scores, _ in questions for p in relevance.probs(scores)]
    labels = [y for _, ys in questions for y in ys]
    assert expected_calibration_error(probs, labels) < 0.03
    # a map that is off is seen as off: the same ranking, probabilities pushed towards 1
    assert expected_calibration_error([p for s, _ in questions for p in Relevance(0.6, 1.5, 0.4).probs(s)], labels) > 0.1


def test_a_lead_is_over_the_best_other_candidate_and_clipped():
    assert leads([3.0, 1.0, -2.0]) == [2.0, -2.0, -5.0]
    assert leads([30.0, 1.0]) == [LEAD_CAP, -LEAD_CAP] and leads([0.5]) == [LEAD_CAP] and leads([]) == []
    assert leads([2.0, 2.0]) == [0.0, 0.0]


def test_expected_calibration_error_by_hand():
    # two bins: 0.1 predicted, 1 of 4 relevant (|0.4 - 1| / 8); 0.9 predicted, 4 of 4 (|3.6 - 4| / 8)
    probs, labels = [0.1] * 4 + [0.9] * 4, [1, 0, 0, 0, 1, 1, 1, 1]
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx((0.6 + 0.4) / 8)
    assert expected_calibration_error([], []) == 0.0


def test_threshold_separates_answerable_from_unanswerable():
    answerable = [True] * 6 + [False] * 4
    confidences = [0.9, 0.8, 0.7, 0.65, 0.6, 0.3, 0.55, 0.2, 0.1, 0.05]
    t = choose_threshold(confidences, answerable)
    assert 0.55 < t <= 0.6  # answers 5 of 6, declines all 4 unanswerable: the best balanced accuracy
    assert auroc(confidences, answerable) == pytest.approx(23 / 24)
    with pytest.raises(ValueError, match="answerable and unanswerable"):
        choose_threshold([0.5], [True])


def fake_adapter(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "adapter_config.json").write_text("{}")
    (folder / "hyperrag.json").write_text(json.dumps({"retrieval_weight": 7, "train_articles": ["A"]}))
    return folder


def test_trust_persists_beside_the_adapter_without_changing_its_hash(tmp_path):
    from hyperrag.model.loading import adapter_hash, adapter_meta

    folder = fake_adapter(tmp_path)
    before = adapter_hash(folder)
    assert load_trust(folder) is None and load_trust("") is None
    trust = Trust(Relevance(0.5, -1.0, 0.0), (0.2, 1.0, 0.3, 0.8), 0.42, {"fused": -1.5, "likelihood": -2.0}, {"questions": 10})
    save_trust(folder, trust)
    assert load_trust(folder) == trust
    assert adapter_hash(folder) == before  # the stored document KV stays valid
    assert adapter_meta(folder)["retrieval_weight"] == 7  # the rest of the file is kept


def test_confidence_rises_with_relevance_lead_and_likelihood():
    trust = Trust(Relevance(0.5, -1.0, 0.0), (0.0, 1.0, 0.25, 0.5), 0.5)
    assert trust.confidence([6.0, 1.0], -0.2) > trust.confidence([6.0, 5.0], -0.2) > trust.confidence([6.0, 5.0], -4.0)
    expected = sigmoid(1.0 * 6.0 + 0.25 * (6.0 - 1.0) + 0.5 * -0.2)  # best score, its lead, the likelihood
    assert trust.confidence([1.0, 6.0], -0.2) == pytest.approx(expected)
    assert trust.confidence([6.0], -0.2) == pytest.approx(sigmoid(6.0 + 0.25 * LEAD_CAP - 0.1))  # no rival
    assert trust.relevance_of([2.0]) == [pytest.approx(0.5)]


def test_a_fit_of_other_rule_features_is_refused(tmp_path):
    """A ``trust`` fitted before the rule's features changed is refused by name, never misread
    (its weights would pair with the wrong signals)."""
    folder = fake_adapter(tmp_path)
    old = Trust(Relevance(0.5, -1.0, 0.0), (0.0, 1.0, 0.25, 0.5), 0.5).to_json() | {"rule": [0.0, 1.0, 0.5]}
    del old["rule_features"]
    meta = json.loads((folder / ADAPTER_META).read_text()) | {"trust": old}
    (folder / ADAPTER_META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="refit it with python -m hyperrag.calibrate") as e:
        load_trust(folder)
    assert str(folder) in str(e.value)
    with pytest.raises(ValueError, match="an intercept and 3 weights"):
        Trust(Relevance(0.5, -1.0, 0.0), (0.0, 1.0, 0.5), 0.5)


def test_fit_from_an_evaluation_record():
    """``python -m hyperrag.calibrate``'s fit: relevance from every candidate, the rule and the
    thresholds from answerable vs made-unanswerable questions."""
    from hyperrag.calibrate import check_held_out, fit_trust

    rng = random.Random(1)
    per_question, records = [], []
    for i in range(120):
        unanswerable = i % 2 == 1
        gold_score = rng.gauss(6, 2)
        scores = [rng.gauss(-4, 2) for _ in range(5)] + ([] if unanswerable else [gold_score])
        ids = [f"d{j}" for j in range(len(scores))]
        per_question.append({"gold": ["d5"], "doc_ids": ids, "scores": {"trained+retrieval": scores}})
        logprob = rng.gauss(-3, 1) if unanswerable else rng.gauss(-0.7, 0.5)
        records.append({"unanswerable": unanswerable, "top_scores": sorted(scores, reverse=True)[:3],
                        "logprob": logprob, "f1": 0.0 if unanswerable else 1.0})
    trust = fit_trust({"per_question": per_question, "abstain_records": records})
    assert trust.relevance.a > 0 and trust.rule[1] > 0 and trust.rule[3] > 0  # top score, likelihood
    assert 0 < trust.threshold < 1 and set(trust.baselines) == {"fused", "likelihood"}
    assert trust.fitted_on["questions"] == 120 and trust.fitted_on["in_sample"]["rule"]["auroc"] > 0.95
    check_held_out(["Bacteria"], {"train_articles": ["Time"], "val_articles": ["Madrasa"]})
    with pytest.raises(SystemExit, match="trained or validated on: Saint Barth"):
        check_held_out(["Saint Barth", "Bacteria"], {"train_articles": ["Saint_Barth"]})
    with pytest.raises(SystemExit, match="trained or validated on: Bacteria"):  # in the run it started from
        check_held_out(["Bacteria"], {"train_articles": ["Time"], "warm_start": {"articles": ["Bacteria"]}})


def test_unanswerable_questions_never_have_their_gold_passage_nor_their_answer():
    from hyperrag.data.corpus import Doc
    from hyperrag.evaluate import Candidates, pick_unanswerable, without_gold

    class Index:  # the gold passage ranks first, as it mostly does
        def search(self, question, k):
            return [(f"d{j}", 1.0 - j / 10) for j in range(min(k, 9))]

    texts = {"d3": "It was built in 1889 by Eiffel.", "d5": "The Eiffel Tower, again.", "d6": "Eiffelism is no answer."}
    by_id = {f"d{j}": Doc(f"d{j}", "T", texts.get(f"d{j}", "Nothing to see.")) for j in range(9)}
    c = Candidates("q", "Who?", ["the Eiffel", "x"], ["d0", "d2"], ["d0", "d1", "d2", "d3"], [1.0, 0.9, 0.8, 0.7])
    u = without_gold(Index(), c, 4, by_id)  # d0, d2 gold; d3, d5 hold "Eiffel"; d6's "Eiffelism" is another word
    assert u.doc_ids == ["d1", "d4", "d6", "d7"] and not set(u.doc_ids) & set(c.gold)
    assert u.cosine == pytest.approx([0.9, 0.6, 0.4, 0.3]) and u.answers == c.answers
    assert without_gold(Index(), c, 8, by_id).doc_ids == ["d1", "d4", "d6", "d7", "d8"]  # the corpus runs out
    chosen = pick_unanswerable(10, 0.5, seed=0)
    assert len(chosen) == 5 and chosen == pick_unanswerable(10, 0.5, seed=0) and chosen <= set(range(10))
    with pytest.raises(SystemExit, match="fraction"):
        pick_unanswerable(10, 1.5, 0)


def test_abstain_summary_counts_a_declined_unanswerable_question_as_right():
    from hyperrag.evaluate import abstain_summary

    records = [{"unanswerable": False, "f1": 1.0}, {"unanswerable": False, "f1": 0.5},
               {"unanswerable": True, "f1": 0.0}, {"unanswerable": True, "f1": 0.0}]
    out = abstain_summary([0.9, 0.3, 0.2, 0.6], records, threshold=0.5)
    assert out["auroc"] == pytest.approx(0.75)
    assert out["answerable_answered"] == 0.5 and out["unanswerable_declined"] == 0.5
    assert out["f1_answerable"] == 0.5 and out["f1_answerable_without_declining"] == 0.75
    assert out["f1_overall"] == pytest.approx((1.0 + 0.0 + 1.0 + 0.0) / 4)


def test_the_reader_declines_exactly_below_its_threshold(tiny_engine, monkeypatch):
    """The engine's answer: the reader's guess with its confidence at or above the threshold;
    "not found in these documents" with the closest passages below it. The reader over the
    retriever's order (cosine scores, which the calibration does not map) never declines."""
    reader = tiny_engine.reader
    monkeypatch.setattr(reader, "trust", Trust(Relevance(0.5, -1.0, 0.0), (0.0, 1.0, 0.25, 0.5), 0.5))
    question = tiny_engine.corpus.queries[0].question
    monkeypatch.setattr(reader, "abstain_threshold", 0.0)
    kept = tiny_engine.ask(question, "reader_kv")
    c = kept.confidence
    assert kept.found and 0.0 < c < 1.0 and kept.answer == kept.reading.answer
    assert all(d.relevance is not None and 0 <= d.relevance <= 1 for d in kept.docs)
    assert [d.relevance for d in kept.docs] == pytest.approx(reader.trust.relevance_of([d.score for d in kept.docs]))
    monkeypatch.setattr(reader, "abstain_threshold", c)
    assert tiny_engine.ask(question, "reader_kv").found  # at the threshold: answered
    monkeypatch.setattr(reader, "abstain_threshold", math.nextafter(c, 1.0))
    declined = tiny_engine.ask(question, "reader_kv")
    assert not declined.found and declined.answer == NOT_FOUND
    assert declined.reading.answer == kept.answer and declined.confidence == pytest.approx(c)
    assert declined.ranked_ids == kept.ranked_ids  # the closest passages, best first
    plain = tiny_engine.ask(question, "retrieval_reader")
    assert plain.found and plain.confidence is None and plain.docs[0].relevance is None
    assert [d.retrieval_rank for d in plain.docs] == list(range(1, len(plain.docs) + 1))


def test_abstain_threshold_setting():
    from hyperrag.common.settings import Settings

    assert Settings.from_env({}).abstain_threshold == -1.0  # the adapter's
    assert Settings.from_env({"HYPERRAG_ABSTAIN_THRESHOLD": "0"}).abstain_threshold == 0.0
    with pytest.raises(ValueError, match="abstain_threshold"):
        Settings.from_env({}, abstain_threshold=1.5)


def test_bench_quality_has_the_retrieval_reader_row_and_reranking_gain():
    """The bench's quality part: the reader over the retriever's order is a row of its own, the
    reranked reader's gain over it is paired by question, and a declined answer is counted as
    declined while its EM/F1 score the reader's own answer (every gold question is answerable)."""
    from hyperrag.report import ratio_rows, summarize

    records = []
    for q, (plain, reranked, found) in enumerate([("Paris", "France", True), ("France", "France", True),
                                                  ("Rome", "France", False), ("Rome", "Spain", True)]):
        for mode, answer in (("retrieval_reader", plain), ("reader_kv", reranked)):
            records.append({"query_id": f"q{q}", "mode": mode, "timings": {"total": 0.1}, "ranked_ids": ["d0", "d1"],
                            "top_n": 1, "gold_ids": ["d0"], "answers": ["France"], "reader_answer": answer,
                            "answer": answer if found or mode != "reader_kv" else NOT_FOUND,
                            "found": found or mode != "reader_kv"})
    quality = summarize(records)["quality"]
    assert quality["retrieval_reader"]["f1"] == 0.25 and quality["reader_kv"]["f1"] == 0.75
    assert quality["reader_kv"]["declined"] == 0.25 and quality["retrieval_reader"]["declined"] == 0.0
    gain = quality["reader_kv_minus_retrieval_reader"]
    assert gain["queries"] == 4 and gain["f1"] == pytest.approx(0.5)
    assert gain["f1_ci95"][0] <= 0.5 <= gain["f1_ci95"][1]
    rows = {what: value for what, value, _ in ratio_rows({"quality": quality})}
    assert rows["reranking's own F1 gain (same reader, paired)"].startswith("+0.500 (95% CI")


def declined_result():
    from hyperrag.rag.pipeline import RAGResult, RankedDoc
    from hyperrag.rag.reader import Candidate, Reading

    docs = [RankedDoc("oxygen-003", "Oxygen", "Oxygen was discovered by Scheele and Priestley.", -3.1, 1, 2, None, 0.08),
            RankedDoc("normans-001", "Normans", "Rollo led the Norse raiders.", -4.0, 2, 1, None, 0.03),
            RankedDoc("normans-002", "Normans", "The Norman conquest.", -6.0, 3, 3, None, 0.01)]
    reading = Reading("Scheele", 0, 27, 34, [Candidate(0, "Scheele", -2.5, 3, 27, 34)], logprob=-2.5,
                      confidence=0.12, found=False)
    timings = {"retrieve": 0.01, "kv_load": 0.02, "rerank": 0.1, "generate": 0.05, "total": 0.18}
    return RAGResult("What is the capital of Australia?", "reader_kv", NOT_FOUND, docs, 2, timings,
                     reading=reading, found=False, confidence=0.12)


def test_the_app_shows_a_declined_answer_with_the_closest_passages():
    from hyperrag import ui

    result = declined_result()
    text = ui.answer_markdown(result, None)
    assert "Not found in these documents" in text and "12%" in text
    assert "oxygen-003" in text and "normans-001" in text and "normans-002" not in text  # the top-n passages
    assert "Scheele" in text  # the reader's guess, shown as a guess
    frame = ui.docs_frame(result)
    assert list(frame["P(answers)"]) == ["8%", "3%", "1%"]
    result.found, result.answer, result.confidence = True, "Scheele", 0.93
    text = ui.answer_markdown(result, None)
    assert text.startswith("**Answer:** Scheele") and "confidence 93%" in text and "Not found" not in text


def test_threshold_keeps_a_share_of_answerable_questions_answered():
    answerable = [True] * 6 + [False] * 4
    confidences = [0.9, 0.8, 0.7, 0.65, 0.6, 0.3, 0.55, 0.2, 0.1, 0.05]
    t = choose_threshold(confidences, answerable, min_answered=1.0)  # never decline an answerable one
    assert 0.2 < t <= 0.3 and all(c >= t for c, a in zip(confidences, answerable) if a)


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_each_shipped_adapter_carries_the_fit_its_committed_held_out_record_gives(model):
    """Every packaged model declines: its adapter's ``trust`` is what ``python -m hyperrag.calibrate``
    fits on the committed record it names (measured with this very adapter, on articles it was
    neither trained, validated nor warm-started on), not numbers edited by hand."""
    from hyperrag.calibrate import check_held_out, fit_trust
    from hyperrag.common.settings import SHIPPED_ADAPTERS
    from hyperrag.model.loading import adapter_hash, adapter_meta
    from tests.conftest import REPO

    adapter = SHIPPED_ADAPTERS[model]
    stored = load_trust(adapter)
    assert stored is not None, f"{adapter}: no calibration fitted"
    record = json.loads((REPO / "docs" / "eval" / stored.fitted_on["record"]).read_text())
    assert record["adapter_hash"] == adapter_hash(adapter)
    check_held_out(stored.fitted_on["articles"], adapter_meta(adapter))
    refit = fit_trust(record, {}, stored.fitted_on["min_answered"])
    assert refit.rule == pytest.approx(stored.rule) and refit.threshold == pytest.approx(stored.threshold)
    assert (refit.relevance.a, refit.relevance.b, refit.relevance.c) == pytest.approx(
        (stored.relevance.a, stored.relevance.b, stored.relevance.c))
