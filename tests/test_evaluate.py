"""The held-out evaluation on a tiny corpus: every system ranked with 95% intervals; answers from
retrieval-only RAG, the traditional generator and the reader, each paired against retrieval-only;
the oracle row reads the gold paragraph alone."""
from __future__ import annotations

import json

import pytest

from hyperrag.rag.metrics import mean_interval
from hyperrag.rag.rerank import FP32_SCORE_BOUND
from tests.conftest import SHIPPED


def test_mean_interval_brackets_the_mean_and_pairs():
    values = [0.0, 1.0] * 20
    lo, hi = mean_interval(values)
    assert lo < 0.5 < hi and hi - lo < 0.5
    assert mean_interval([0.25] * 10) == [0.25, 0.25]  # no spread, no width
    a, b = [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]
    lo, hi = mean_interval([x - y for x, y in zip(a, b)])  # a paired difference
    assert 0.0 == lo < 0.5 < hi <= 1.0  # a never-negative difference: the interval starts at 0


def test_full_check_agreement_from_score_lists():
    """``--check-full`` compares score lists through the one agreement function (ties keep
    retrieval order on both sides)."""
    from hyperrag.evaluate import Candidates, score_records
    from hyperrag.rag.metrics import agreement

    cands = [Candidates(f"q{i}", "?", [], ["a"], ["a", "b", "c"], [0.9, 0.8, 0.7]) for i in range(2)]
    full = [[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]]
    reuse = [[1.0, 1.0, 0.0], [0.0, 1.0, 1.00001]]
    out = agreement(score_records(full, cands, 1), score_records(reuse, cands, 1))
    assert out["compared_queries"] == 2 and out["ranking_agreement"] == 0.5 and out["top_n_agreement"] == 0.5
    assert out["max_abs_score_diff"] == pytest.approx(1.0) and "answer_agreement" not in out


def test_evaluate_on_a_tiny_corpus(tiny_corpus_dir, cache_dir, tmp_path):
    from hyperrag.evaluate import main

    out = tmp_path / "eval.json"
    report = main(["--corpus", str(tiny_corpus_dir), "--cache-dir", cache_dir, "--queries", "3", "--top-k", "4",
                   "--top-n", "2", "--max-new-tokens", "6",
                   "--systems", "retrieval,trained,trained+retrieval,trained@fp32,trained+retrieval@int8:nearest",
                   "--generate", "3", "--generate-systems", "retrieval", "--read", "3",
                   "--read-systems", "retrieval,trained+retrieval,oracle,trained+retrieval@int8:nearest",
                   "--unanswerable", "0.67", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["queries"] == 3
    for name in ("retrieval", "trained", "trained+retrieval"):
        ranking = saved["systems"][name]["ranking"]
        for key in ("recall@1", "recall@5", "ndcg@10"):
            lo, hi = ranking[key + "_ci95"]
            assert 0.0 <= lo <= ranking[key] <= hi <= 1.0, (name, key)
        if name != "retrieval":  # the reranker's own gain over the retriever, question by question
            for key in ("recall@1", "ndcg@10"):
                gain, (lo, hi) = ranking[f"{key}_minus_retrieval"], ranking[f"{key}_minus_retrieval_ci95"]
                assert lo <= gain <= hi
                assert gain == pytest.approx(ranking[key] - saved["systems"]["retrieval"]["ranking"][key])
    assert "recall@1_minus_retrieval" not in saved["systems"]["retrieval"]["ranking"]
    answers = saved["answers"]
    assert set(answers) == {"retrieval+generator", "retrieval+reader", "trained+retrieval+reader", "oracle+reader",
                            "trained+retrieval@int8:nearest+reader"}
    for row in ("retrieval+reader", "trained+retrieval+reader", "oracle+reader", "trained+retrieval@int8:nearest+reader"):
        assert "f1_minus_retrieval_ci95" in answers[row] and answers[row]["questions"] == 3
    # the reranker's own share: the same reader over the retriever's order, paired
    reranked = answers["trained+retrieval+reader"]
    for key in ("f1", "em"):
        lo, hi = reranked[f"{key}_minus_retrieval_reader_ci95"]
        assert lo <= reranked[f"{key}_minus_retrieval_reader"] <= hi
    assert "f1_minus_retrieval_reader" not in answers["retrieval+reader"]
    # two of the three read questions made unanswerable: their gold passage is never a candidate
    records = saved["abstain_records"]
    assert [r["unanswerable"] for r in records].count(True) == 2 and len(records) == 3
    gold = {q["qid"]: q["gold"] for q in saved["per_question"]}
    assert all(not set(r["doc_ids"]) & set(gold[r["qid"]]) for r in records if r["unanswerable"])
    assert len(records[0]["doc_ids"]) == 4 and saved["abstain"]["fused"]["unanswerable"] == 2
    assert answers["oracle+reader"]["top_n"] == 1
    paired = answers["trained+retrieval@int8:nearest+reader"]  # paired with the same reading from exact KV
    lo, hi = paired["f1_minus_exact_ci95"]
    assert lo <= paired["f1_minus_exact"] <= hi and 0.0 <= paired["same_answer_as_exact"] <= 1.0
    assert all(set(q["answers"]) == set(answers) for q in saved["per_question"])
    assert report["reader"]["selection_weight"] >= 0
    # a codec system: the same reranker on document KV stored through the codec, against its exact run
    checks = saved["codec_check"]
    assert set(checks) == {"trained@fp32", "trained+retrieval@int8:nearest"}
    assert checks["trained@fp32"]["max_abs_score_diff"] <= FP32_SCORE_BOUND  # fp32 stores the exact bytes
    assert checks["trained@fp32"]["ndcg@10_minus_exact"] == 0.0
    assert checks["trained+retrieval@int8:nearest"]["max_abs_score_diff"] > 0.0  # lossy: not the exact scores
    # scores taken from that record: the same metrics, intervals and pairings as ranked here
    again = main(["--corpus", str(tiny_corpus_dir), "--cache-dir", cache_dir, "--queries", "3", "--top-k", "4",
                  "--systems", "retrieval,trained+retrieval", "--scores-from", str(out)])
    assert again["systems"]["trained+retrieval"]["scores_from"] == str(out)
    for key in ("recall@1", "recall@1_ci95", "ndcg@10_minus_retrieval", "ndcg@10_minus_retrieval_ci95"):
        assert again["systems"]["trained+retrieval"]["ranking"][key] == saved["systems"]["trained+retrieval"]["ranking"][key]
    with pytest.raises(SystemExit, match="list trained before it"):
        main(["--corpus", str(tiny_corpus_dir), "--cache-dir", cache_dir, "--queries", "1", "--systems", "trained@int4"])


def test_query_first_prefix_cache_scores_like_its_full_prefill(reranker):
    """The query-first baseline with ``[instruction][question]`` cached scores every candidate as
    the whole query-first prompt does (the bench times it; it must compute the same thing)."""
    from hyperrag.rag.query_first import QueryFirstScorer
    from hyperrag.rag.rerank import FP32_SCORE_BOUND

    docs = [json.loads(line)["text"] for line in (SHIPPED / "docs.jsonl").read_text().splitlines()[:5]]
    qf = QueryFirstScorer(reranker)
    full = qf.score("Who founded the duchy of Normandy?", docs)
    cached = qf.score("Who founded the duchy of Normandy?", docs, cached=True)
    assert max(abs(a - b) for a, b in zip(full, cached)) <= FP32_SCORE_BOUND
