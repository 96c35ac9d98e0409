"""Calibrated relevance and declining to answer ("not found in these documents").

The fused ranking score (reranker score + w x cosine) orders passages well but is no probability.
A Platt-style logistic map turns it into P(the passage answers the question), over two inputs:
the passage's score and its lead over the best other candidate. Why the lead: a question's
answer sits in one passage of the candidates, so a passage whose score nothing else comes near
is likelier the one than a passage of the same score with a rival; a map over the score alone,
fitted on every candidate, is calibrated over all of them but under-confident on the top
passage (the one a user reads first). An answer's confidence is a second logistic model over three
signals (:data:`RULE_FEATURES`): the best passage's fused score (is the answer in these documents
at all?), its lead over the next passage read (a question whose answer is gone leaves several
neighbouring paragraphs of one article scoring alike; in cross-validation on the held-out
articles the lead raised the share declined at the same share answered) and
the answer's own log-likelihood (did the reader find it?). Below a threshold the reader declines.

Both models and the threshold are fitted on SQuAD *train* articles held out from the adapter's
training (never on dev): every retrieved candidate of their questions for the relevance map; the
same questions, half of them made unanswerable by removing their gold passage from the candidates
(``python -m hyperrag.evaluate --unanswerable 0.5``), for the confidence model and the threshold
(``python -m hyperrag.calibrate``). They live in the adapter's ``hyperrag.json`` under ``trust``,
which the adapter's content hash leaves out, so the stored document KV stays valid. They belong to
that adapter and its fused score: another adapter or another retrieval weight has none.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from hyperrag.model.loading import ADAPTER_META, adapter_meta

TRUST_KEY = "trust"  # the key in the adapter's hyperrag.json
NOT_FOUND = "Not found in these documents."


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


LEAD_CAP = 10.0  # a lead is clipped to +-this; a passage without rivals leads by it


def leads(scores: Sequence[float]) -> list[float]:
    """Each score minus the best of the others, clipped to +-:data:`LEAD_CAP`."""
    if len(scores) < 2:
        return [LEAD_CAP] * len(scores)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    first, second = scores[order[0]], scores[order[1]]
    return [max(-LEAD_CAP, min(LEAD_CAP, s - (second if i == order[0] else first))) for i, s in enumerate(scores)]


@dataclass(frozen=True)
class Relevance:
    """``P(passage answers | its score s, its lead m over the best other candidate) =
    sigmoid(a x s + c x m + b)``, for one question's candidates at a time."""

    a: float
    b: float
    c: float

    def logits(self, scores: Sequence[float]) -> list[float]:
        return [self.a * s + self.c * m + self.b for s, m in zip(scores, leads(scores))]

    def probs(self, scores: Sequence[float]) -> list[float]:
        return [sigmoid(x) for x in self.logits(scores)]


RULE_FEATURES = ("top_score", "top_lead", "logprob")  # stored with a fit: a fit of other features is refused


def rule_features(rank_scores: Sequence[float], logprob: float) -> list[float]:
    """What an answer's confidence is computed from (:data:`RULE_FEATURES`): the fused score of the
    best of the passages read, its lead over the next one (:func:`leads`) and the chosen answer's
    log-likelihood."""
    return [max(rank_scores), max(leads(rank_scores)), logprob]


@dataclass(frozen=True)
class Trust:
    """The relevance map, the confidence model and the decline threshold of one adapter."""

    relevance: Relevance
    rule: tuple[float, ...]  # intercept, then one weight per RULE_FEATURES entry
    threshold: float  # decline below this confidence (chosen on the held-out articles)
    baselines: dict = field(default_factory=dict)  # thresholds of the single signals, for comparison
    fitted_on: dict = field(default_factory=dict)  # corpus, articles, questions

    def relevance_of(self, scores: Sequence[float]) -> list[float]:
        """P(answers the question) of each of one question's candidates, from their fused scores."""
        return self.relevance.probs(scores)

    def confidence(self, rank_scores: Sequence[float], logprob: float) -> float:
        """P(the answer is in these documents): the confidence the reader declines below."""
        x = rule_features(rank_scores, logprob)
        return sigmoid(self.rule[0] + sum(w * v for w, v in zip(self.rule[1:], x)))

    def __post_init__(self) -> None:
        if len(self.rule) != 1 + len(RULE_FEATURES):
            raise ValueError(f"a confidence rule needs an intercept and {len(RULE_FEATURES)} weights "
                             f"({', '.join(RULE_FEATURES)}), got {len(self.rule)} numbers")

    def to_json(self) -> dict:
        return asdict(self) | {"rule": list(self.rule), "rule_features": list(RULE_FEATURES)}

    @classmethod
    def from_json(cls, data: dict) -> "Trust":
        """Refuses a fit of other rule features (a stale ``trust``: refit it), never misreads one."""
        stored = tuple(data.get("rule_features", ("top_score", "logprob")))  # fits before the lead named none
        if stored != RULE_FEATURES:
            raise ValueError(f"the stored trust fit uses rule features {list(stored)}, this version "
                             f"{list(RULE_FEATURES)}: refit it with python -m hyperrag.calibrate")
        return cls(Relevance(**data["relevance"]), tuple(data["rule"]), float(data["threshold"]),
                   dict(data.get("baselines", {})), dict(data.get("fitted_on", {})))


def load_trust(adapter: str | Path) -> Trust | None:
    """The adapter's fitted trust models, or None (no adapter, or none fitted for it)."""
    data = adapter_meta(adapter).get(TRUST_KEY) if adapter else None
    try:
        return Trust.from_json(data) if data else None
    except ValueError as e:
        raise ValueError(f"{Path(adapter) / ADAPTER_META}: {e}") from None


def save_trust(adapter: str | Path, trust: Trust) -> Path:
    """Store ``trust`` in the adapter's ``hyperrag.json``, keeping everything else in it."""
    path = Path(adapter) / ADAPTER_META
    meta = json.loads(path.read_text()) if path.is_file() else {}
    meta[TRUST_KEY] = trust.to_json()
    path.write_text(json.dumps(meta, indent=1) + "\n")
    return path


# -- fitting and measuring (offline: sklearn is imported only here) ---------------------------------

def fit_logistic(rows: Sequence[Sequence[float]], labels: Sequence[int]) -> tuple[float, ...]:
    """(intercept, weights...) of a logistic regression (almost unregularised)."""
    from sklearn.linear_model import LogisticRegression

    if len(set(labels)) < 2:
        raise ValueError("calibration needs both relevant and irrelevant examples")
    model = LogisticRegression(C=1e4, max_iter=1000).fit([list(r) for r in rows], list(labels))
    return (float(model.intercept_[0]), *map(float, model.coef_[0]))


def fit_relevance(questions: Sequence[tuple[Sequence[float], Sequence[int]]]) -> Relevance:
    """The relevance map from each question's candidates: (fused scores, 1 where it answers)."""
    rows = [[s, m] for scores, _ in questions for s, m in zip(scores, leads(scores))]
    b, a, c = fit_logistic(rows, [y for _, labels in questions for y in labels])
    return Relevance(a, b, c)


def choose_threshold(confidences: Sequence[float], answerable: Sequence[bool], min_answered: float = 0.0) -> float:
    """The confidence cut that best separates answerable from unanswerable questions: the one
    with the highest mean of (answerable answered, unanswerable declined) among those that still
    answer at least ``min_answered`` of the answerable ones (declining one costs its answer's
    F1). Decline = below it."""
    pos = sorted(c for c, a in zip(confidences, answerable) if a)
    neg = sorted(c for c, a in zip(confidences, answerable) if not a)
    if not pos or not neg:
        raise ValueError("choosing a threshold needs answerable and unanswerable questions")
    values = sorted(set(confidences))
    cuts = [values[0]] + [(x + y) / 2 for x, y in zip(values, values[1:])] + [values[-1] + 1e-9]

    def balanced(t: float) -> float:
        answered = sum(c >= t for c in pos) / len(pos)
        declined = sum(c < t for c in neg) / len(neg)
        return (answered + declined) / 2

    allowed = [t for t in cuts if sum(c >= t for c in pos) >= min_answered * len(pos)]
    return max(allowed, key=balanced)


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties counting half."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([int(p) for p in positive], list(scores)))


def auroc_interval(scores: Sequence[float], positive: Sequence[bool], draws: int = 1000, seed: int = 0) -> list[float]:
    """Percentile bootstrap 95% interval of :func:`auroc` over the questions."""
    rng, n, values = random.Random(seed), len(scores), []
    for _ in range(draws):
        pick = [rng.randrange(n) for _ in range(n)]
        labels = [positive[i] for i in pick]
        if any(labels) and not all(labels):
            values.append(auroc([scores[i] for i in pick], labels))
    values.sort()
    return [values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]] if values else [0.0, 0.0]


def expected_calibration_error(probs: Sequence[float], labels: Sequence[int], bins: int = 15) -> float:
    """ECE: the mean |predicted probability - observed frequency| over equal-width probability
    bins, each weighted by its share of the examples."""
    if not probs:
        return 0.0
    total = [0.0] * bins
    hits = [0.0] * bins
    count = [0] * bins
    for p, y in zip(probs, labels):
        b = min(int(p * bins), bins - 1)
        total[b] += p
        hits[b] += y
        count[b] += 1
    return sum(abs(total[b] - hits[b]) for b in range(bins) if count[b]) / len(probs)
