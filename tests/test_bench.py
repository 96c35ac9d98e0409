"""The bench: a --quick run on the tiny corpus gives the full schema, finite numbers, agreeing
rankings (fp32) and a self-contained HTML report; the figures and the aggregation stand alone."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from hyperrag.kv.planner import codec_table
from hyperrag.report import finite_numbers, summarize

MODES3 = ("retrieval_only", "baseline", "reuse")
ANSWERING = (*MODES3, "retrieval_reader", "reader_full", "reader_kv")
QUALITY = ("recall@1", "recall@5", "mrr@10", "ndcg@10", "em", "f1")


def test_help_documents_every_flag(capsys):
    from hyperrag.bench import build_parser

    help_text = build_parser().format_help()
    for flag in ("--corpus", "--queries", "--top-k", "--top-n", "--codec", "--store", "--batch-size", "--seed",
                 "--json", "--html", "--quick", "--codecs", "--frontier", "--serve", "--clients"):
        assert re.search(rf"{flag}\b", help_text), flag
    for action in build_parser()._actions:
        assert action.help, action.option_strings


def test_codec_entries_are_checked_before_any_model_loads():
    from hyperrag.bench import build_parser, resolve_options

    args = resolve_options(build_parser().parse_args(["--codecs", "fp16,int4:nearest,int2:hessian"]))
    assert args.codec_list == ["fp16", "int4:nearest", "int2:hessian"]
    for entry, message in (("zstd", "unknown codec 'zstd'"), ("int4:best", "unknown rounding 'best' in 'int4:best'")):
        with pytest.raises(SystemExit, match=f"--codecs: {message}"):
            resolve_options(build_parser().parse_args(["--codecs", entry]))


def _records():
    """Synthetic records of three questions in every mode (no model needed)."""
    records = []
    for q in range(3):
        ids = [f"d{i}" for i in range(5)]
        for mode, t in (("retrieval", (0.02, 0, 0, 1.0)), ("baseline", (0.02, 0, 4.0, 1.0)),
                        ("prefix", (0.02, 0, 3.5, 0)), ("reuse", (0.02, 0.03, 0.3, 1.0)),
                        ("reader_full", (0.02, 0.01, 4.0, 0.4)), ("reader_kv", (0.02, 0.05, 0.3, 0.2))):
            scores = {d: float(i) for i, d in enumerate(reversed(ids))}
            records.append({"query_id": f"q{q}", "mode": mode, "timings": dict(zip(("retrieve", "kv_load", "rerank",
                                                                                    "generate"), t)),
                            "ranked_ids": ids, "scores": scores, "top_n": 2, "answer": "France",
                            "generated": mode != "prefix", "gold_ids": ["d1"], "answers": ["France"],
                            **({} if mode == "retrieval" else {"pairs": 5, "query_tokens": 20,
                                                                "prompt_tokens": [220] * 5})})
    return records


def test_summarize_and_figures_without_a_model():
    from hyperrag import figures

    result = summarize(_records())
    assert set(result["e2e"]) >= set(MODES3) and "prefix_cached" not in result["e2e"]  # not generated
    assert result["rerank"]["token_ratio_limit"] == pytest.approx(11.0)
    assert result["rerank"]["speedup_vs_full"] == pytest.approx(4.0 / 0.33)
    assert result["quality"]["ranking_agreement"] == 1.0 and result["quality"]["max_abs_score_diff"] == 0.0
    assert result["quality"]["reuse"]["em"] == 1.0 and result["quality"]["reuse"]["mrr@10"] == 0.5
    assert result["e2e"]["reader_speedup"] == pytest.approx(4.43 / 0.57)  # same questions, kv vs full
    assert result["quality"]["reader_kv_vs_full"]["answer_agreement"] == 1.0
    assert result["quality"]["reader_kv"]["f1"] == 1.0
    no_gold = summarize([{k: v for k, v in r.items() if k not in ("gold_ids", "answers")} for r in _records()])
    assert "note" in no_gold["quality"] and "reuse" not in no_gold["quality"]
    result["codecs"] = [{"codec": c.codec, "bytes_per_token": c.bytes_per_token, "bytes": c.total_bytes,
                         "tokens": c.tokens, "docs": c.docs} for c in codec_table(2, [160, 200])]
    result["planner"] = {"label": "planner", "bytes": 2e7}
    for res in (result, no_gold, {}, {"e2e": {}, "codecs": []}):
        for _, fn in figures.FIGURES:
            assert fn(res).to_dict()["layout"]
        assert "<html>" in figures.html_report(res)


def test_limit_fraction_interval_over_questions():
    """The bootstrap interval of the share of the limit: none for under 5 questions, a point
    when every question measured the same, and around the estimate when they differ."""
    from hyperrag.report import limit_fraction_interval

    assert "limit_fraction_ci95" not in summarize(_records())["rerank"]  # 3 questions

    def run(reuse_s):
        recs = []
        for q, secs in enumerate(reuse_s):
            for mode, t in (("baseline", 4.0), ("reuse", secs)):
                recs.append({"query_id": f"q{q}", "mode": mode, "timings": {"rerank": t}, "pairs": 5,
                             "query_tokens": 20, "prompt_tokens": [220] * 5})
        return recs

    same = summarize(run([0.4] * 6))["rerank"]
    assert same["limit_fraction"] == pytest.approx(4.0 / 0.4 / 11.0)
    assert same["limit_fraction_ci95"] == pytest.approx([same["limit_fraction"]] * 2)
    noisy = run([0.3, 0.5] * 5)
    lo, hi = limit_fraction_interval([r for r in noisy if r["mode"] == "baseline"], [r for r in noisy if r["mode"] == "reuse"])
    point = summarize(noisy)["rerank"]["limit_fraction"]
    assert lo < point < hi and lo >= 4.0 / 0.5 / 11.0 and hi <= 4.0 / 0.3 / 11.0


@pytest.fixture(scope="module")
def quick_run(tiny_corpus_dir, cache_dir, tmp_path_factory):
    from hyperrag.bench import main

    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--corpus", str(tiny_corpus_dir), "--cache-dir", cache_dir, "--queries", "2",
            "--top-k", "3", "--top-n", "1", "--max-new-tokens", "4", "--codec", "fp32", "--codecs", "fp32,int8", "--frontier",
            "--layout-repeats", "1", "--dtype", "float32", "--seed", "1", "--serve", "--clients", "2",
            "--json", str(out / "bench.json"), "--html", str(out / "bench.html")]
    results = main(argv)
    return results, out


def test_quick_bench_schema_and_numbers(quick_run, capsys):
    from hyperrag.bench import check_results

    results, out = quick_run
    saved = json.loads((out / "bench.json").read_text())
    assert check_results(saved) == []
    for key in ("config", "rerank", "e2e", "quality", "storage", "machine", "layout", "codecs", "frontier"):
        assert key in saved, key
    for mode in ("full", "prefix_cached", "reuse"):
        for k in ("pairs_per_s", "p50_ms", "p95_ms"):
            assert saved["rerank"][mode][k] > 0, (mode, k)
    for k in ("speedup_vs_full", "speedup_vs_prefix_cached", "speedup_vs_query_first_cached"):
        assert saved["rerank"][k] > 0
    assert saved["rerank"]["query_first_cached"]["pairs_per_s"] > 0
    assert saved["rerank"]["token_ratio_limit"] > 1
    for mode in ANSWERING:
        e2e = saved["e2e"][mode]
        assert e2e["queries_per_s"] > 0 and e2e["p50_ms"] > 0 and e2e["p95_ms"] > 0
        assert set(e2e["stage_ms"]) == {"retrieve", "kv_load", "rerank", "generate"}
        assert e2e["stage_ms"]["retrieve"] > 0 and e2e["stage_ms"]["generate"] > 0
        for k in QUALITY:
            assert 0.0 <= saved["quality"][mode][k] <= 1.0, (mode, k)
    assert saved["e2e"]["reuse"]["stage_ms"]["kv_load"] > 0
    assert saved["e2e"]["baseline"]["stage_ms"]["rerank"] > 0
    storage = saved["storage"]
    for k in ("docs", "tokens", "bytes", "bytes_per_token", "precompute_docs_per_s", "load_gb_per_s"):
        assert storage[k] > 0, k
    assert storage["codec"] == "fp32" and storage["encoded"] == storage["docs"]
    assert saved["layout"]["static_ms"] > 0 and saved["layout"]["concat_ms"] > 0
    machine = saved["machine"]
    assert machine["threads"] >= 1 and machine["torch"] and machine["device"]
    for path, value in finite_numbers({k: v for k, v in saved.items() if k != "records"}):
        assert math.isfinite(value), path
    # Same candidates in every mode; with fp32 stored KV, reuse ranks exactly like full prefill.
    assert saved["config"]["same_candidates_every_mode"] is True
    assert saved["quality"]["ranking_agreement"] == 1.0
    assert saved["quality"]["max_abs_score_diff"] <= 1e-4
    assert saved["quality"]["answer_agreement"] == 1.0
    # the reader from stored KV answers exactly as the reader on computed KV, and faster
    assert saved["quality"]["reader_kv_vs_full"]["answer_agreement"] == 1.0
    assert saved["e2e"]["reader_speedup"] > 1
    codecs = {row["codec"]: row for row in saved["codecs"]}
    assert codecs["fp32"]["ranking_agreement"] == 1.0 and codecs["fp32"]["max_abs_score_diff"] <= 1e-4
    assert codecs["int8"]["bytes_per_token"] < codecs["fp32"]["bytes_per_token"] / 3
    assert all(row["pairs_per_s"] > 0 and row["encoded_docs"] == 0 for row in saved["codecs"])
    assert all(0 < row["decode_share"] < 1 and row["mean_abs_score_diff"] <= row["max_abs_score_diff"]
               for row in saved["codecs"])
    peaks = list(saved["memory"]["peak_rss_gb_after"].values())
    assert peaks == sorted(peaks) and 0.3 < peaks[0], "peak RSS per phase, never decreasing"
    assert codecs["fp32"]["fraction_of_fp16"] == 2.0 and codecs["int8"]["fraction_of_fp16"] < 0.55
    assert {p["kind"] for p in saved["frontier"]} == {"e2e", "rerank"}
    assert not [w for w in saved["warnings"] if "machine was busy" not in w], saved["warnings"]
    # The shipped adapter is the default reranker, so the zero-shot base model runs beside it.
    assert saved["config"]["adapter"] and "zero_shot" in saved["config"]["mode_order"]
    assert saved["rerank"]["zero_shot"]["pairs_per_s"] > 0 and saved["e2e"]["zero_shot"]["queries_per_s"] > 0
    for k in QUALITY:
        assert 0.0 <= saved["quality"]["zero_shot"][k] <= 1.0, k
    # two clients at once through the request batcher answer as one client asking in turn
    serve = saved["serve"]
    assert (serve["clients"], serve["queries"], serve["mode"]) == (2, 2, "reader_kv")
    assert serve["queries_per_s"] > 0 and serve["sequential_queries_per_s"] > 0 and serve["p95_ms"] >= serve["p50_ms"] > 0
    assert serve["identical_answers"] == 1.0 and serve["identical_rankings"] == 1.0 and serve["mean_group"] >= 1
    assert "serve" in saved["memory"]["peak_rss_gb_after"]
    assert len(results["records"]) == 2 * 8  # zero-shot, retrieval, baseline, prefix, reuse, the reader over retrieval and its two reranked modes


def test_quick_bench_html_is_self_contained(quick_run):
    _, out = quick_run
    page = (out / "bench.html").read_text(encoding="utf-8")
    assert "plotly" in page.lower() and len(page) > 1_000_000  # plotly.js inline
    assert not re.search(r"<script[^>]+src\s*=\s*['\"]?(https?:)?//", page, re.I)
    assert not re.search(r"<link[^>]+href\s*=\s*['\"]?(https?:)?//", page, re.I)
    assert page.count("plotly-graph-div") >= 5
    assert "reuse vs full" in page and "Concurrent clients" in page
    from hyperrag.bench import main

    again = main(["--render", str(out / "bench.json"), "--html", str(out / "again.html")])  # no measuring
    assert again["rerank"] == json.loads((out / "bench.json").read_text())["rerank"]
    assert (out / "again.html").stat().st_size > 1_000_000


def test_corpus_without_gold_queries_skips_quality(tmp_path, cache_dir, capsys):
    from hyperrag.bench import main

    corpus = tmp_path / "notes"
    corpus.mkdir()
    for i, text in enumerate(["Oxygen is a chemical element with symbol O and atomic number 8.",
                              "The Normans gave their name to Normandy, a region in France.",
                              "Paris is the capital and most populous city of France."]):
        (corpus / f"note{i}.txt").write_text(text)
    results = main(["--corpus", str(corpus), "--cache-dir", cache_dir, "--queries", "1", "--top-k", "3",
                    "--no-generate", "--layout-repeats", "1", "--dtype", "float32"])
    assert "no gold" in results["config"]["query_source"]
    assert "retrieval_only" not in results["quality"] and "note" in results["quality"]
    assert results["rerank"]["reuse"]["pairs_per_s"] > 0
    assert "no gold" in capsys.readouterr().err


def test_saved_runs_pool_into_one_estimate(quick_run, capsys):
    """A saved run keeps what re-summarizing needs (prompt tokens per pair); two runs pooled
    give the same ratios as one run timed twice."""
    import importlib.util

    results, out = quick_run
    saved = json.loads((out / "bench.json").read_text())
    assert all(r.get("prompt_tokens") for r in saved["records"] if r.get("pairs"))
    assert summarize(saved["records"])["rerank"]["limit_fraction"] == pytest.approx(results["rerank"]["limit_fraction"])
    spec = importlib.util.spec_from_file_location("pool_runs", Path(__file__).parents[1] / "scripts" / "pool_runs.py")
    pool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pool)
    assert pool.main([str(out / "bench.json")] * 2) == 0
    line = capsys.readouterr().out
    assert line.startswith("2 runs") and f"{results['rerank']['speedup_vs_full']:.2f}x" in line
