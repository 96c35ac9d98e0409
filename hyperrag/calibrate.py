"""Fit an adapter's calibrated relevance and decline rule on held-out SQuAD *train* articles.

    python scripts/build_squad_mini.py --split train --out corpora/trust-heldout8 \\
        --articles Transistor,Bacteria,Compact_disc,Quran,Armenia,Police,Translation,Pain
    python -m hyperrag.evaluate --corpus corpora/trust-heldout8 --queries 320 --systems retrieval,trained+retrieval \\
        --read 320 --read-systems trained+retrieval --unanswerable 0.5 --json heldout.json
    python -m hyperrag.calibrate heldout.json      # writes `trust` into the adapter's hyperrag.json
    python -m hyperrag.calibrate --measure dev.json   # its calibration and abstain sections, from the stored fit

From the evaluation record: the relevance map (a logistic map of the fused ranking score and its
lead over the best other candidate, over every retrieved candidate: relevant = the question's
gold passage), the confidence model (a logistic regression of answerable vs made-unanswerable
over the best passage's fused score, its lead over the next passage read and the answer's
log-likelihood), and the thresholds (the rule's, and each single
signal's for comparison) that best separate the two kinds while still answering 92.5% of the
answerable questions (``--min-answered``: a declined answerable question loses its F1; what the
fit does on its own articles is kept under ``fitted_on.in_sample``). The corpus's articles must be
neither training nor validation articles of the adapter (its hyperrag.json lists them), and the
record must be of this adapter's weights. See :mod:`hyperrag.rag.calibration`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from hyperrag.common.settings import SHIPPED_ADAPTER
from hyperrag.data.corpus import load_corpus
from hyperrag.evaluate import (CALIBRATED, abstain_report, calibration_report, format_table, measure_trust,
                               relevance_examples, signal_values)
from hyperrag.model.loading import adapter_hash, adapter_meta
from hyperrag.rag.calibration import (Trust, choose_threshold, fit_logistic, fit_relevance, load_trust, rule_features,
                                      save_trust)


MIN_ANSWERED = 0.925  # of the held-out answerable questions, at the chosen thresholds


def fit_trust(report: dict, fitted_on: dict | None = None, min_answered: float = MIN_ANSWERED) -> Trust:
    """The three parts of :class:`Trust` from an ``evaluate --unanswerable`` record; each
    threshold answers at least ``min_answered`` of the answerable questions."""
    records = report.get("abstain_records")
    if not records:
        raise SystemExit("the record has no abstain_records: run evaluate with --read N --unanswerable 0.5")
    questions = relevance_examples(report["per_question"])
    if not questions:
        raise SystemExit(f"the record has no {CALIBRATED} scores: run evaluate with --systems ...,{CALIBRATED}")
    relevance = fit_relevance(questions)
    answerable = [not r["unanswerable"] for r in records]
    rule = fit_logistic([rule_features(r["top_scores"], r["logprob"]) for r in records],
                        [int(a) for a in answerable])
    values = signal_values(records, Trust(relevance, rule, 0.0))
    cuts = {name: choose_threshold(v, answerable, min_answered) for name, v in values.items()}
    trust = Trust(relevance, rule, cuts.pop("rule"), cuts)
    summary = abstain_report(records, trust, trust.threshold)
    calibration = calibration_report(trust, report["per_question"])
    return Trust(relevance, rule, trust.threshold, cuts, (fitted_on or {}) | {
        "pairs": calibration["pairs"], "relevant": sum(sum(y) for _, y in questions), "questions": len(records),
        "unanswerable": answerable.count(False), "min_answered": min_answered, "ece": calibration["ece"],
        "in_sample": {name: {k: v for k, v in row.items() if not k.endswith("_ci95")} for name, row in summary.items()}})


def check_held_out(titles: Sequence[str], meta: dict) -> None:
    """Refuse articles the adapter was trained or validated on, also in the run it was warm-started
    from (``warm_start``: its articles were trained on too)."""
    earlier = meta.get("warm_start", {})
    seen = {t.replace("_", " ") for t in meta.get("train_articles", []) + meta.get("val_articles", [])
            + earlier.get("articles", []) + earlier.get("val_articles", [])}
    overlap = sorted(set(titles) & seen)
    if overlap:
        raise SystemExit(f"the corpus holds articles the adapter was trained or validated on: {', '.join(overlap)}")


def main(argv: Sequence[str] | None = None) -> Trust:
    p = argparse.ArgumentParser(prog="python -m hyperrag.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("record", help="an evaluate --unanswerable JSON record on held-out train articles")
    p.add_argument("--adapter", default=str(SHIPPED_ADAPTER), help="the adapter folder (default: the shipped one)")
    p.add_argument("--dry-run", action="store_true", help="print the fit, write nothing")
    p.add_argument("--min-answered", type=float, default=MIN_ANSWERED,
                   help="the thresholds answer at least this share of the answerable held-out questions (declining "
                        "one costs its F1); among those, the best balanced accuracy (default %(default)s)")
    p.add_argument("--measure", action="store_true",
                   help="fit nothing: (re)write the record's calibration and abstain sections with the adapter's "
                        "stored fit (a record measured before the fit, e.g. on dev)")
    args = p.parse_args(argv)
    report = json.loads(Path(args.record).read_text())
    if report.get("adapter_hash") != adapter_hash(args.adapter):
        raise SystemExit(f"{args.record} was measured with another adapter ({report.get('adapter_hash')}) than "
                         f"{args.adapter} ({adapter_hash(args.adapter)})")
    meta = adapter_meta(args.adapter)
    if args.measure:
        trust = load_trust(args.adapter)
        if trust is None:
            raise SystemExit(f"{args.adapter} has no fitted calibration: run python -m hyperrag.calibrate on a "
                             "held-out train record first")
        measure_trust(report, trust)
        report["trust_measured_by"] = "python -m hyperrag.calibrate --measure"
        Path(args.record).write_text(json.dumps(report, indent=1))
        print(format_table(report))
        return trust
    titles = sorted({d.title for d in load_corpus(report["corpus"]).docs})
    check_held_out(titles, meta)
    trust = fit_trust(report, {"record": Path(args.record).name, "articles": titles, "seed": report["seed"],
                               "top_k": report["top_k"], "top_n": report["top_n"],
                               "retrieval_weight": meta.get("retrieval_weight", 0.0)}, args.min_answered)
    print(json.dumps(trust.to_json(), indent=1, ensure_ascii=False))
    if not args.dry_run:
        print(f"written to {save_trust(args.adapter, trust)} (the adapter hash, and so the stored KV, is unchanged)")
    return trust


if __name__ == "__main__":
    main()
