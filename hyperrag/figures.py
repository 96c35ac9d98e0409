"""Plotly figures of a bench result dict, shared by ``python -m hyperrag.bench`` and the app.

Every function takes the result dict (schema in :mod:`hyperrag.report`), tolerates missing
parts (an empty figure saying what is missing), and returns a ``plotly.graph_objects.Figure``.
:func:`html_report` renders everything into one self-contained HTML page (plotly.js inline,
no CDN: there is no network at run time).

Engine modules never import this one (plotly stays out of the engine).
"""
from __future__ import annotations

import html
import json
import math
from typing import Any, Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from hyperrag.rag.modes import BENCH_ONLY_RERANK, BY_E2E_KEY, E2E_KEYS, MODE_TABLE, MODES, RERANK_KEYS
from hyperrag.report import (QUALITY_KEYS, STAGES, as_number, fmt_number, fmt_share, get_path,
                             ratio_rows)

STAGE_COLORS = {"retrieve": "#9aa5b1", "kv_load": "#f2b134", "rerank": "#d64545", "generate": "#3d7ea6"}
# Label and color of each e2e/quality row (``e2e_key``) and of each reranker row (``rerank_key``).
E2E_STYLE = {m.e2e_key: (m.label, m.color) for m in MODE_TABLE}
RERANK_STYLE = {**{m.rerank_key: (m.label, m.color) for m in MODE_TABLE if m.rerank_key}, **BENCH_ONLY_RERANK}
TEMPLATE = "plotly_white"


def _empty(title: str, why: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=why, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 14, "color": "#666"})
    fig.update_layout(title=title, template=TEMPLATE, xaxis={"visible": False}, yaxis={"visible": False},
                      height=360)
    return fig


def _title(main: str, detail: str) -> str:
    """A title with its detail on a smaller second line: one long line is cut in narrow panels."""
    return f"{main}<br><sup>{html.escape(detail)}</sup>"


def _mib(n: Any) -> str:
    v = as_number(n)
    return "–" if v is None else f"{v / 2**20:,.1f} MiB"


# -- figures ------------------------------------------------------------------------------------

def latency_figure(results: Mapping[str, Any]) -> go.Figure:
    """Stacked mean latency per stage (retrieve, KV load, rerank, generate) for each e2e mode."""
    title = "End-to-end latency per stage (mean ms per query)"
    e2e = get_path(results, "e2e", default={})
    modes = [m for m in E2E_KEYS if isinstance(get_path(e2e, m), Mapping)]
    if not modes:
        return _empty(title, "no end-to-end measurements")
    names = [E2E_STYLE[m][0] for m in modes]
    fig = go.Figure()
    for stage in STAGES:
        values = [as_number(get_path(e2e, m, "stage_ms", stage)) or 0.0 for m in modes]
        fig.add_bar(name=stage.replace("_", " "), x=names, y=values, marker_color=STAGE_COLORS[stage],
                    hovertemplate="%{x}<br>" + stage + ": %{y:.1f} ms<extra></extra>")
    totals = [sum(as_number(get_path(e2e, m, "stage_ms", s)) or 0.0 for s in STAGES) for m in modes]
    p50 = [as_number(get_path(e2e, m, "p50_ms")) for m in modes]
    fig.add_scatter(x=names, y=totals, mode="text", showlegend=False, textposition="top center",
                    text=[f"{t:,.0f} ms" + (f"<br>(p50 {p:,.0f})" if p else "") for t, p in zip(totals, p50)],
                    hoverinfo="skip")
    speedup = as_number(get_path(e2e, "speedup_vs_baseline"))
    if speedup:
        title = _title(title, f"reuse {speedup:.1f}x faster than baseline")
    fig.update_layout(barmode="stack", title=title, yaxis_title="ms per query", template=TEMPLATE,
                      legend_title="stage", height=420, yaxis_range=[0, max(totals) * 1.18 or 1])
    return fig


def throughput_figure(results: Mapping[str, Any]) -> go.Figure:
    """Queries/s per end-to-end mode and reranker pairs/s per rerank mode, side by side."""
    e2e = get_path(results, "e2e", default={})
    rerank = get_path(results, "rerank", default={})
    e_modes = [m for m in E2E_KEYS if as_number(get_path(e2e, m, "queries_per_s")) is not None]
    r_modes = [m for m in RERANK_KEYS if as_number(get_path(rerank, m, "pairs_per_s")) is not None]
    if not e_modes and not r_modes:
        return _empty("Throughput", "no throughput measurements")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("End to end: queries/s", "Reranker: pairs/s"))
    if e_modes:
        _rate_bars(fig, e2e, e_modes, "queries_per_s", "baseline", "queries/s", 1, E2E_STYLE, textposition="outside")
    if r_modes:
        _rate_bars(fig, rerank, r_modes, "pairs_per_s", "full", "pairs/s", 2, RERANK_STYLE, textposition="auto",
                   insidetextanchor="middle")
        full = as_number(get_path(rerank, "full", "pairs_per_s"))
        limit = as_number(get_path(rerank, "token_ratio_limit"))
        if limit and full and "reuse" in r_modes:
            # the token-ratio limit drawn as a tick over the reuse bar
            fig.add_scatter(x=[RERANK_STYLE["reuse"][0]], y=[full * limit], mode="markers",
                            marker={"symbol": "line-ew-open", "size": 60, "color": "#333", "line": {"width": 3}},
                            name=f"token-ratio limit: {limit:.1f}x full", row=1, col=2,
                            hovertemplate=f"token-ratio limit {limit:.1f}x full = %{{y:.3g}} pairs/s<extra></extra>")
    for col, values in ((1, [as_number(get_path(e2e, m, "queries_per_s")) for m in e_modes]),
                        (2, [as_number(get_path(rerank, m, "pairs_per_s")) for m in r_modes]
                         + [(as_number(get_path(rerank, "full", "pairs_per_s")) or 0) * (as_number(get_path(rerank, "token_ratio_limit")) or 0)])):
        top = max([v for v in values if v] or [1.0])
        fig.update_yaxes(range=[0, top * 1.2], row=1, col=col)
    fig.update_layout(title="Throughput (higher is better)", template=TEMPLATE, height=420,
                      legend={"orientation": "h", "y": -0.15})
    return fig


def _rate_bars(fig: go.Figure, block: Any, modes: Sequence[str], key: str, reference: str, unit: str, col: int,
               style: Mapping[str, tuple[str, str]], **bar: Any) -> None:
    """One bar per mode of ``block[mode][key]`` (``style``: its label and color), labelled with
    its ratio to the ``reference`` mode."""
    values = [as_number(get_path(block, m, key)) for m in modes]
    ref = as_number(get_path(block, reference, key))
    fig.add_bar(x=[style[m][0] for m in modes], y=values, marker_color=[style[m][1] for m in modes],
                text=[f"{v:.3g}" + (f" ({v / ref:.1f}x)" if ref and m != reference else "") for v, m in zip(values, modes)],
                showlegend=False, row=1, col=col, hovertemplate=f"%{{x}}: %{{y:.3g}} {unit}<extra></extra>", **bar)


def quality_figure(results: Mapping[str, Any]) -> go.Figure:
    """Recall@1/5, MRR@10, NDCG@10, EM and F1 per mode (grouped bars)."""
    title = "Quality per mode"
    quality = get_path(results, "quality", default={})
    modes = [m for m in E2E_KEYS if isinstance(get_path(quality, m), Mapping)]
    if not modes:
        return _empty(title, get_path(quality, "note", default="no quality measurements (no gold queries)"))
    fig = go.Figure()
    for m in modes:
        values = [as_number(get_path(quality, m, k)) for k in QUALITY_KEYS]
        label, color = E2E_STYLE[m]
        fig.add_bar(name=label, x=list(QUALITY_KEYS), y=values, marker_color=color,
                    text=[fmt_number(v, 2) for v in values], textposition="outside",
                    hovertemplate=label + " %{x}: %{y:.3f}<extra></extra>")
    agreement = as_number(get_path(quality, "ranking_agreement"))
    diff = as_number(get_path(quality, "max_abs_score_diff"))
    if agreement is not None:
        title = _title(title, f"reuse vs baseline: identical rankings {agreement:.0%}"
                       + (f", max |score diff| {diff:.2g}" if diff is not None else ""))
    fig.update_layout(barmode="group", title=title, yaxis_range=[0, 1.1], template=TEMPLATE, height=420,
                      legend={"orientation": "h", "y": -0.15})
    return fig


def _codec_rows(results: Mapping[str, Any]) -> list[dict]:
    rows = [r for r in (get_path(results, "codecs", default=[]) or []) if isinstance(r, Mapping) and r.get("codec")]
    if rows:
        return [dict(r) for r in rows]
    storage = get_path(results, "storage", default={})
    if storage.get("codec") and as_number(storage.get("bytes_per_token")):
        return [{"codec": storage["codec"], "bytes_per_token": storage["bytes_per_token"],
                 "bytes": storage.get("bytes")}]
    return []


def storage_figure(results: Mapping[str, Any]) -> go.Figure:
    """Bytes per token per codec, total corpus bytes per codec, and planner line(s) if given."""
    rows = _codec_rows(results)
    if not rows:
        return _empty("Storage", "no storage measurements")
    names = [r["codec"] for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("bytes per token", "corpus total (MiB)"))
    bpt = [as_number(r.get("bytes_per_token")) for r in rows]
    fig.add_bar(x=names, y=bpt, marker_color="#3d7ea6", text=[fmt_number(v) for v in bpt], textposition="outside",
                showlegend=False, row=1, col=1, hovertemplate="%{x}: %{y:,.0f} B/token<extra></extra>")
    totals = [(as_number(r.get("bytes")) or 0) / 2**20 for r in rows]
    fig.add_bar(x=names, y=totals, marker_color="#6c5fc7", text=[f"{t:,.1f}" for t in totals],
                textposition="outside", showlegend=False, row=1, col=2,
                hovertemplate="%{x}: %{y:,.1f} MiB<extra></extra>")
    planner = get_path(results, "planner")
    plans = planner if isinstance(planner, list) else [planner] if isinstance(planner, Mapping) else []
    top = max(totals + [0.0])
    for plan in plans:
        value = as_number(get_path(plan, "bytes"))
        if value is None:
            continue
        top = max(top, value / 2**20)
        line = {"dash": "dot", "color": "#d64545", "width": 2}
        fig.add_hline(y=value / 2**20, line=line, row=1, col=2)
        fig.add_scatter(x=[None], y=[None], mode="lines", line=line, row=1, col=2,
                        name=f"{plan.get('label', 'planner')}: {value / 2**20:,.1f} MiB")
    fig.update_yaxes(range=[0, max([v for v in bpt if v] + [1.0]) * 1.2], row=1, col=1)
    fig.update_yaxes(range=[0, (top or 1.0) * 1.2], row=1, col=2)
    storage = get_path(results, "storage", default={})
    title = "Storage per codec"
    if storage.get("docs"):
        title = _title(title, f"{storage['docs']} docs, {fmt_number(storage.get('tokens'))} tokens")
    fig.update_layout(title=title, template=TEMPLATE, height=420, legend={"orientation": "h", "y": -0.15})
    return fig


def _frontier_points(results: Mapping[str, Any]) -> list[dict]:
    points = [dict(p) for p in (get_path(results, "frontier", default=[]) or []) if isinstance(p, Mapping)]
    if points:
        return points
    e2e, quality = get_path(results, "e2e", default={}), get_path(results, "quality", default={})
    for m in E2E_KEYS:  # derive the e2e points when no explicit frontier was measured
        if as_number(get_path(e2e, m, "queries_per_s")) and isinstance(get_path(quality, m), Mapping):
            points.append({"label": E2E_STYLE[m][0], "queries_per_s": get_path(e2e, m, "queries_per_s"),
                           "ndcg@10": get_path(quality, m, "ndcg@10"), "f1": get_path(quality, m, "f1")})
    return points


def frontier_figure(results: Mapping[str, Any]) -> go.Figure:
    """Quality (NDCG@10) against throughput for every measured configuration: end-to-end points
    (queries/s) on the left, reranker-only points (pairs/s) on the right."""
    title = "Quality vs throughput (up and right is better)"
    points = [p for p in _frontier_points(results) if as_number(p.get("ndcg@10")) is not None]
    e2e = [p for p in points if as_number(p.get("queries_per_s"))]
    rr = [p for p in points if not as_number(p.get("queries_per_s")) and as_number(p.get("pairs_per_s"))]
    if not e2e and not rr:
        return _empty(title, "no frontier points (need quality and throughput)")
    panels = [(pts, key, unit) for pts, key, unit in ((e2e, "queries_per_s", "queries/s"), (rr, "pairs_per_s", "pairs/s"))
              if pts]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[f"NDCG@10 vs {u}" for _, _, u in panels])
    for col, (pts, key, unit) in enumerate(panels, 1):
        xs = [float(p[key]) for p in pts]
        for p in pts:  # one trace per configuration: the legend names them, labels never overlap
            hover = (f"{p.get('label')}<br>{fmt_number(p.get(key))} {unit}<br>NDCG@10 {fmt_number(p.get('ndcg@10'))}"
                     + (f"<br>F1 {fmt_number(p.get('f1'))}" if as_number(p.get("f1")) is not None else ""))
            fig.add_scatter(x=[p[key]], y=[p["ndcg@10"]], mode="markers", name=str(p.get("label", "")),
                            marker={"size": 13, "color": _point_color(p), "symbol": _point_symbol(p),
                                    "line": {"width": 1, "color": "#333"}},
                            hovertext=[hover], hoverinfo="text", row=1, col=col)
        lo, hi = math.log10(min(xs)), math.log10(max(xs))
        pad = max((hi - lo) * 0.15, 0.15)
        fig.update_xaxes(title_text=unit, type="log", range=[lo - pad, hi + pad], row=1, col=col)
        fig.update_yaxes(title_text="NDCG@10", range=[0, 1.02], row=1, col=col)
    fig.update_layout(title=title, template=TEMPLATE, height=440)
    return fig


def _point_symbol(point: Mapping[str, Any]) -> str:
    label = str(point.get("label", "")).lower()
    for key, symbol in (("int2", "x"), ("int4", "diamond"), ("int8", "square"), ("fp16", "circle"), ("bf16", "triangle-up"),
                        ("fp32", "star")):
        if key in label:
            return symbol
    return "circle"


def _point_color(point: Mapping[str, Any]) -> str:
    label = str(point.get("label", "")).lower()
    for key, color in (("retrieval", MODES["retrieval"].color), ("prefix", MODES["prefix"].color),
                       ("reuse", MODES["reuse"].color), ("baseline", MODES["baseline"].color),
                       ("full", MODES["baseline"].color)):
        if key in label:
            return color
    return "#6c5fc7"


def serve_figure(results: Mapping[str, Any]) -> go.Figure:
    """Concurrent clients through the request batcher against one client: queries/s and latency."""
    serve = get_path(results, "serve", default={})
    if not isinstance(serve, Mapping) or not serve:
        return _empty("Concurrent clients", "not measured (bench --serve --clients N)")
    runs = ("one client", f"{serve['clients']} clients")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("queries/s", "latency per query (ms)"))
    rates = [serve["sequential_queries_per_s"], serve["queries_per_s"]]
    fig.add_bar(x=list(runs), y=rates, marker_color=["#9aa5b1", MODES["reader_kv"].color], showlegend=False,
                text=[f"{rates[0]:.3g}", f"{rates[1]:.3g} ({serve['speedup']:.2f}x)"], textposition="outside",
                row=1, col=1, hovertemplate="%{x}: %{y:.3g} queries/s<extra></extra>")
    for stat, color in (("p50", "#3d7ea6"), ("p95", "#d64545")):
        values = [serve[f"sequential_{stat}_ms"], serve[f"{stat}_ms"]]
        fig.add_bar(x=list(runs), y=values, name=stat, marker_color=color, row=1, col=2,
                    hovertemplate="%{x}: " + stat + " %{y:,.0f} ms<extra></extra>")
    fig.update_yaxes(range=[0, max(rates) * 1.25], row=1, col=1)
    detail = (f"{serve['mode']}, {serve['queries']} questions, mean group {serve['mean_group']:.1f} requests, "
              f"identical answers {serve['identical_answers']:.0%}")
    fig.update_layout(title=_title("Concurrent clients, batched (higher queries/s is better)", detail),
                      template=TEMPLATE, height=420, barmode="group", legend={"orientation": "h", "y": -0.15})
    return fig


FIGURES = (("Latency", latency_figure), ("Throughput", throughput_figure), ("Quality", quality_figure),
           ("Storage", storage_figure), ("Frontier", frontier_figure), ("Concurrent clients", serve_figure))


# -- tables and the HTML report -----------------------------------------------------------------

def _table(head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return ("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + f"</tr></thead><tbody>{cells}</tbody></table>")


def _mode_table(results: Mapping[str, Any]) -> str:
    e2e, quality, rerank = (get_path(results, k, default={}) for k in ("e2e", "quality", "rerank"))
    rows = []
    for m in E2E_KEYS:
        if not isinstance(get_path(e2e, m), Mapping) and not isinstance(get_path(quality, m), Mapping):
            continue
        rm = BY_E2E_KEY[m].rerank_key
        rows.append([E2E_STYLE[m][0], fmt_number(get_path(e2e, m, "queries_per_s")), fmt_number(get_path(e2e, m, "p50_ms")),
                     fmt_number(get_path(e2e, m, "p95_ms")), fmt_number(get_path(rerank, rm, "pairs_per_s")) if rm else "–"]
                    + [fmt_number(get_path(quality, m, k)) for k in QUALITY_KEYS])
    return _table(["mode", "queries/s", "p50 ms", "p95 ms", "rerank pairs/s", *QUALITY_KEYS], rows)


def _codec_table(results: Mapping[str, Any]) -> str:
    rows = get_path(results, "codecs", default=[]) or []
    if not rows:
        return ""
    return "<h2>Codec sweep</h2>" + _table(
        ["codec", "bytes/token", "of fp16", "corpus bytes", "max / mean |score diff| vs fp32 full", "identical rankings",
         "same top-n", "NDCG@10", "pairs/s", "decode share", "encode ms/doc"],
        [[r.get("spec") or r.get("codec"), fmt_number(r.get("bytes_per_token")), fmt_number(r.get("fraction_of_fp16")), _mib(r.get("bytes")),
          f"{fmt_number(r.get('max_abs_score_diff'))} / {fmt_number(r.get('mean_abs_score_diff'))}",
          fmt_share(r.get("ranking_agreement")), fmt_share(r.get("top_n_agreement")), fmt_number(r.get("ndcg@10")),
          fmt_number(r.get("pairs_per_s")), fmt_share(r.get("decode_share")), fmt_number(r.get("encode_ms_per_doc"))]
         for r in rows])


def _kv_table(title: str, block: Any) -> str:
    if not isinstance(block, Mapping) or not block:
        return ""
    rows = [[k, json.dumps(v) if isinstance(v, (list, dict)) else fmt_number(v, 4) if as_number(v) is not None else v]
            for k, v in block.items()]
    return f"<h2>{html.escape(title)}</h2>" + _table(["key", "value"], rows)


def html_report(results: Mapping[str, Any], title: str = "HyperRAG benchmark") -> str:
    """One self-contained HTML page: the ratios table, per-mode table, every figure (plotly.js
    inline, no external script), codec sweep, storage, layout, config and machine."""
    from plotly.offline import get_plotlyjs

    figs = []
    for name, fn in FIGURES:
        if fn is serve_figure and not get_path(results, "serve"):
            continue  # measured only on request (--serve)
        fig = fn(results)
        figs.append(f'<section><h2>{html.escape(name)}</h2>'
                    + fig.to_html(full_html=False, include_plotlyjs=False, default_height="440px",
                                  config={"displaylogo": False, "responsive": True})
                    + "</section>")
    ratios = _table(["measure", "value", "target"], [list(r) for r in ratio_rows(results)])
    config = get_path(results, "config", default={})
    subtitle = ", ".join(f"{k} {config[k]}" for k in ("corpus", "queries", "top_k", "top_n", "codec", "model")
                         if k in config)
    style = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ddd;padding:4px 10px;"
             "text-align:left;font-size:14px}th{background:#f4f4f4}h2{margin-top:1.5em}")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{style}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p>"
            f"<h2>Ratios</h2>{ratios}<h2>Per mode</h2>{_mode_table(results)}"
            + "".join(figs) + _codec_table(results)
            + _kv_table("Storage", get_path(results, "storage")) + _kv_table("Static layout vs concatenation",
                                                                          get_path(results, "layout"))
            + _kv_table("Setup (excluded from query timings)", get_path(results, "setup"))
            + _kv_table("Config", config) + _kv_table("Machine", get_path(results, "machine"))
            + "</body></html>")
