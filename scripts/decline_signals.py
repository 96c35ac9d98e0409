"""Which signals should the decline rule read? Cross-validated on a held-out ``evaluate`` record.

    ./run.sh python scripts/decline_signals.py docs/eval/trust-heldout-train-320.json corpora/trust-heldout8

For each set of signals: 10 times 5-fold cross-validation over the record's questions (half made
unanswerable by ``evaluate --unanswerable 0.5``) of the shipped rule's fit, a logistic model and
the threshold ``calibrate`` picks (best balanced accuracy answering at least ``--min-answered`` of
the answerable training folds); it prints the held-out folds' shares declined and answered and the
F1 the declines cost on answerable questions. Run it on held-out *train* articles only: choosing
signals on dev would tune the rule to the questions it is measured on.

Signals beyond the shipped ones (:data:`hyperrag.rag.calibration.RULE_FEATURES`, computed as the
reader computes them) come from the
record and the corpus, so none needs the model: the best passage's cosine and reranker parts, the
third score, how many of the passages read share an article, the answer's length and its
per-word log-likelihood, and how many of the question's content words the answer's sentence holds
(found in the passages read; the answer's own words left out).
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from hyperrag.calibrate import MIN_ANSWERED
from hyperrag.rag.calibration import RULE_FEATURES, choose_threshold, fit_logistic, rule_features

SETS = {
    "shipped": RULE_FEATURES,
    "+ question words in the answer's sentence": (*RULE_FEATURES, "overlap"),
    "+ cosine of the best passage": (*RULE_FEATURES, "cosine"),
    "reranker and cosine parts apart": ("reranker", "cosine", "top_lead", "logprob"),
    "+ passages read from one article": (*RULE_FEATURES, "same_article"),
    "+ third score": (*RULE_FEATURES, "third"),
    "+ answer words": (*RULE_FEATURES, "answer_words"),
    "log-likelihood per answer word": ("top_score", "top_lead", "logprob_per_word"),
}


def words(text: str) -> set[str]:
    """Content words, cut to five letters (a crude stem: "revealed" meets "reveal")."""
    return {w[:5] for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in ENGLISH_STOP_WORDS}


def sentence_around(text: str, answer: str) -> str | None:
    at = text.lower().find(answer.lower().strip(" ."))
    if not answer.strip() or at < 0:
        return None
    start = max((m.end() for m in re.finditer(r"[.!?]\s", text[:at])), default=0)
    end = re.search(r"[.!?]\s", text[at + len(answer):])
    return text[start: at + len(answer) + (end.start() + 1 if end else len(text))]


def signals(report: dict, corpus: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Per question: every signal, whether it is answerable, and its answer's F1."""
    docs = {d["id"]: d["text"] for d in map(json.loads, (corpus / "docs.jsonl").open())}
    questions = {q["id"]: q["question"] for q in map(json.loads, (corpus / "queries.jsonl").open())}
    ranked = {p["qid"]: p for p in report["per_question"]}
    system, weight = report["abstain"]["system"], report["retrieval_weight"]
    rows = []
    for r in report["abstain_records"]:
        p = ranked[r["qid"]]
        fused = dict(zip(p["doc_ids"], p["scores"][system]))
        cosine = dict(zip(p["doc_ids"], p["cosine"]))
        # The passages read, by their fused scores (a candidate the run added has none recorded).
        read = [next((d for d in r["doc_ids"] if abs(fused.get(d, 1e9) - s) < 1e-6), None) for s in r["top_scores"]]
        best_cos = cosine[read[0]] if read[0] else float(np.mean(p["cosine"][1:4]))
        sentence = next((s for d in r["doc_ids"] if (s := sentence_around(docs[d], r["answer"]))), None)
        asked = words(questions[r["qid"]])
        articles = [d.rsplit("-", 1)[0] for d in read if d]
        answer_words = len(r["answer"].split())
        rows.append(dict(zip(RULE_FEATURES, rule_features(r["top_scores"], r["logprob"]))) | {
            "cosine": best_cos, "reranker": r["top_scores"][0] - weight * best_cos, "third": r["top_scores"][2],
            "same_article": len(articles) - len(set(articles)), "answer_words": answer_words,
            "logprob_per_word": r["logprob"] / (answer_words + 1),
            "overlap": len(asked & (words(sentence) - words(r["answer"]))) / max(1, len(asked)) if sentence else 0.0,
        })
    answerable = np.array([not r["unanswerable"] for r in report["abstain_records"]])
    return rows, answerable, np.array([r["f1"] for r in report["abstain_records"]])


def cross_validate(x: np.ndarray, answerable: np.ndarray, f1: np.ndarray, min_answered: float,
                   repeats: int = 10, folds: int = 5) -> tuple[float, float, float]:
    """Mean over held-out folds of (share declined, share answered, F1 change on answerable)."""
    declined, answered, f1_change = [], [], []
    for seed in range(repeats):
        order = list(range(len(x)))
        random.Random(seed).shuffle(order)
        for k in range(folds):
            test = np.array(order[k::folds])
            train = np.setdiff1d(order, test)
            b, *w = fit_logistic(x[train], answerable[train].astype(int))  # as calibrate fits the rule
            confidence = 1 / (1 + np.exp(-(x @ np.array(w) + b)))
            cut = choose_threshold(list(confidence[train]), list(answerable[train]), min_answered)
            kept = confidence[test] >= cut
            pos = answerable[test]
            declined.append(np.mean(~kept[~pos]))
            answered.append(np.mean(kept[pos]))
            f1_change.append(np.mean(np.where(kept[pos], f1[test][pos], 0.0)) - np.mean(f1[test][pos]))
    return float(np.mean(declined)), float(np.mean(answered)), float(np.mean(f1_change))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("record", type=Path, help="an evaluate --unanswerable record on held-out train articles")
    ap.add_argument("corpus", type=Path, help="the corpus folder it ran on (docs.jsonl, queries.jsonl)")
    ap.add_argument("--min-answered", type=float, nargs="+", default=[MIN_ANSWERED])
    args = ap.parse_args()
    rows, answerable, f1 = signals(json.loads(args.record.read_text()), args.corpus)
    print(f"{len(rows)} questions, {int((~answerable).sum())} unanswerable; 10 x 5-fold cross-validation")
    print(f"{'signals':<44} {'min answered':>12} {'declined':>9} {'answered':>9} {'F1 change':>10}")
    for name, keys in SETS.items():
        x = np.array([[row[k] for k in keys] for row in rows])
        for share in args.min_answered:
            d, a, f = cross_validate(x, answerable, f1, share)
            print(f"{name:<44} {share:>12.3f} {d:>9.3f} {a:>9.3f} {f:>+10.3f}")


if __name__ == "__main__":
    main()
