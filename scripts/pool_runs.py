"""Pool several saved bench runs of the same command into one estimate of the rerank ratios.

    ./run.sh python scripts/pool_runs.py run-1.json run-2.json ...

Each run's records are kept apart (a question timed in three runs counts three times), then
summarized as one run: pairs/s ratios, the share of the token-ratio limit and its bootstrap
interval. On a noisy machine this is steadier than any one run.
"""
from __future__ import annotations

import json
import sys

from hyperrag.report import summarize


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    records = [{**rec, "query_id": f"{rec['query_id']}#{n}"}
               for n, path in enumerate(paths) for rec in json.load(open(path))["records"]]
    rerank = summarize(records)["rerank"]
    lo, hi = rerank.get("limit_fraction_ci95") or (float("nan"), float("nan"))
    print(f"{len(paths)} runs, {rerank['reuse']['queries']} reuse timings: reuse vs full {rerank['speedup_vs_full']:.2f}x, "
          f"vs prefix cached {rerank['speedup_vs_prefix_cached']:.2f}x; token-ratio limit {rerank['token_ratio_limit']:.2f}x; "
          f"share {rerank['limit_fraction']:.1%} (95% CI {lo:.1%}-{hi:.1%}); "
          f"share of the ratio of totals {rerank['fraction_of_totals_ratio']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
