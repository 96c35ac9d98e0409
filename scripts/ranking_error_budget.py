"""How small must a codec's score error be to keep rankings? A budget from measured scores.

    ./run.sh python scripts/ranking_error_budget.py docs/eval/codecs-dev-300.json [--codec trained+retrieval@int4]

Reads an evaluation's per-question scores (``python -m hyperrag.evaluate --json``: exact KV and
a codec's KV for the same candidates), keeps each question's error pattern and scales it by
``a`` (scores ``exact + a * (codec - exact)``; :func:`hyperrag.rag.metrics.scaled_error`, which
``python -m hyperrag.docs`` renders the codecs page's targets with), and reports, with
:func:`hyperrag.rag.metrics.agreement` (the definition the bench and evaluation use), the identical
full rankings, the same top-n and the largest score difference at each ``a``. The ``a`` where a
target is first met says how many times smaller the codec's error must get; a uniform quantizer
halves its error per extra bit.
Also prints how close neighbouring candidates' exact scores are (the smallest gap per question),
the scale any error is measured against.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from hyperrag.rag.metrics import ERROR_SCALES, closest_gaps, scaled_error


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("evaluation", help="a python -m hyperrag.evaluate --json with a codec system")
    p.add_argument("--codec", default="trained+retrieval@int4", help="the codec system to scale")
    p.add_argument("--targets", default="0.75,0.98", help="identical-ranking and same-top-n targets")
    args = p.parse_args()
    data = json.loads(Path(args.evaluation).read_text())
    per_question, exact, top_n = data["per_question"], args.codec.split("@")[0], data["top_n"]
    want_identical, want_top = map(float, args.targets.split(","))
    print(f"{args.codec} against {exact}, {len(per_question)} questions, top-{top_n}")
    print("error x   identical   same top-n   max |diff|   mean |diff|")
    met: dict[str, float] = {}
    for a, m in scaled_error(per_question, args.codec, exact, top_n):
        print(f"{a:7.2f}   {m['ranking_agreement']:9.0%}   {m['top_n_agreement']:10.1%}   "
              f"{m['max_abs_score_diff']:10.3f}   {m['mean_abs_score_diff']:11.4f}")
        if m["ranking_agreement"] >= want_identical:
            met.setdefault("identical", a)
        if m["top_n_agreement"] >= want_top:
            met.setdefault("top_n", a)
    for name, want in (("identical", want_identical), ("top_n", want_top)):
        a = met.get(name)
        bits = f", about {math.log2(1 / a):.1f} more bits of a uniform grid" if a else ""
        print(f"{name} >= {want:.0%}: " + (f"error x {a}{bits}" if a else f"not met at x {ERROR_SCALES[-1]}"))
    gaps = closest_gaps(per_question, exact)
    print("smallest gap between neighbouring exact scores, percentiles 10 / 25 / 50: "
          + " / ".join(f"{v:.4f}" for v in np.percentile(gaps, [10, 25, 50])))


if __name__ == "__main__":
    main()
