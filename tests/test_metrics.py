"""Metrics against hand-computed cases."""
import math

import pytest

from hyperrag.rag.metrics import (agreement, contains_answer, exact_match, f1_score, latency_summary, mrr_at_k, ndcg_at_k, normalize_answer,
                              percentile, recall_at_k)

RANKED = ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("gold,k,expected", [(["a"], 1, 1.0), (["c"], 1, 0.0), (["c"], 3, 1.0),
                                             (["c", "z"], 5, 0.5), ([], 5, 0.0)])
def test_recall(gold, k, expected):
    assert recall_at_k(RANKED, gold, k) == expected


def test_mrr():
    assert mrr_at_k(RANKED, ["c"]) == pytest.approx(1 / 3)
    assert mrr_at_k(RANKED, ["e", "b"]) == pytest.approx(1 / 2)
    assert mrr_at_k(RANKED, ["e"], k=4) == 0.0


def test_ndcg():
    assert ndcg_at_k(RANKED, ["a"]) == 1.0
    assert ndcg_at_k(RANKED, ["b"]) == pytest.approx(1 / math.log2(3))
    # two relevant at ranks 1 and 3: (1 + 1/2) / (1 + 1/log2(3))
    assert ndcg_at_k(RANKED, ["a", "c"]) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    assert ndcg_at_k(RANKED, ["z"]) == 0.0


def test_a_passage_contains_an_answer_as_whole_normalised_words():
    assert contains_answer("Built in 1889, the Eiffel Tower...", ["eiffel tower!", "Paris"])
    assert not contains_answer("Eiffelism spread in 1889.", ["Eiffel", ""])
    assert not contains_answer("anything", [])


def test_squad_normalisation_em_f1():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the Eiffel tower.", ["Eiffel Tower", "Paris"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    # prediction "eiffel tower paris" vs gold "eiffel tower": P = 2/3, R = 1, F1 = 0.8
    assert f1_score("Eiffel Tower, Paris", ["Eiffel Tower"]) == pytest.approx(0.8)
    assert f1_score("London", ["Eiffel Tower"]) == 0.0
    assert f1_score("x", []) == 0.0


def test_latency_summary():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 95) == 5
    summary = latency_summary([0.1, 0.2, 0.3])
    assert summary["p50_ms"] == pytest.approx(200) and summary["mean_ms"] == pytest.approx(200)


def test_agreement_pairs_questions_and_counts_only_answered_ones():
    ref = [{"query_id": "q1", "scores": {"a": 2.0, "b": 1.0, "c": 0.0}, "ranked_ids": ["a", "b", "c"], "top_n": 2,
            "answer": "x"},
           {"query_id": "q2", "scores": {"a": 1.0, "b": 0.5}, "ranked_ids": ["a", "b"], "answer": "y"}]
    other = [{"query_id": "q1", "scores": {"a": 2.0, "b": 0.9, "c": 1.05}, "ranked_ids": ["a", "c", "b"],
              "answer": "x"},
             {"query_id": "q2", "scores": {"a": 1.0, "b": 0.5}, "ranked_ids": ["a", "b"], "answer": "z",
              "generated": False},
             {"query_id": "q3", "scores": {"a": 9.0}, "ranked_ids": ["a"]}]  # not in the reference
    out = agreement(ref, other)
    assert out["compared_queries"] == 2 and out["max_abs_score_diff"] == pytest.approx(1.05)
    assert out["ranking_agreement"] == 0.5  # q1's order differs
    assert out["top_n_agreement"] == 0.5  # q1's top 2 differ; q2 (no top_n) compares every candidate
    assert out["answer_agreement"] == 1.0  # q2 was not generated on one side: not compared
    assert "answer_agreement" not in agreement(ref[1:], other)  # q2 alone: no answer on both sides
    assert agreement(ref, [{"query_id": "q9"}]) == {}
