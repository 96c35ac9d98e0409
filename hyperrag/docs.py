"""Measured figures in README.md and docs/*.md, written from the committed records, never by hand.

    python -m hyperrag.docs render   # rewrite every block between its markers from its records
    python -m hyperrag.docs check    # exit 1 when a block differs from what render writes, a record it
                                     # names is missing, or a measured constant in code left its record

A block in a page is ``<!-- render: NAME -->`` ... ``<!-- /render -->``; :data:`BLOCKS` maps each
NAME to the records it reads (paths from the repository root) and a function from those records
(parsed JSON) to markdown. Each block ends with a line naming its records with their date and CPU,
as the records give them ("not recorded" where a record does not). :data:`CONSTANTS` lists the
constants in code that come from a measurement, each with the record and the figure it must equal.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

from hyperrag.kv import planner
from hyperrag.kv.codec import get_codec
from hyperrag.model.loading import MODELS
from hyperrag.rag import metrics

MEMORY_FITS = {m: spec.memory for m, spec in MODELS.items() if spec.memory}  # the packaged LLMs' measured memory

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/*.md")
MARKER = re.compile(r"(<!-- render: ([\w-]+) -->\n)(.*?)(<!-- /render -->)", re.S)
Records = list  # parsed JSON, one per path of the block, in order


# -- formatting ------------------------------------------------------------------------------------

def num(x: float, digits: int = 3) -> str:
    return f"{x:,.{digits}f}"


def pct(x: float, digits: int = 0) -> str:
    return f"{100 * x:.{digits}f}%"


def ci(pair: Sequence[float], fmt: Callable[[float], str]) -> str:
    return f"({fmt(pair[0])} to {fmt(pair[1])})"


def signed(digits: int) -> Callable[[float], str]:
    return lambda x: f"{x:+.{digits}f}"


def sci(x: float) -> str:
    return f"{x:.1e}" if 0 < abs(x) < 1e-3 else f"{x:.4f}".rstrip("0").rstrip(".") if abs(x) < 1 else f"{x:.2f}"


def status(met: bool) -> str:
    return "met" if met else "**not met**"


def target(text: str, met: bool) -> str:
    return f"{text}: {status(met)}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def provenance(path: str, record) -> str:
    """``path`` (date, CPU) as the record gives them."""
    meta = record if isinstance(record, dict) else {}
    machine = meta.get("machine") if isinstance(meta.get("machine"), dict) else {}
    date = machine.get("date") or meta.get("date") or "date not recorded"
    cpu = machine.get("cpu") or meta.get("cpu") or "CPU not recorded"
    return f"`{path}` ({date}; {cpu})"


# -- the blocks ------------------------------------------------------------------------------------

def answers(r: Records) -> str:
    """The reader over the retriever's order vs over the reranked order (reranking's own share of the
    answer gain, paired), then the oracle and the untrained generator as references."""
    trust, old = r[0]["answers"], r[1]["answers"]
    plain, kv = trust["retrieval+reader"], trust["trained+retrieval+reader"]
    f3, s3 = (lambda x: num(x, 3)), signed(3)  # noqa: E731
    cell = lambda s, k: f"{f3(s[k])} {ci(s[k + '_ci95'], f3)}"  # noqa: E731
    return table([f"{kv['questions']} SQuAD dev questions, answers from the top {kv['top_n']}", "EM", "F1",
                  "F1 minus the reader over the retriever's order, paired"], [
        ["the trained reader over the **retriever's** order (`retrieval_reader`)", cell(plain, "em"), cell(plain, "f1"), ""],
        ["the trained reader over the **reranked** order, from stored KV (`reader_kv`)", cell(kv, "em"), cell(kv, "f1"),
         f"**{s3(kv['f1_minus_retrieval_reader'])}** {ci(kv['f1_minus_retrieval_reader_ci95'], s3)} "
         f"(EM {s3(kv['em_minus_retrieval_reader'])} {ci(kv['em_minus_retrieval_reader_ci95'], s3)})"],
        ["oracle: the reader given only the gold paragraph", cell(old["oracle+reader"], "em"), cell(old["oracle+reader"], "f1"), ""],
        ["reference: the untrained generator over the retriever's top 3", cell(old["retrieval+generator"], "em"),
         cell(old["retrieval+generator"], "f1"), ""],
    ])


def abstain(r: Records) -> str:
    """Declining on questions made unanswerable (their gold passages, and every passage holding
    their answer, removed), against the targets."""
    d = r[0]
    a, cal = d["abstain"], d["calibration"]
    rule = a["rule"]
    p1 = lambda x: pct(x, 1)  # noqa: E731
    rows = [[f"AUROC, answerable vs unanswerable: rule / fused score alone / answer likelihood alone",
             f"{num(rule['auroc'])} {ci(rule['auroc_ci95'], num)} / {num(a['fused']['auroc'])} / {num(a['likelihood']['auroc'])}",
             target(">= 0.90", rule["auroc"] >= 0.90)],
            [f"unanswerable declined at the shipped threshold ({num(rule['threshold'])})",
             f"{p1(rule['unanswerable_declined'])} {ci(rule['unanswerable_declined_ci95'], p1)}",
             target(">= 80%", rule["unanswerable_declined"] >= 0.80)],
            ["answerable answered", f"{p1(rule['answerable_answered'])} {ci(rule['answerable_answered_ci95'], p1)}",
             target(">= 90%", rule["answerable_answered"] >= 0.90)],
            ["F1 on answerable minus never declining", f"{signed(3)(rule['f1_answerable_minus_without_declining'])} "
             f"{ci(rule['f1_answerable_minus_without_declining_ci95'], signed(3))}",
             target("within 0.02", abs(rule["f1_answerable_minus_without_declining"]) <= 0.02)],
            [f"calibration error (ECE) of P(passage answers): all {cal['pairs']:,} candidates / each top passage",
             f"{num(cal['ece'])} / {num(cal['ece_top1'])}", target("<= 0.05", cal["ece"] <= 0.05 and cal["ece_top1"] <= 0.05)]]
    return table([f"{rule['questions']} dev questions, {pct(a['fraction'])} made unanswerable", "result", "target"], rows)


RANKING_SYSTEMS = (("retrieval", "retrieval only (MiniLM + faiss)"),
                   ("trained", "shipped adapter, reranker score alone"),
                   ("trained+retrieval", "shipped adapter + w x cosine (**engine default**)"))


def ranking(r: Records) -> str:
    rows = []
    for rec, systems in ((r[0], RANKING_SYSTEMS), (r[1], (("trained+retrieval", "reranker-only adapter + w x cosine (where training started)"),))):
        for key, label in systems:
            m = rec["systems"][key]["ranking"]
            rows.append([label] + [f"{num(m[k])} {ci(m[k + '_ci95'], num)}" for k in ("recall@1", "recall@5", "ndcg@10")])
    return table([f"ranking, {r[0]['queries']} dev questions (retriever's top {r[0]['top_k']} reordered)",
                  "recall@1", "recall@5", "NDCG@10"], rows)


def bench_rows(r: Records) -> list[list[str]]:
    """Every row of the default bench run's table (the README shows the headline rows)."""
    d = r[0]
    rr, e2e, q, st, sv = d["rerank"], d["e2e"], d["quality"], d["storage"], d["serve"]
    fp32 = next(c for c in d.get("codecs", []) if c["codec"] == "fp32")
    kv = e2e["reader_kv"]
    lo, hi = rr["limit_fraction_ci95"]
    return [
        ["reranker pairs/s: full prefill / prefix cached / **KV reuse**",
         f"{num(rr['full']['pairs_per_s'], 2)} / {num(rr['prefix_cached']['pairs_per_s'], 2)} / **{num(rr['reuse']['pairs_per_s'], 1)}**", ""],
        ["reuse vs full prefill", f"**{num(rr['speedup_vs_full'], 2)}x**", target(">= 5x", rr["speedup_vs_full"] >= 5)],
        ["reuse vs the query-first prompt with `[instruction][question]` cached (vLLM-style prefix caching)",
         f"{num(rr['speedup_vs_query_first_cached'], 2)}x", target(">= 5x", rr["speedup_vs_query_first_cached"] >= 5)],
        [f"share of the token-ratio limit ({num(rr['token_ratio_limit'], 1)}x), 95% interval",
         f"**{pct(rr['limit_fraction'], 1)}** ({pct(lo, 1)}-{pct(hi, 1)})", target(">= 90%", rr["limit_fraction"] >= 0.9)],
        ["end to end queries/s: retrieval only / baseline / **reuse**",
         f"{num(e2e['retrieval_only']['queries_per_s'])} / {num(e2e['baseline']['queries_per_s'])} / "
         f"**{num(e2e['reuse']['queries_per_s'])}** ({num(e2e['speedup_vs_baseline'], 2)}x)", target(">= 3x", e2e["speedup_vs_baseline"] >= 3)],
        ["end to end: reader_full / **reader_kv**",
         f"{num(e2e['reader_full']['queries_per_s'])} / **{num(kv['queries_per_s'], 2)}** (**{num(e2e['reader_speedup'], 2)}x**; "
         f"p50 {num(kv['p50_ms'] / 1e3, 2)} s, p95 {num(kv['p95_ms'] / 1e3, 2)} s; reading {kv['stage_ms']['generate']:.0f} ms)",
         target(">= 6x", e2e["reader_speedup"] >= 6)],
        [f"{sv['clients']} concurrent clients vs one asking in turn ({sv['mode']})",
         f"{num(sv['queries_per_s'], 2)} vs {num(sv['sequential_queries_per_s'], 2)} queries/s ({num(sv['speedup'], 2)}x); "
         f"p95 {num(sv['p95_ms'] / 1e3, 1)} s vs {num(sv['sequential_p95_ms'] / 1e3, 2)} s", target(">= 1.5x", sv["speedup"] >= 1.5)],
        [f"reuse vs full, {st['codec']} store: identical rankings / same top-3 / max score diff",
         f"{pct(q['ranking_agreement'])} / {pct(q['top_n_agreement'])} / {sci(q['max_abs_score_diff'])}", ""],
        ["reuse vs full, fp32 store: identical rankings / max score diff",
         f"{pct(fp32['ranking_agreement'])} / {sci(fp32['max_abs_score_diff'])}",
         target("100% / <= 1e-4", fp32["ranking_agreement"] == 1 and fp32["max_abs_score_diff"] <= 1e-4)],
        [f"answer F1 on these {q['reader_kv']['queries']}: retrieval-only RAG / reuse + generator / **reader_kv**",
         f"{num(q['retrieval_only']['f1'])} / {num(q['reuse']['f1'])} / **{num(q['reader_kv']['f1'])}**", ""],
        ["store: documents, tokens, size / precompute / KV load",
         f"{st['docs']:,}, {st['tokens']:,}, {st['bytes'] / 2**30:.2f} GiB ({st['codec']}) / {num(st['precompute_docs_per_s'], 2)} docs/s / "
         f"{num(st['load_gb_per_s'], 2)} GB/s ({st['cpu_tier_loads']:,} of {st['loads']:,} loads from the {st['cpu_tier_gb']} GB CPU tier)", ""],
    ]


BENCH_HEADER = ["measured (one run)", "result", "target"]
HEADLINE_ROWS = (1, 3, 4, 5, 6, 8)  # reuse vs full, share of the limit, end to end, reader, clients, fp32


def bench_speed(r: Records) -> str:
    return table(BENCH_HEADER, bench_rows(r))


def bench_headline(r: Records) -> str:
    rows = bench_rows(r)
    return table(BENCH_HEADER, [rows[i] for i in HEADLINE_ROWS])


CODEC_LABELS = {"fp16": "**fp16** (default)", "int8": "**int8**", "int4": "**int4**", "int2": "**int2**"}


def bench_codecs(r: Records) -> str:
    rows = []
    for c in r[0]["codecs"]:
        name = c["codec"].replace(":nearest", ", nearest rounding")
        groups = re.search(r"k(\d+)v(\d+)", c["spec"])
        label = CODEC_LABELS.get(c["codec"], name) + (f" (k{groups[1]}/v{groups[2]})" if groups and ":" not in c["codec"] else "")
        rows.append([label, f"{c['bytes_per_token']:,.0f}", f"{c['fraction_of_fp16']:.3g}x",
                     f"{sci(c['max_abs_score_diff'])} / {sci(c['mean_abs_score_diff'])}", pct(c["ranking_agreement"]),
                     pct(c["top_n_agreement"]), num(c["ndcg@10"]), num(c["pairs_per_s"], 1), pct(c["decode_share"], 1),
                     num(c["encode_ms_per_doc"], 1)])
    return table(["codec", "bytes/token", "of fp16", "max / mean score error", "identical rankings", "same top-3",
                  "NDCG@10", "reuse pairs/s", "decode share", "encode ms/doc"], rows)


def codecs_dev(r: Records) -> str:
    d = r[0]
    exact = d["systems"]["trained+retrieval"]["ranking"]
    reads = d["answers"]
    base = reads["trained+retrieval+reader"]
    rows = [["exact fp32 KV", "0", "100%", "100%", f"NDCG@10 {num(exact['ndcg@10'])}",
             f"{num(base['f1'])} {ci(base['f1_ci95'], num)}", "", ""]]
    for key, c in d["codec_check"].items():
        read = reads.get(key + "+reader")
        rows.append([key.split("@")[1], f"{sci(c['max_abs_score_diff'])} / {sci(c['mean_abs_score_diff'])}",
                     pct(c["ranking_agreement"]), pct(c["top_n_agreement"]),
                     f"{signed(4)(c['ndcg@10_minus_exact'])} {ci(c['ndcg@10_minus_exact_ci95'], signed(4))}",
                     num(read["f1"]) if read else "", f"{signed(3)(read['f1_minus_exact'])} {ci(read['f1_minus_exact_ci95'], signed(3))}" if read else "",
                     pct(read["same_answer_as_exact"]) if read else ""])
    return table([f"codec ({d['queries']} dev questions)", "max / mean score error", "identical rankings", "same top-3",
                  "NDCG@10 minus exact KV", "reader F1", "reader F1 minus exact KV", "same answer"], rows)


def codec_targets(r: Records) -> str:
    """The codec targets, read from the bench's sweep (bytes, decode share) and the 300 dev questions
    (errors against exact KV), with how much smaller int4's measured error would have to be."""
    bench, dev = r
    sweep = {c["codec"]: c for c in bench["codecs"]}
    int4, int2 = dev["codec_check"]["trained+retrieval@int4"], dev["codec_check"]["trained+retrieval@int2"]
    steps = metrics.scaled_error(dev["per_question"], "trained+retrieval@int4", "trained+retrieval", dev["top_n"])
    need = lambda key, want: next((a for a, m in steps if m[key] >= want), None)  # noqa: E731
    times = lambda a: f"{1 / a:.0f}x smaller ({math.log2(1 / a):.1f} more bits)" if a else "more than any scale tried"  # noqa: E731
    top, same = need("top_n_agreement", 0.98), need("ranking_agreement", 0.75)
    gap = statistics.median(metrics.closest_gaps(dev["per_question"], "trained+retrieval"))
    slowest = max(bench["codecs"], key=lambda c: c["decode_share"])
    drop = lambda c: f"{signed(4)(c['ndcg@10_minus_exact'])} {ci(c['ndcg@10_minus_exact_ci95'], signed(4))}"  # noqa: E731
    return table(["target", "measured", "status"], [
        ["int4 max score error <= 0.15; identical rankings on 75%; same top 3 on 98% (dev)",
         f"{sci(int4['max_abs_score_diff'])}; {pct(int4['ranking_agreement'])}; {pct(int4['top_n_agreement'])}. The same error "
         f"pattern scaled down keeps the top 3 on 98% when {times(top)}, whole rankings on 75% when {times(same)}; "
         f"the median question's two closest candidates are {sci(gap)} apart",
         status(int4["max_abs_score_diff"] <= 0.15 and int4["ranking_agreement"] >= 0.75
                and int4["top_n_agreement"] >= 0.98)],
        ["int4 at <= 0.27x of fp16", f"{sweep['int4']['fraction_of_fp16']:.3g}x",
         status(sweep["int4"]["fraction_of_fp16"] <= 0.27)],
        ["int4 NDCG@10 drop <= 0.005 (dev)", drop(int4), status(-int4["ndcg@10_minus_exact"] <= 0.005)],
        ["int2 at <= 0.15x of fp16 with an NDCG@10 drop <= 0.01 (dev)", f"{sweep['int2']['fraction_of_fp16']:.3g}x; {drop(int2)}",
         status(sweep["int2"]["fraction_of_fp16"] <= 0.15 and -int2["ndcg@10_minus_exact"] <= 0.01)],
        ["decoding under 10% of reuse time, every codec (the sweep)",
         f"at most {pct(slowest['decode_share'], 1)} ({slowest['codec']})", status(slowest["decode_share"] < 0.10)],
    ])


def kernel_probe(r: Records) -> str:
    """What the first-start probes (``hyperrag/model/kernels.py``) chose on the default run's machine."""
    lin, streams = r[0]["machine"]["linear"], r[0]["machine"]["streams"]
    rows = [[label, f"**{lin[key]}**", f"ATen {lin['figures_ms'][key]['aten']:.1f} / oneDNN {lin['figures_ms'][key]['onednn']:.1f}"]
            for key, label in (("small", "projections, reuse-sized"), ("large", "projections, prefill-sized"), ("head", "output head"))]
    rows.append(["OpenMP threads per reuse stream", f"**{streams['small_stream_threads']}**",
                 " / ".join(f"{n} thread{'s' * (n != '1')} {ms:.0f}" for n, ms in sorted(streams["figures_ms"].items()))])
    return table(["first-start probe, default bench run", "chosen", "ms per call"], rows)


def memory_budget(r: Records) -> str:
    """Each packaged model's memory target and working margin (:class:`~hyperrag.model.loading.MemoryFit`),
    against the app's first visit with default settings."""
    rows = []
    for (model, fit), d in zip(MEMORY_FITS.items(), r):
        peak = d["peak_rss_bytes"] / 1e9
        rows.append([f"`{model}`", f"{fit.budget_gb:g} GB", f"{status(peak <= fit.budget_gb)}: peak {peak:.2f} GB",
                     f"{d['cpu_tier_gb'] * 2**30 / 1e9:.2f} GB", f"{fit.margin_gb:g} GiB", f"{margin_used_gib(d):.2f} GiB"])
    return table(["model", "budget (default settings)", "app's first visit", "CPU tier", "working margin",
                  "held on top of engine and tier"], rows)


def memory(r: Records) -> str:
    # The script records GiB (``*_gb``); the budget and the target are decimal GB.
    peak = lambda rec, phase: next(p["peak_rss_gb"] for p in rec["phases"] if p["phase"] == phase) * 2**30 / 1e9  # noqa: E731
    labels = [f"**default** (memory budget {r[0]['settings']['memory_budget_gb']:g} GB: CPU tier {r[0]['cpu_tier_gb'] * 2**30 / 1e9:.2f} GB)",
              "no budget (tier holds the corpus)", "no CPU tier"]
    rows = [[phase] + [f"{peak(rec, key):.2f} GB" for rec in r] for phase, key in
            (("after load", "load"), ("precompute (309 documents), peak", "precompute"), ("after a question in each mode, **peak**", "ask reader_kv"))]
    return table(["resident memory"] + labels, rows)


def scale_100k(r: Records) -> str:
    s, sweep, b = r
    ex, hn = s["exact"], s["hnsw"]
    q, st, rr = b["quality"], b["storage"], b["rerank"]
    return table(["100,000 SQuAD passages", "result"], [
        [f"exact vs HNSW (M {hn['M']}, efSearch {hn['efSearch']}), {s['queries']} dev questions",
         f"HNSW build {num(hn['build_s'], 1)} s; query p50 {num(hn['query_ms_p50'], 2)} ms vs exact {num(ex['query_ms_p50'], 1)} ms; "
         f"**recall@10 {num(hn['recall_at_k'])}** of exact"],
        ["efSearch " + " / ".join(str(p["efSearch"]) for p in sweep),
         "recall@10 " + " / ".join(num(p["recall_at_k"]) for p in sweep) + "; p50 " + " / ".join(num(p["p50_ms"], 2) for p in sweep) + " ms"],
        [f"{b['config']['queries']} questions, every mode (candidates precomputed: {st['docs']:,})",
         f"retrieval {b['e2e']['retrieval_only']['stage_ms']['retrieve']:.0f} ms; reader_kv F1 {num(q['reader_kv']['f1'])} / EM {num(q['reader_kv']['em'])} "
         f"(retrieval-only generator F1 {num(q['retrieval_only']['f1'])}); recall@1 {num(q['retrieval_only']['recall@1'])} retrieved, "
         f"{num(q['reuse']['recall@1'])} reranked; reuse {pct(rr['limit_fraction'], 1)} of the token-ratio limit "
         f"({num(rr['token_ratio_limit'], 2)}x); peak RSS {b['memory']['peak_rss_gb_after']['end']} GB"],
        ["the planner's whole-corpus estimate", f"{b['planner']['docs']:,} passages, {num(b['planner']['tokens_per_doc'], 1)} tokens each: "
         f"{b['planner']['bytes'] / 1e9:.1f} GB ({b['storage']['codec']})"],
    ])


def planner_1m(r: Records) -> str:
    docs, tokens = 1_000_000, 200
    rate = planner.docs_per_s_for(tokens)
    rows = [[codec, f"{planner.estimate(docs, tokens, get_codec(codec)).total_bytes / 1e12:.2f} TB"] for codec in ("fp16", "int8", "int4", "int2")]
    hours = ", ".join(f"{planner.precompute_hours(docs, rate, w):,.1f} h on {w}" for w in (1, 8, 32))
    return (table([f"{docs:,} passages of {tokens} tokens", "store size"], rows)
            + f"\n\nPrecompute at {rate:.2f} docs/s per 2-core worker (the record's "
            f"{r[0]['storage']['precompute_docs_per_s']:.2f} docs/s at {r[0]['storage']['tokens'] / r[0]['storage']['docs']:.0f} "
            f"tokens, scaled by tokens): {hours} workers.")


def adapter_card(r: Records) -> str:
    c = r[0]
    h, v = c["hyperparameters"], c["validation"]
    rows = [["base model", c["base_model"]], ["data", f"{c['data']}: {len(c['train_articles'])} articles, {c['train_paragraphs']:,} paragraphs"],
            ["LoRA", f"rank {h['rank']}, alpha {h['alpha']:g}, top {h['lora_layers']} layers, {h['targets']}"],
            ["steps", f"{c['steps']:,} ({h['docs']} documents, {h['hard']} hard negatives, answer weight {h['answer_weight']:g}, "
                      f"lr {h['lr']:g}, seed {h['seed']}, {h['compute']})"],
            ["training time (`train_seconds`)", f"{c['train_seconds'] / 60:.0f} min"],
            ["held-out train articles", ", ".join(v["articles"]) + f": {v['questions']} questions"],
            ["retrieval weight tuned there", f"{v['retrieval_weight']:g}"]]
    for key, label in (("retrieval", "retriever alone"), ("trained", "reranker score alone")):
        rows.append([f"recall@1 / NDCG@10 there, {label}", f"{num(v[key]['recall@1'])} / {num(v[key]['ndcg@10'])}"])
    return table(["shipped adapter", ""], rows)


def http_service(r: Records) -> str:
    d = r[0]
    rows = [[f"first vs second request, {v['questions']} questions ({label})",
             f"{v['first_p50_ms'] / 1e3:.1f} s vs {v['second_p50_ms'] / 1e3:.2f} s p50: **{num(v['speedup'], 1)}x** "
             f"({pct(v['first_kv_computed_fraction'])} of documents computed on first sight; {v['errors']} errors)"]
            for key, label in (("fs_store_single_process", "one process, fs://"), ("redis_store_ray_serve", "Ray Serve, redis://"))
            for v in (d["first_vs_second"][key],)]
    rows += [[f"{run['service']}, {run['clients']} client(s), {run['requests']} requests",
              f"{num(run['queries_per_s'], 2)} queries/s, p50 {run['p50_ms'] / 1e3:.1f} s, p95 {run['p95_ms'] / 1e3:.1f} s, "
              f"{run['errors']} errors, KV reused {pct(run['kv_reused_fraction'])}, identical rankings {pct(run['identical_rankings'])}; "
              f"load average {run['loadavg_end']:g} at its end"]
             for run in d["runs"]]
    return table(["HTTP service (`/v1/rerank`)", "result"], rows)


MODEL_IDS = ("smollm2-135m", "gemma3-270m")


def models(r: Records) -> str:
    """The two packaged models side by side: geometry, the bench (same corpus and questions, one
    machine), each shipped adapter's training length, and SQuAD dev (ranking paired with
    retrieval's on the same questions; answers)."""
    benches, cards, devs, defaults = r[0:2], r[2:4], r[4:6], r[6:8]
    geo = [MODELS[m].kv for m in MODEL_IDS]
    rank = lambda d, system: d["systems"][system]["ranking"]  # noqa: E731
    answer = lambda d, row: d["answers"][row]  # noqa: E731
    trained = "trained+retrieval"
    rows = [["KV bytes per token, fp16 store (layers / KV heads / head_dim)", *(f"{planner.bytes_per_token(get_codec('fp16'), g):,.0f} ({g.layers} / {g.kv_heads} / {g.head_dim})" for g in geo)],
            ["precompute, documents/s", *(num(b["storage"]["precompute_docs_per_s"], 2) for b in benches)],
            ["quick bench (fp32, one machine): reranker pairs/s, full prefill / **reuse** (speedup, share of the limit)",
             *(f"{num(b['rerank']['full']['pairs_per_s'], 2)} / {num(b['rerank']['reuse']['pairs_per_s'], 1)} "
               f"(**{num(b['rerank']['speedup_vs_full'], 2)}x**, {pct(b['rerank']['limit_fraction'], 1)} of {num(b['rerank']['token_ratio_limit'], 1)}x)"
               for b in benches)],
            ["quick bench: reader from stored KV vs full prefill", *(f"{num(b['e2e']['reader_speedup'], 2)}x" for b in benches)],
            ["quick bench: reuse vs full, max score difference / identical rankings",
             *(f"{sci(b['quality']['max_abs_score_diff'])} / {pct(b['quality']['ranking_agreement'])}" for b in benches)],
            ["default bench (24 questions, fp16 store; CPU below): reuse speedup, share of the ratio of token totals",
             *(f"{num(b['rerank']['speedup_vs_full'], 2)}x, {pct(b['rerank']['fraction_of_totals_ratio'], 1)} of "
               f"{num(b['rerank']['token_ratio_of_totals'], 1)}x" for b in defaults)],
            ["adapter: training steps", *(f"{c['steps']:,}" for c in cards)],
            ["SQuAD dev recall@1: retrieval / zero-shot / **trained** (trained minus retrieval, paired)",
             *(f"{num(rank(d, 'retrieval')['recall@1'])} / {num(rank(d, 'zero-shot')['recall@1'])} / "
               f"**{num(rank(d, trained)['recall@1'])}** ({signed(3)(rank(d, trained)['recall@1_minus_retrieval'])}, "
               f"{ci(rank(d, trained)['recall@1_minus_retrieval_ci95'], signed(3)).strip('()')}; {d['queries']} q.)" for d in devs)],
            ["SQuAD dev NDCG@10: retrieval / trained", *(f"{num(rank(d, 'retrieval')['ndcg@10'])} / {num(rank(d, trained)['ndcg@10'])}" for d in devs)],
            ["F1 / EM: untrained generator over the retriever's top 3",
             *(f"{num(answer(d, 'retrieval+generator')['f1'])} / {num(answer(d, 'retrieval+generator')['em'])}" for d in devs)],
            ["F1 / EM: **trained reader** over the reranked top 3",
             *(f"**{num(answer(d, trained + '+reader')['f1'])}** {ci(answer(d, trained + '+reader')['f1_ci95'], num)} / "
               f"{num(answer(d, trained + '+reader')['em'])} ({answer(d, trained + '+reader')['questions']} q.)" for d in devs)]]
    return table(["", *(f"`{m}`" for m in MODEL_IDS)], rows)


def tests_line(r: Records) -> str:
    d = r[0]
    return (f"Fresh clone at `{d['commit']}`, `.ci/run`: {d['passed']} passed, {d['skipped']} skipped, "
            f"{d['failed']} failed in **{d['test_seconds'] / 60:.1f} min** of tests ({d['total_seconds'] / 60:.1f} min with "
            f"set-up); {d['note']}")


def settings_table(_: Records) -> str:
    from hyperrag.common.settings import Settings

    def shown(value) -> str:
        text = str(value)
        return "`<package>/" + text.split("/hyperrag/", 1)[1] + "`" if "/hyperrag/shipped/" in text else f"`{text}`"

    rows = [[f"`{f.name}`", shown(f.default), f"`HYPERRAG_{f.name.upper()}`", f.metadata.get("help", "").replace("|", "\\|")]
            for f in fields(Settings) if f.name != "cache_dir"]
    rows.append(["`cache_dir`", "`~/.cache/hyperrag`", "`HYPERRAG_CACHE_DIR`",
                 next(f for f in fields(Settings) if f.name == "cache_dir").metadata.get("help", "")])
    return table(["field", "default", "environment", "meaning"], rows)


@dataclass(frozen=True)
class Block:
    records: tuple[str, ...]
    make: Callable[[Records], str]


BLOCKS: dict[str, Block] = {
    "answers-dev-300": Block(("docs/eval/trust-dev-300.json", "docs/eval/reader-dev-300.json"), answers),
    "abstain-dev-300": Block(("docs/eval/trust-dev-300.json",), abstain),
    "abstain-dev-300-gemma3-270m": Block(("docs/eval/trust-dev-300-gemma3-270m.json",), abstain),
    "ranking-dev-300": Block(("docs/eval/reader-dev-300.json", "docs/eval/reranker-lora-dev-300.json"), ranking),
    "bench-default": Block(("docs/bench/bench-default.json",), bench_speed),
    "bench-headline": Block(("docs/bench/bench-default.json",), bench_headline),
    "bench-codecs": Block(("docs/bench/bench-default.json",), bench_codecs),
    "codecs-dev-300": Block(("docs/eval/codecs-dev-300.json",), codecs_dev),
    "codec-targets": Block(("docs/bench/bench-default.json", "docs/eval/codecs-dev-300.json"), codec_targets),
    "kernel-probe": Block(("docs/bench/bench-default.json",), kernel_probe),
    "memory": Block(("docs/memory/app-first-visit.json", "docs/memory/app-first-visit-no-budget.json",
                     "docs/memory/app-first-visit-no-tier.json"), memory),
    "memory-budget": Block(tuple(f.record for f in MEMORY_FITS.values()), memory_budget),
    "scale-100k": Block(("docs/bench/scale-squad-100k.json", "docs/bench/scale-squad-100k-sweep.json",
                         "docs/bench/bench-squad-100k.json"), scale_100k),
    "planner-1m": Block(("docs/bench/bench-default.json",), planner_1m),
    "adapter-card": Block(("hyperrag/shipped/hyperrag-lora/hyperrag.json",), adapter_card),
    "http-service": Block(("docs/bench/bench-http.json",), http_service),
    "models": Block(("docs/bench/bench-quick-smollm2-135m.json", "docs/bench/bench-quick-gemma3-270m.json",
                     "hyperrag/shipped/hyperrag-lora/hyperrag.json", "hyperrag/shipped/gemma3-270m-lora/hyperrag.json",
                     "docs/eval/dev-smollm2-135m.json", "docs/eval/dev-gemma3-270m.json",
                     "docs/bench/bench-default.json", "docs/bench/bench-default-gemma3-270m.json"), models),
    "tests-line": Block(("docs/bench/tests-fresh-clone.json",), tests_line),
    "settings": Block((), settings_table),
}


@dataclass(frozen=True)
class Constant:
    """A constant in code that a measurement set: it must equal ``figure(record)`` rounded to
    ``digits`` or, for a safety margin (``at_least``), be no smaller than it."""

    name: str  # as the code spells it, for the message
    value: Callable[[], float]  # read at check time
    record: str
    figure: Callable[[dict], float]
    digits: int
    at_least: bool = False


def margin_used_gib(d: dict) -> float:
    """What the app's peak held on top of the loaded engine and its CPU tier (GiB): the resident
    set after loading already holds the tier, which LMCache allocates and touches when the store
    opens."""
    load = next(p for p in d["phases"] if p["phase"] == "load")
    return d["peak_rss_bytes"] / 2**30 - load["rss_gb"]


CONSTANTS = (  # each constant's module names its record beside it
    Constant("hyperrag.kv.planner.MEASURED_DOCS_PER_S", lambda: planner.MEASURED_DOCS_PER_S, planner.MEASURED_RECORD,
             lambda d: d["storage"]["precompute_docs_per_s"], 2),
    Constant("hyperrag.kv.planner.MEASURED_TOKENS_PER_DOC", lambda: planner.MEASURED_TOKENS_PER_DOC,
             planner.MEASURED_RECORD, lambda d: d["storage"]["tokens"] / d["storage"]["docs"], 6),
    *(c for m, fit in MEMORY_FITS.items() for c in (
        Constant(f"hyperrag.model.loading.MODELS[{m!r}].memory.budget_gb", lambda m=m: MODELS[m].memory.budget_gb,
                 fit.record, lambda d: d["peak_rss_bytes"] / 1e9, 2, at_least=True),
        Constant(f"hyperrag.model.loading.MODELS[{m!r}].memory.margin_gb", lambda m=m: MODELS[m].memory.margin_gb,
                 fit.record, margin_used_gib, 2, at_least=True))),
)


# -- render and check ------------------------------------------------------------------------------

def pages(root: Path) -> list[Path]:
    return [p for pattern in PAGES for p in sorted(root.glob(pattern))]


def load(root: Path, path: str):
    return json.loads((root / path).read_text(encoding="utf-8"))


def rendered(name: str, root: Path) -> str:
    """The body of block ``name``: its table and the line naming its records."""
    block = BLOCKS[name]
    records = [load(root, p) for p in block.records]
    source = ("Records: " + "; ".join(provenance(p, rec) for p, rec in zip(block.records, records))
              if block.records else "Generated from the `Settings` dataclass in `hyperrag/common/settings.py`")
    return f"{block.make(records)}\n\n<sub>{source}. Written by `python -m hyperrag.docs render`.</sub>\n"


def problems_in(page: Path, root: Path, write: bool) -> list[str]:
    """What differs in ``page`` (rewriting it when ``write``)."""
    text, problems = page.read_text(encoding="utf-8"), []

    def body(m: re.Match) -> str:
        name, where = m[2], f"{page.relative_to(root)}: block {m[2]!r}"
        if name not in BLOCKS:
            problems.append(f"{where}: no such block (known: {', '.join(BLOCKS)})")
            return m[0]
        missing = [p for p in BLOCKS[name].records if not (root / p).is_file()]
        if missing:
            problems.append(f"{where}: record missing: {', '.join(missing)}")
            return m[0]
        new = rendered(name, root)
        if new != m[3]:
            problems.append(f"{where}: differs from its records (run python -m hyperrag.docs render)")
        return m[1] + new + m[4]

    new_text = MARKER.sub(body, text)
    if write and new_text != text:
        page.write_text(new_text, encoding="utf-8")
    return problems


def constant_problems(root: Path) -> list[str]:
    out = []
    for c in CONSTANTS:
        if not (root / c.record).is_file():
            out.append(f"{c.name}: record missing: {c.record}")
            continue
        value, want = c.value(), round(c.figure(load(root, c.record)), c.digits)
        if c.at_least and value < want:
            out.append(f"{c.name} = {value} is less than the {want} that {c.record} measured")
        elif not c.at_least and round(value, c.digits) != want:
            out.append(f"{c.name} = {value}, but {c.record} measured {want}")
    return out


def run(root: Path, write: bool) -> list[str]:
    problems = [p for page in pages(root) for p in problems_in(page, root, write)]
    return problems + constant_problems(root)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperrag.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("render", "check"))
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (README.md, docs/, the records)")
    args = parser.parse_args(argv)
    if not (args.root / "README.md").is_file():
        parser.error(f"{args.root} has no README.md: pass the repository root with --root")
    problems = run(args.root, write=args.action == "render")
    if args.action == "render":
        problems = [p for p in problems if "differs from its records" not in p]
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print(f"{args.action}: {len(pages(args.root))} pages, every block matches its records")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
