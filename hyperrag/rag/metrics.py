"""Ranking and answer metrics: recall@k, MRR@k, NDCG@k (binary relevance), SQuAD EM/F1, latency,
and the agreement of two runs on the same questions."""
from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence


def recall_at_k(ranked: Sequence[str], gold: Iterable[str], k: int) -> float:
    gold = set(gold)
    return len(gold.intersection(ranked[:k])) / len(gold) if gold else 0.0


def mrr_at_k(ranked: Sequence[str], gold: Iterable[str], k: int = 10) -> float:
    gold = set(gold)
    for i, doc_id in enumerate(ranked[:k]):
        if doc_id in gold:
            return 1.0 / (i + 1)
    return 0.0


def ndcg_at_k(ranked: Sequence[str], gold: Iterable[str], k: int = 10) -> float:
    gold = set(gold)
    dcg = sum(1.0 / math.log2(i + 2) for i, doc_id in enumerate(ranked[:k]) if doc_id in gold)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(gold), k)))
    return dcg / ideal if ideal else 0.0


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def contains_answer(text: str, answers: Iterable[str]) -> bool:
    """Whether ``text`` holds one of ``answers`` as whole normalised words (DPR's "has answer"):
    a passage that does is no evidence of an unanswerable question, whatever its id."""
    padded = f" {normalize_answer(text)} "
    return any(f" {a} " in padded for a in map(normalize_answer, answers) if a)


def exact_match(prediction: str, answers: Iterable[str]) -> float:
    return max((float(normalize_answer(prediction) == normalize_answer(a)) for a in answers), default=0.0)


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Iterable[str]) -> float:
    return max((_f1(prediction, a) for a in answers), default=0.0)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / mean in milliseconds."""
    if not seconds:
        return {"p50_ms": 0.0, "p95_ms": 0.0, "mean_ms": 0.0}
    return {"p50_ms": percentile(seconds, 50) * 1e3, "p95_ms": percentile(seconds, 95) * 1e3,
            "mean_ms": sum(seconds) / len(seconds) * 1e3}


def ranking_metrics(ranked: Sequence[str], gold: Iterable[str]) -> dict[str, float]:
    gold = list(gold)
    return {"recall@1": recall_at_k(ranked, gold, 1), "recall@5": recall_at_k(ranked, gold, 5),
            "mrr@10": mrr_at_k(ranked, gold, 10), "ndcg@10": ndcg_at_k(ranked, gold, 10)}


def mean_interval(values: Sequence[float], draws: int = 2000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean of per-question ``values``. For a paired
    comparison of two systems on the same questions, pass the per-question differences."""
    if not values:
        return [0.0, 0.0]
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(draws))
    tail = (1 - level) / 2 * 100
    return [percentile(means, tail), percentile(means, 100 - tail)]


def agreement(reference: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]]) -> dict:
    """How ``other`` matches ``reference`` on the same questions (reuse vs full prefill, reader
    from stored KV vs full, one question in the app); the one definition the bench, evaluation
    and app report. Records pair up by ``query_id`` and hold ``scores`` (id -> score),
    ``ranked_ids``, optionally ``top_n`` (default: every candidate) and ``answer`` with
    ``generated`` (default True).

    Returns the max and mean abs score difference over common candidates, the fraction of questions with
    identical full rankings (``ranking_agreement``) and with the same top-n set, the number of
    questions compared, and (when both answered some) the fraction with identical answers;
    ``{}`` when no question is in both."""
    ref = {r.get("query_id"): r for r in reference}
    pairs = [(ref[r.get("query_id")], r) for r in other if r.get("query_id") in ref]
    if not pairs:
        return {}
    diffs, same_rank, same_top, same_answer, answered = [], 0, 0, 0, 0
    for a, b in pairs:
        sa, sb = a.get("scores") or {}, b.get("scores") or {}
        diffs += [abs(sa[d] - sb[d]) for d in sa.keys() & sb.keys()]
        rank_a, rank_b = list(a.get("ranked_ids", [])), list(b.get("ranked_ids", []))
        same_rank += rank_a == rank_b
        n = int(a.get("top_n") or 0) or len(rank_a)
        same_top += set(rank_a[:n]) == set(rank_b[:n])
        if "answer" in a and "answer" in b and a.get("generated", True) and b.get("generated", True):
            answered += 1
            same_answer += a["answer"] == b["answer"]
    out = {"max_abs_score_diff": max(diffs) if diffs else 0.0,
           "mean_abs_score_diff": sum(diffs) / len(diffs) if diffs else 0.0,
           "ranking_agreement": same_rank / len(pairs),
           "top_n_agreement": same_top / len(pairs),
           "compared_queries": len(pairs)}
    if answered:
        out["answer_agreement"] = same_answer / answered
    return out


ERROR_SCALES = (1.0, 0.7, 0.5, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03)


def scaled_error(per_question: Sequence[Mapping[str, Any]], system: str, exact: str, top_n: int,
                 scales: Sequence[float] = ERROR_SCALES) -> list[tuple[float, dict]]:
    """How small a codec's score error must get to keep rankings: for each ``a`` in ``scales``, the
    :func:`agreement` of ``exact``'s scores with ``exact + a * (system - exact)``, each question's
    measured error pattern kept and scaled. ``per_question`` is an evaluation's (``python -m
    hyperrag.evaluate --json``): ``qid``, ``doc_ids`` and ``scores`` per system, in candidate order.
    A uniform quantizer halves its error per extra bit, so ``log2(1 / a)`` is the bits it needs."""
    def records(a: float) -> list[dict]:
        out = []
        for q in per_question:
            ref, got = q["scores"][exact], q["scores"][system]
            scores = [r + a * (g - r) for r, g in zip(ref, got)]
            order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable, like argsort's
            out.append({"query_id": q["qid"], "top_n": top_n, "ranked_ids": [q["doc_ids"][i] for i in order],
                        "scores": dict(zip(q["doc_ids"], scores))})
        return out

    reference = records(0.0)
    return [(a, agreement(reference, records(a))) for a in scales]


def closest_gaps(per_question: Sequence[Mapping[str, Any]], system: str) -> list[float]:
    """Per question, the gap between ``system``'s two closest candidate scores: the scale a score
    error is measured against (an error smaller than it cannot swap two candidates)."""
    return [min(b - a for a, b in zip(xs, xs[1:])) for xs in (sorted(q["scores"][system]) for q in per_question)]
