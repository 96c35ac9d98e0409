"""Per-query records -> the bench's result schema (``e2e``, ``rerank``, ``quality`` parts).

Shared by ``python -m hyperrag.bench`` and the app's batch dashboards, so both report the same
numbers the same way. No plotting here (engine side): :mod:`hyperrag.figures` draws the dict.

Result schema (the whole dict; this module builds ``e2e``, ``rerank`` and ``quality``)::

    config   {...}                       how the run was made (bench only)
    rerank   {full, prefix_cached, reuse, zero_shot: {pairs, pairs_per_s, p50_ms, p95_ms, mean_ms},
              speedup_vs_full, speedup_vs_prefix_cached, token_ratio_limit, limit_fraction,
              limit_fraction_ci95 [lo, hi], token_ratio_of_totals, fraction_of_totals_ratio,
              mean_prompt_tokens, mean_query_tokens}
    e2e      {retrieval_only, zero_shot, baseline, reuse, retrieval_reader, reader_full, reader_kv: {queries, queries_per_s,
              p50_ms, p95_ms, mean_ms, stage_ms {retrieve, kv_load, rerank, generate}}, speedup_vs_baseline}
    quality  {retrieval_only, zero_shot, baseline, reuse, retrieval_reader, reader_full, reader_kv: {queries, recall@1,
              recall@5, mrr@10, ndcg@10, em, f1, declined}, max_abs_score_diff, ranking_agreement, top_n_agreement,
              answer_agreement, reader_kv_minus_retrieval_reader {queries, em, em_ci95, f1, f1_ci95}}
    storage  {codec, docs, tokens, bytes, bytes_per_token, precompute_docs_per_s, load_gb_per_s}
    machine  {cpu, cores, threads, torch, device, ...}
    codecs   [ {codec, spec, encode_ms_per_doc, bytes_per_token, fraction_of_fp16, max_abs_score_diff, mean_abs_score_diff, ranking_agreement,
               top_n_agreement, ndcg@10, pairs_per_s, decode_share, ...} ]
    frontier [ {label, queries_per_s | pairs_per_s, ndcg@10, f1} ]
    layout   {static_ms, concat_ms, ratio, saved_ms, ...}              (optional)
    memory   {peak_rss_gb_after: {load, precompute, zero_shot, warmup, queries, codecs, serve, end}}
    serve    {clients, mode, queries, queries_per_s, p50_ms, p95_ms, mean_ms, sequential_queries_per_s,
              sequential_p50_ms, sequential_p95_ms, speedup, mean_group, identical_answers, ...}  (--serve)
    planner  {label, bytes} or a list of them                          (optional)

Mode names come from the one mode table, :mod:`hyperrag.rag.modes`: records use the engine's names,
the schema each mode's ``e2e_key`` (end to end and quality) and ``rerank_key`` (reranker rows).
``e2e.reader_speedup`` is reader_kv's queries/s over reader_full's (the same reader, documents
loaded vs computed); ``quality.reader_kv_vs_full`` says whether they answered alike;
``quality.reader_kv_minus_retrieval_reader`` is reranking's own share of the answer quality: the
same reader over the reranked and over the retriever's top-n, paired by question. A reader's EM
and F1 score its answer also where it declined (``declined``: the share it said "not found" for;
every gold question here is answerable, ``python -m hyperrag.evaluate --unanswerable`` measures
declining).
"""
from __future__ import annotations

import csv
import io
import json
import math
import random
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from hyperrag.rag.metrics import agreement, exact_match, f1_score, latency_summary, mean_interval, ranking_metrics
from hyperrag.rag.modes import E2E_KEYS, MODE_TABLE, mode as mode_spec

STAGES = ("retrieve", "kv_load", "rerank", "generate")
# The modes with a reranker row of their own (``rerank_key``), the zero-shot reference last: the
# token ratios come from the first one measured.
RERANKED = sorted((m for m in MODE_TABLE if m.rerank_key), key=lambda m: m.name == "zero_shot")
QUALITY_KEYS = ("recall@1", "recall@5", "mrr@10", "ndcg@10", "em", "f1")
BOOTSTRAP_DRAWS = 2000


def record_from_result(result: Any, query: Any = None, query_id: str | None = None,
                       generated: bool | None = None) -> dict:
    """One record from an :class:`hyperrag.rag.pipeline.RAGResult` (duck-typed; no engine import).

    ``query``: the corpus :class:`~hyperrag.data.corpus.Query` (or any object/dict with ``id``,
    ``doc_ids``, ``answers``) when the question is a gold one; gives the quality numbers.
    ``generated``: whether an answer was generated (default: whether the answer is non-empty).
    """
    def attr(obj, name, default=None):
        if obj is None:
            return default
        return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)

    rerank = attr(result, "rerank")
    docs = attr(result, "docs", [])
    record = {
        "query_id": query_id or attr(query, "id") or attr(result, "question", ""),
        "question": attr(result, "question", ""),
        "mode": attr(result, "mode"),
        "timings": dict(attr(result, "timings", {})),
        "ranked_ids": [attr(d, "id") for d in docs],
        "scores": {attr(d, "id"): float(attr(d, "score", 0.0)) for d in docs},
        "top_n": attr(result, "top_n", 0),
        "answer": attr(result, "answer", "") or "",
        "generated": bool(attr(result, "answer", "")) if generated is None else generated,
    }
    if query is not None:
        record["gold_ids"] = list(attr(query, "doc_ids", ()) or ())
        record["answers"] = list(attr(query, "answers", ()) or ())
    reading = attr(result, "reading")
    if reading is not None:  # the reader's own answer, also where it declined, and its confidence
        record["reader_answer"] = attr(reading, "answer", "") or ""
        record["found"] = bool(attr(result, "found", True))
        if attr(result, "confidence") is not None:
            record["confidence"] = float(attr(result, "confidence"))
    if rerank is not None:
        record["pairs"] = int(attr(rerank, "pairs", 0))
        record["query_tokens"] = int(attr(rerank, "query_tokens", 0))
        record["prompt_tokens"] = list(attr(rerank, "prompt_tokens", []))
        record["encoded_docs"] = int(attr(rerank, "encoded_docs", 0))
    return record


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(records: Iterable[Mapping[str, Any]]) -> dict:
    """Aggregate per-query records into the ``e2e``, ``rerank`` and ``quality`` parts.

    Each record is a dict (see :func:`record_from_result`, which builds one from a ``RAGResult``):

    - ``query_id`` (str): the same id in every mode for the same question; pairs modes up;
    - ``mode`` (str): ``retrieval`` | ``baseline`` | ``prefix`` | ``reuse`` (schema names accepted);
    - ``timings`` (dict, seconds): ``retrieve``, ``kv_load``, ``rerank``, ``generate``, ``total``
      (``total`` defaults to the sum of the stages);
    - ``ranked_ids`` (list[str]): candidate ids in final order (the first ``top_n`` were used);
    - ``scores`` (dict id -> float, optional): reranker scores, to compare reuse with baseline;
    - ``top_n`` (int, optional): documents given to the generator;
    - ``answer`` (str) and ``generated`` (bool, default True): the generated answer; a mode
      whose records were not generated (e.g. a rerank-only ``prefix`` run) is left out of ``e2e``
      (unless no mode generated) and its EM/F1 are not reported;
    - ``gold_ids``, ``answers`` (lists, optional): gold documents and answers; records without
      them count for speed but not for quality;
    - ``pairs`` (int), ``query_tokens`` (int), ``prompt_tokens`` (list[int]) (optional, rerank
      modes): candidates scored, question+suffix tokens run per pair, full prompt length per pair.

    Returns ``{"e2e": ..., "rerank": ..., "quality": ...}`` in the bench's schema; parts with no
    data are left out. Without gold ids, ``quality`` holds only a ``note`` and the reuse-vs-
    baseline agreement (``max_abs_score_diff``, ``ranking_agreement``, ...), no per-mode rows.
    """
    by_mode: dict[str, list[Mapping[str, Any]]] = {}
    for rec in records:
        try:
            key = mode_spec(str(rec.get("mode"))).e2e_key
        except ValueError:
            raise ValueError(f"record with unknown mode {rec.get('mode')!r}") from None
        by_mode.setdefault(key, []).append(rec)
    out: dict[str, Any] = {}
    e2e = _e2e(by_mode)
    if e2e:
        out["e2e"] = e2e
    rerank = _rerank(by_mode)
    if rerank:
        out["rerank"] = rerank
    quality = _quality(by_mode)
    if quality:
        out["quality"] = quality
    return out


def _total(rec: Mapping[str, Any]) -> float:
    t = rec.get("timings", {})
    return float(t.get("total", sum(float(t.get(s, 0.0)) for s in STAGES)))


def _e2e(by_mode: dict) -> dict:
    e2e: dict[str, Any] = {}
    # A mode run without generation next to modes with it (a rerank-only ``prefix`` run) is not an
    # end-to-end measurement; when nothing was generated, e2e compares retrieve + rerank only.
    any_generated = any(r.get("generated", True) for recs in by_mode.values() for r in recs)
    for key in E2E_KEYS:
        recs = by_mode.get(key, [])
        if not recs or (any_generated and not all(r.get("generated", True) for r in recs)):
            continue
        totals = [_total(r) for r in recs]
        lat = latency_summary(totals)
        e2e[key] = {
            "queries": len(recs),
            "queries_per_s": len(recs) / sum(totals) if sum(totals) > 0 else 0.0,
            **lat,
            "stage_ms": {s: _mean([float(r.get("timings", {}).get(s, 0.0)) for r in recs]) * 1e3 for s in STAGES},
        }
    if "baseline" in e2e and "reuse" in e2e:
        e2e["speedup_vs_baseline"] = _ratio(e2e["reuse"]["queries_per_s"], e2e["baseline"]["queries_per_s"])
    if "retrieval_only" in e2e and "reuse" in e2e:
        e2e["reuse_overhead_vs_retrieval_ms"] = e2e["reuse"]["mean_ms"] - e2e["retrieval_only"]["mean_ms"]
    if "reader_full" in e2e and "reader_kv" in e2e:  # the same reader: the ratio is KV reuse's alone
        e2e["reader_speedup"] = _ratio(e2e["reader_kv"]["queries_per_s"], e2e["reader_full"]["queries_per_s"])
    return e2e


def _rerank_s(rec: Mapping[str, Any]) -> float:
    """A record's reranker time: reading document KV (reuse) plus model time."""
    return float(rec["timings"].get("kv_load", 0.0)) + float(rec["timings"].get("rerank", 0.0))


def _rerank(by_mode: dict) -> dict:
    rerank: dict[str, Any] = {}
    ratios: list[float] = []
    prompt_tokens: list[int] = []
    query_tokens: list[int] = []
    for spec in RERANKED:
        key = spec.rerank_key
        recs = [r for r in by_mode.get(spec.e2e_key, []) if r.get("pairs")]
        if not recs:
            continue
        secs = [_rerank_s(r) for r in recs]
        pairs = sum(int(r["pairs"]) for r in recs)
        rerank[key] = {"queries": len(recs), "pairs": pairs,
                       "pairs_per_s": pairs / sum(secs) if sum(secs) > 0 else 0.0,
                       **latency_summary(secs),
                       "kv_load_ms": _mean([float(r["timings"].get("kv_load", 0.0)) for r in recs]) * 1e3}
        if not ratios:
            for r in recs:
                q = int(r.get("query_tokens") or 0)
                if q and r.get("prompt_tokens"):
                    ratios += [p / q for p in r["prompt_tokens"]]
                    prompt_tokens += list(r["prompt_tokens"])
                    query_tokens += [q] * len(r["prompt_tokens"])
    if not rerank:
        return {}
    full = rerank.get("full", {}).get("pairs_per_s")
    prefix = rerank.get("prefix_cached", {}).get("pairs_per_s")
    reuse = rerank.get("reuse", {}).get("pairs_per_s")
    rerank["speedup_vs_full"] = _ratio(reuse, full)
    rerank["speedup_vs_prefix_cached"] = _ratio(reuse, prefix)
    rerank["prefix_cached_vs_full"] = _ratio(prefix, full)
    if ratios:
        # (prefix + doc + query + suffix) / (query + suffix), averaged over pairs: the speedup if
        # cost were proportional to the tokens run (reuse runs only question + suffix per pair).
        rerank["token_ratio_limit"] = _mean(ratios)
        rerank["mean_prompt_tokens"] = _mean(prompt_tokens)
        rerank["mean_query_tokens"] = _mean(query_tokens)
        # The same ratio of token totals: what a pairs/s ratio tends to if cost is linear in
        # tokens (the mean of per-pair ratios weighs short questions more and sits above it).
        rerank["token_ratio_of_totals"] = sum(prompt_tokens) / sum(query_tokens)
        if rerank["speedup_vs_full"]:
            rerank["limit_fraction"] = rerank["speedup_vs_full"] / rerank["token_ratio_limit"]
            rerank["fraction_of_totals_ratio"] = rerank["speedup_vs_full"] / rerank["token_ratio_of_totals"]
            interval = limit_fraction_interval(by_mode.get("baseline", []), by_mode.get("reuse", []))
            if interval:
                rerank["limit_fraction_ci95"] = interval
    return rerank


def limit_fraction_interval(full: Sequence[Mapping[str, Any]], reuse: Sequence[Mapping[str, Any]],
                            draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> list[float] | None:
    """A 95% bootstrap interval of ``limit_fraction`` over the questions of one run: how far the
    figure could move with other questions and this machine's timing noise (per question, each
    mode's time and the token ratios are resampled together). None under 5 paired questions."""
    def per_question(recs):
        return {r["query_id"]: r for r in recs if r.get("pairs") and r.get("query_tokens") and r.get("prompt_tokens")}

    f, u = per_question(full), per_question(reuse)
    rows = []
    for qid in [q for q in f if q in u]:  # in record order: the interval is the same in every process
        secs = [_rerank_s(f[qid]), _rerank_s(u[qid])]
        ratios = [p / int(u[qid]["query_tokens"]) for p in u[qid]["prompt_tokens"]]
        rows.append((int(f[qid]["pairs"]), secs[0], int(u[qid]["pairs"]), secs[1], sum(ratios), len(ratios)))
    if len(rows) < 5:
        return None
    rng = random.Random(seed)
    fractions = []
    for _ in range(draws):
        sample = [rows[rng.randrange(len(rows))] for _ in rows]
        full_pps = sum(r[0] for r in sample) / sum(r[1] for r in sample)
        reuse_pps = sum(r[2] for r in sample) / sum(r[3] for r in sample)
        limit = sum(r[4] for r in sample) / sum(r[5] for r in sample)
        fractions.append(reuse_pps / full_pps / limit)
    fractions.sort()
    return [fractions[int(0.025 * draws)], fractions[int(0.975 * draws) - 1]]


def _quality(by_mode: dict) -> dict:
    quality: dict[str, Any] = {}
    for key in E2E_KEYS:
        recs = [r for r in by_mode.get(key, []) if r.get("gold_ids")]
        if not recs:
            continue
        rows = [ranking_metrics(list(r.get("ranked_ids", [])), r["gold_ids"]) for r in recs]
        row = {"queries": len(recs), **{m: _mean([x[m] for x in rows]) for m in rows[0]}}
        answered = [r for r in recs if r.get("generated", True) and r.get("answers")]
        if answered:
            row["em"] = _mean([answer_scores(r)[0] for r in answered])
            row["f1"] = _mean([answer_scores(r)[1] for r in answered])
            if any("found" in r for r in answered):
                row["declined"] = _mean([float(not r.get("found", True)) for r in answered])
        quality[key] = row  # a rerank-only mode (no answers) gets ranking metrics only
    if not quality and any(by_mode.values()):
        quality["note"] = "no gold queries: ranking and answer quality not measured"
    quality.update(agreement(by_mode.get("baseline", []), by_mode.get("reuse", [])))
    reader = agreement(by_mode.get("reader_full", []), by_mode.get("reader_kv", []))
    if reader:
        quality["reader_kv_vs_full"] = reader
    gain = paired_gain(by_mode.get("reader_kv", []), by_mode.get("retrieval_reader", []))
    if gain:
        quality["reader_kv_minus_retrieval_reader"] = gain
    return quality


def answer_scores(rec: Mapping[str, Any]) -> tuple[float, float]:
    """(EM, F1) of a record's answer: the reader's own where there is one (also when it declined)."""
    answer = rec.get("reader_answer", rec.get("answer", ""))
    return exact_match(answer, rec["answers"]), f1_score(answer, rec["answers"])


def paired_gain(records: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]]) -> dict:
    """EM and F1 of ``records`` minus ``reference`` on the gold questions both answered (paired by
    ``query_id``), with 95% bootstrap intervals; ``{}`` when none is shared."""
    ref = {r["query_id"]: r for r in reference if r.get("answers") and r.get("generated", True)}
    pairs = [(r, ref[r["query_id"]]) for r in records
             if r.get("answers") and r.get("generated", True) and r.get("query_id") in ref]
    if not pairs:
        return {}
    out: dict[str, Any] = {"queries": len(pairs)}
    for i, key in enumerate(("em", "f1")):
        diffs = [answer_scores(a)[i] - answer_scores(b)[i] for a, b in pairs]
        out[key], out[key + "_ci95"] = _mean(diffs), mean_interval(diffs)
    return out


def finite_numbers(obj: Any, path: str = "") -> list[tuple[str, float]]:
    """Every number in a nested dict/list with its path (for checks and the tests)."""
    found: list[tuple[str, float]] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            found += finite_numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found += finite_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        found.append((path, obj))
    return found


# -- numbers as text (the bench's table and the HTML report share these; no plotly here) --------

def get_path(d: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, Mapping) or k not in d or d[k] is None:
            return default
        d = d[k]
    return d


def as_number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def fmt_number(x: Any, digits: int = 3) -> str:
    v = as_number(x)
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def fmt_interval(ci) -> str:
    """`` (95% CI lo-hi%)`` for a bootstrap interval of a fraction; nothing without one."""
    return f" (95% CI {ci[0]:.1%}-{ci[1]:.1%})".replace("%-", "-") if ci else ""


def ratio_rows(results: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(what, value, target) rows: the headline ratios (also printed by the bench)."""
    rerank, e2e, quality = (get_path(results, k, default={}) for k in ("rerank", "e2e", "quality"))
    layout = get_path(results, "layout", default={})
    rows = [
        ("reranker pairs/s: full / prefix cached / reuse",
         " / ".join(fmt_number(get_path(rerank, m, "pairs_per_s")) for m in ("full", "prefix_cached", "reuse")), ""),
        ("reuse vs full (pairs/s)", fmt_ratio(get_path(rerank, "speedup_vs_full")), ">= 5x"),
        ("reuse vs prefix cached (pairs/s)", fmt_ratio(get_path(rerank, "speedup_vs_prefix_cached")), ">= 3x"),
        ("reuse vs query-first prompt, [instruction][question] cached (vLLM-style)",
         fmt_ratio(get_path(rerank, "speedup_vs_query_first_cached")), ">= 5x"),
        ("token-ratio limit (prefix+doc+query+suffix)/(query+suffix)", fmt_ratio(get_path(rerank, "token_ratio_limit")), ""),
        ("fraction of the limit reached", fmt_share(get_path(rerank, "limit_fraction"), 1) + fmt_interval(get_path(rerank, "limit_fraction_ci95")),
         ">= 90%"),
        ("same against the ratio of token totals (sum prompt / sum query)",
         f"{fmt_share(get_path(rerank, 'fraction_of_totals_ratio'), 1)} of {fmt_ratio(get_path(rerank, 'token_ratio_of_totals'))}", ""),
        ("e2e queries/s: retrieval only / baseline / reuse",
         " / ".join(fmt_number(get_path(e2e, m, "queries_per_s")) for m in ("retrieval_only", "baseline", "reuse")), ""),
        ("e2e reuse vs baseline (queries/s)", fmt_ratio(get_path(e2e, "speedup_vs_baseline")), ">= 3x"),
        ("reuse vs full: identical rankings", fmt_share(get_path(quality, "ranking_agreement")), "100% (fp32)"),
        ("reuse vs full: max |score diff|", fmt_number(get_path(quality, "max_abs_score_diff")), "<= 1e-4 (fp32)"),
        ("reuse vs baseline: identical answers", fmt_share(get_path(quality, "answer_agreement")), ""),
        ("e2e queries/s: reader full prefill / reader from stored KV",
         " / ".join(fmt_number(get_path(e2e, m, "queries_per_s")) for m in ("reader_full", "reader_kv")), ""),
        ("reader from stored KV vs full prefill (queries/s)", fmt_ratio(get_path(e2e, "reader_speedup")), ">= 6x"),
        ("reader from stored KV vs full prefill: identical answers",
         fmt_share(get_path(quality, "reader_kv_vs_full", "answer_agreement")), "100% (fp32)"),
        ("answer F1, the reader: over the retriever's order / over the reranked (from stored KV)",
         " / ".join(fmt_number(get_path(quality, m, "f1")) for m in ("retrieval_reader", "reader_kv")), ""),
        ("reranking's own F1 gain (same reader, paired)",
         fmt_gain(get_path(quality, "reader_kv_minus_retrieval_reader")), ""),
        ("answer F1, untrained generator (reference): retrieval only / reuse",
         " / ".join(fmt_number(get_path(quality, m, "f1")) for m in ("retrieval_only", "reuse")), ""),
    ]
    serve = get_path(results, "serve", default={})
    if serve:
        rows.append((f"{serve['clients']} concurrent clients vs one ({serve['mode']}, queries/s; p95 ms)",
                     f"{fmt_number(serve['queries_per_s'])} vs {fmt_number(serve['sequential_queries_per_s'])} "
                     f"({fmt_ratio(serve['speedup'])}; p95 {fmt_number(serve['p95_ms'])} vs "
                     f"{fmt_number(serve['sequential_p95_ms'])})", ">= 1.5x"))
        rows.append(("concurrent vs one at a time: identical answers", fmt_share(serve["identical_answers"]), "100%"))
    if layout:
        rows.append(("static layout vs concatenation (ms per query to fill the batch)",
                     f"{fmt_number(get_path(layout, 'static_ms'))} vs {fmt_number(get_path(layout, 'concat_ms'))} ms "
                     f"({fmt_ratio(get_path(layout, 'ratio'))})", ""))
    return rows


def fmt_gain(gain: Mapping[str, Any] | None) -> str:
    """``+0.150 (95% CI +0.100 to +0.200)`` for a paired F1 difference; a dash without one."""
    if not gain or as_number(gain.get("f1")) is None:
        return "–"
    lo, hi = gain.get("f1_ci95") or (gain["f1"], gain["f1"])
    return f"{gain['f1']:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}, {gain['queries']} questions)"


def fmt_ratio(v: Any) -> str:
    n = as_number(v)
    return "–" if n is None else f"{n:.2f}x"


def fmt_share(v: Any, decimals: int = 0) -> str:
    """A share as a percentage; compared with a target, a decimal keeps 89.5% from reading 90%."""
    n = as_number(v)
    return "–" if n is None else f"{n:.{decimals}%}"


# -- the app's gold batches: the summary with its store's storage part, rows, exports ---------------
BATCH_COLUMNS = ["query", "mode", "question", "answer", "EM", "F1", "confidence", "gold rank", "total ms"]


def batch_summary(records: list[dict], estimate: dict, store: Mapping[str, Any], precompute: Any = None) -> dict:
    """The bench's result dict for a batch's records so far, with the storage part of its store
    (``estimate``: the workbench's storage estimate; ``store``: the store's ``describe()``;
    ``precompute``: the corpus's precompute report, if it ran)."""
    result = summarize(records)
    chosen = next(r for r in estimate["codecs"] if r["codec"] == estimate["codec"])
    result["storage"] = {"codec": estimate["codec"], "docs": estimate["docs"], "tokens": estimate["tokens"],
                         "bytes": chosen["bytes"], "bytes_per_token": chosen["bytes_per_token"],
                         "load_gb_per_s": store.get("load_gb_per_s", 0.0), "store": store.get("url"),
                         "cpu_tier_gb": store.get("cpu_tier_gb", 0.0)}
    result["codecs"] = estimate["codecs"]
    planner = [{"label": f"estimate ({estimate['codec']})", "bytes": chosen["bytes"]}]
    if precompute is not None and precompute.encoded and not precompute.skipped:
        result["storage"]["precompute_docs_per_s"] = precompute.docs_per_s
        planner.append({"label": "written by precompute", "bytes": precompute.bytes})
    result["planner"] = planner
    return result


def batch_row(record: Mapping[str, Any]) -> list:
    """One record as a row of :data:`BATCH_COLUMNS` (EM/F1 of the reader's own answer, also where
    it declined, as the quality part scores it; the reader's confidence where calibrated)."""
    answers = record.get("answers") or []
    gold = set(record.get("gold_ids") or [])
    rank = next((i for i, d in enumerate(record["ranked_ids"], 1) if d in gold), None)
    em, f1 = answer_scores(record) if answers else (None, None)
    confidence = record.get("confidence")
    return [record["query_id"], record["mode"], record["question"], record["answer"], em,
            round(f1, 3) if f1 is not None else None, f"{confidence:.0%}" if confidence is not None else "",
            rank, round(record["timings"].get("total", 0.0) * 1e3, 1)]


def write_batch_exports(folder: Path, result: dict, records: list[dict]) -> list[str]:
    """The batch as JSON (summary + every record) and CSV (one row per query and mode)."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / "hyperrag-batch.json", folder / "hyperrag-batch.csv"
    json_path.write_text(json.dumps({**result, "records": records}, indent=1, default=str), encoding="utf-8")
    buf = io.StringIO()
    writer = csv.writer(buf)
    stages = list(STAGES) + ["total"]
    writer.writerow([*BATCH_COLUMNS[:-1], *[f"{s}_ms" for s in stages], "ranked_ids", "gold_ids", "gold_answers"])
    for rec in records:
        row = batch_row(rec)[:-1]
        writer.writerow([*row, *[round(rec["timings"].get(s, 0.0) * 1e3, 2) for s in stages],
                         " ".join(rec["ranked_ids"]), " ".join(rec.get("gold_ids") or []),
                         " | ".join(rec.get("answers") or [])])
    csv_path.write_text(buf.getvalue(), encoding="utf-8")
    return [str(json_path), str(csv_path)]
