"""What the app holds in memory: resident and peak RSS after each phase of a user's first visit.

    ./run.sh python scripts/measure_memory.py [--question "..."] [--json out.json]

Runs what the app runs for one user, in one process, with the app's settings (env/defaults):
load the engine (models, store, the shipped corpus's index), precompute the corpus's KV, then
one question in each mode of the Ask tab. After each phase it prints the process's resident set
(RSS) and its peak so far (``ru_maxrss``), so one can see which phase holds what. The
``*_gb`` figures are GiB (2**30 bytes), as in the earlier records under ``docs/memory/``;
``peak_rss_bytes`` is the run's peak in bytes (the 3 GB target is decimal: 3e9 bytes).
"""
from __future__ import annotations

import argparse
import json
import time


def gb(n: float) -> float:
    """GiB, as the records have always been written."""
    return round(n / 2**30, 3)


def main() -> None:
    from hyperrag.model.kernels import cpu_model
    from hyperrag.common.memory import peak_resident_bytes, resident_bytes
    from hyperrag.common.settings import Settings
    from hyperrag.kv.planner import memory_budget_gb
    from hyperrag.workbench.config import AppConfig
    from hyperrag.workbench.operations import Workbench

    ap = argparse.ArgumentParser()
    ap.add_argument("--question", default="Who was the leader of the Norse raiders?")
    ap.add_argument("--modes", default="retrieval,baseline,reuse,reader_kv")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    phases: list[dict] = []

    def mark(phase: str, t0: float) -> None:
        row = {"phase": phase, "rss_gb": gb(resident_bytes()), "peak_rss_gb": gb(peak_resident_bytes()),
               "seconds": round(time.perf_counter() - t0, 2)}
        phases.append(row)
        print(f"{phase:<22} RSS {row['rss_gb']:6.3f} GiB   peak {row['peak_rss_gb']:6.3f} GiB "
              f"({peak_resident_bytes() / 1e9:.3f} GB)   {row['seconds']:7.2f} s", flush=True)

    t0 = time.perf_counter()
    mark("start", t0)
    settings = Settings.from_env()
    bench = Workbench(settings, AppConfig.from_env(settings))
    t0 = time.perf_counter()
    engine = bench.load()
    mark("load", t0)
    print(f"CPU tier: {engine.store.hot_cache_gb:.3f} GiB", flush=True)
    t0 = time.perf_counter()
    engine.precompute()
    mark("precompute", t0)
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        engine.ask(args.question, mode=mode)
        mark(f"ask {mode}", t0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "settings": {"model": settings.model, "codec": settings.codec,
                                    "hot_cache_gb": settings.hot_cache_gb,
                                    "memory_budget_gb": memory_budget_gb(settings.memory_budget_gb, settings.model),
                                    "batch_size": settings.batch_size, "corpus": settings.corpus},
                       "cpu_tier_gb": engine.store.hot_cache_gb, "peak_rss_bytes": peak_resident_bytes(),
                       "cpu": cpu_model(), "phases": phases}, f, indent=1)
    bench.close()


if __name__ == "__main__":
    main()
