"""The HyperRAG workbench's UI: a Gradio Blocks app over the engine (``app.py`` launches it).

All work is operations of the gradio-free :class:`~hyperrag.workbench.operations.Workbench` (one
runtime, a registry of corpora, settings: ask, prepare, run a gold batch); this module turns
their results into components (rendering), wires callbacks and lays out the page. The
callbacks (:class:`Callbacks`, one per app, holding its workbench) take and return plain
component values, so tests call them directly; the workbench's and the uploads' errors reach
the user as messages (:func:`shows_errors`).
"""
from __future__ import annotations

import functools
import html
import inspect
import logging
import random
import secrets
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import gradio as gr
import pandas as pd

from hyperrag import figures, report
from hyperrag.common.settings import SHIPPED, SHIPPED_ADAPTERS, Settings
from hyperrag.data.corpus import Query
from hyperrag.kv.codec import CODECS
from hyperrag.kv.planner import format_bytes, format_duration
from hyperrag.kv.urls import redact_url
from hyperrag.model.loading import MODELS
from hyperrag.rag.calibration import NOT_FOUND
from hyperrag.rag.metrics import agreement, exact_match, f1_score
from hyperrag.rag.modes import ENGINE_MODES, MODE_TABLE, MODES as MODE_SPECS
from hyperrag.rag.pipeline import QuestionError, RAGResult, clean_question
from hyperrag.workbench.operations import (DEFAULT_KEY, MAX_BATCH_QUERIES, MAX_BATCH_SIZE, MAX_TOP_K, MAX_TOP_N,
                                           SWITCH_STAGES, BatchStep, CorpusEntry, UserError as WorkbenchError,
                                           Workbench)
from hyperrag.workbench.uploads import UPLOAD_DOC_SUFFIXES, UPLOAD_KINDS, UploadError, prune_folders

log = logging.getLogger("hyperrag.ui")
ASSETS = SHIPPED / "ui"  # logo and style sheet: package data, so an installed app has them too
SHIPPED, UPLOAD = "Shipped corpus", "Upload my own"
# The Ask tab's columns: the same trained reader over the retriever's order, over full-prefill
# reranking and over KV-reuse reranking (HyperRAG), so what reranking adds and what KV reuse saves
# are both in view. The traditional (untrained) generator is one click away as a reference.
COMPARE_MODES = ("retrieval_reader", "reader_full", "reader_kv")
# A model without an adapter has no reader: the columns are then the generator's, over the same three rankings.
GENERATOR_COMPARE_MODES = ("retrieval", "baseline", "reuse")
REFERENCE_MODES = ("retrieval", "reuse")  # the generator over the retriever's / the reranked top-n
MODE_TITLES = {m.name: m.title for m in MODE_TABLE}
ASK_BUTTON = "Ask: the reader over three rankings"  # scripts/drive_app.py presses it by this label
SWITCH_BUTTON = "Load model (replaces the live one once loaded)"
MAX_GOLD_CHOICES = 400


def UserError(message: str) -> gr.Error:  # noqa: N802 (reads like the exception it makes)
    """A message for the user (bad input, busy, ...): shown in the UI, no traceback in the log."""
    return gr.Error(message, print_exception=False)


def shows_errors(fn: Callable) -> Callable:
    """The workbench's and the uploads' errors reach the user as messages (gradio shows only its
    own error type's text); generator callbacks keep streaming."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any):
            try:
                yield from fn(*args, **kwargs)
            except (WorkbenchError, UploadError) as err:
                raise UserError(str(err)) from None
        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except (WorkbenchError, UploadError) as err:
            raise UserError(str(err)) from None
    return call


def seconds_text(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


# --------------------------------------------------------------------------------------------
# result rendering
# --------------------------------------------------------------------------------------------
DOC_COLUMNS = ["#", "Δ", "score", "P(answers)", "document", "gold", "used"]


def rank_change(doc) -> str:
    delta = doc.retrieval_rank - doc.rank
    return f"▲{delta}" if delta > 0 else f"▼{-delta}" if delta < 0 else "="


def docs_frame(result: RAGResult, gold: Query | None = None) -> pd.DataFrame:
    gold_ids = set(gold.doc_ids) if gold else set()
    rows = [[d.rank, rank_change(d), round(d.score, 2), percent(d.relevance), d.id, "✓" if d.id in gold_ids else "",
             "✓" if d.rank <= result.top_n else ""] for d in result.docs]
    return pd.DataFrame(rows, columns=DOC_COLUMNS)


def percent(p: float | None) -> str:
    """A calibrated probability as a percentage; a dash where there is none (not calibrated)."""
    return "–" if p is None else f"{p:.0%}"


def judge(result: RAGResult, gold: Query | None) -> dict:
    """For a gold question: EM/F1 of the answer (of the reader's guess where it declined) and
    where the gold documents ended up."""
    if gold is None:
        return {}
    out: dict[str, Any] = {}
    answer = result.reading.answer if not result.found and result.reading is not None else result.answer
    if gold.answers:
        out["em"] = exact_match(answer, gold.answers)
        out["f1"] = f1_score(answer, gold.answers)
    ranks = {d.id: d for d in result.docs}
    found = [ranks[g] for g in gold.doc_ids if g in ranks]
    out["gold_rank"] = min((d.rank for d in found), default=None)
    out["gold_retrieval_rank"] = min((d.retrieval_rank for d in found), default=None)
    out["gold_in_prompt"] = bool(out["gold_rank"] and out["gold_rank"] <= result.top_n)
    return out


def answer_markdown(result: RAGResult, gold: Query | None) -> str:
    if not result.found:
        lines = [declined_markdown(result)]
    else:
        answer = result.answer.strip() or "_(empty answer)_"
        confidence = "" if result.confidence is None else f" · confidence {result.confidence:.0%}"
        lines = [f"**Answer:** {answer}{confidence}"]
        if result.reading is not None:
            lines.append(source_markdown(result))
    verdict = judge(result, gold)
    if "em" in verdict:
        ok = "✓ right" if verdict["em"] else ("≈ partly right" if verdict["f1"] >= 0.5 else "✗ wrong")
        ok = ok if result.found else f"declined; its guess: {ok}"
        lines.append(f"**{ok}** — EM {verdict['em']:.0f} · F1 {verdict['f1']:.2f} — gold: "
                     + " / ".join(f"“{a}”" for a in dict.fromkeys(gold.answers)))
    if gold is not None and gold.doc_ids:
        if verdict["gold_rank"] is None:
            lines.append("✗ gold paragraph not among the candidates")
        else:
            where = "given to the generator ✓" if verdict["gold_in_prompt"] else "not in the top-n ✗"
            lines.append(f"Gold paragraph: rank {verdict['gold_rank']} (retrieval rank "
                         f"{verdict['gold_retrieval_rank']}), {where}")
    return "\n\n".join(lines)


def declined_markdown(result: RAGResult, snippet: int = 160) -> str:
    """The reader declined: says so, with its confidence, the closest passages and its guess."""
    confidence = "" if result.confidence is None else f" (confidence {result.confidence:.0%}, below the threshold)"
    lines = [f"**{NOT_FOUND}**{confidence} The closest passages:"]
    for d in result.docs[: result.top_n]:
        text = d.text if len(d.text) <= snippet else d.text[:snippet].rsplit(" ", 1)[0] + "…"
        lines.append(f"{d.rank}. **{_md(d.title or d.id)}** (`{d.id}`{source_text(d.source)}, P(answers) "
                     f"{percent(d.relevance)}): {_md(text)}")
    if result.reading is not None and result.reading.answer:
        lines.append(f"_The reader's best guess, not given as an answer: “{_md(result.reading.answer)}”_")
    return "\n\n".join(lines)


def source_markdown(result: RAGResult, context: int = 160) -> str:
    """Where the reader found its answer: the document, and the answer highlighted in its text."""
    reading = result.reading
    if reading is None or reading.doc < 0:
        return "_(no answer read)_"
    doc = result.docs[reading.doc]
    where = f"Read from **{doc.title or doc.id}** (`{doc.id}`, rank {doc.rank}{source_text(doc.source)})"
    if reading.start < 0:
        return where + " — the answer is not a verbatim span of it."
    lo, hi = max(0, reading.start - context), min(len(doc.text), reading.end + context)
    before, span, after = doc.text[lo:reading.start], doc.text[reading.start:reading.end], doc.text[reading.end:hi]
    return (f"{where}:\n\n> {'…' if lo else ''}{_md(before)}<mark>**{_md(span)}**</mark>{_md(after)}"
            f"{'…' if hi < len(doc.text) else ''}")


def source_text(source: dict | None) -> str:
    """``, file.pdf page 2`` for an ingested passage; nothing for a corpus without sources."""
    if not source or not source.get("file"):
        return ""
    page = f" page {source['page']}" if source.get("page") else ""
    return f", {source['file']}{page}"


def _md(text: str) -> str:
    """Plain text safe inside markdown (no accidental emphasis, links or HTML)."""
    return html.escape(text).replace("*", "\\*").replace("_", "\\_").replace("[", "\\[").replace("\n", " ")


def timing_markdown(result: RAGResult) -> str:
    t = result.timings
    spec = MODE_SPECS[result.mode]
    parts = [f"retrieve {seconds_text(t['retrieve'])}"]
    if t.get("queue", 0.0) >= 0.05:  # another user's batch was running (hyperrag.workbench.batcher)
        parts.insert(0, f"queued {seconds_text(t['queue'])}")
    if spec.rerank is not None:
        if "reuse" == spec.rerank:
            parts.append(f"KV load {seconds_text(t['kv_load'])}")
        parts.append(f"rerank {seconds_text(t['rerank'])}")
    parts.append(f"{'read' if spec.read else 'generate'} {seconds_text(t['generate'])}")
    return " · ".join(parts) + f" · **total {seconds_text(t['total'])}**"


def compare_modes(reader: bool) -> tuple[str, ...]:
    """The Ask tab's three columns: the reader's modes, or the generator's for a model without a reader."""
    return COMPARE_MODES if reader else GENERATOR_COMPARE_MODES


def column_title(mode: str) -> str:
    return f"### {MODE_TITLES[mode]}"


def summary_markdown(results: dict[str, RAGResult]) -> str:
    """The Ask tab's headline: KV reuse against full prefill (same reader or generator, same
    ranking), then what reranking changed against the retriever's order."""
    plain, full, kv = (next((results[m] for m in modes if m in results), None)
                       for modes in zip(COMPARE_MODES, GENERATOR_COMPARE_MODES))
    lines = []
    if full and kv:
        tf = full.timings["kv_load"] + full.timings["rerank"]
        tk = kv.timings["kv_load"] + kv.timings["rerank"]
        speed = f"{tf / tk:.1f}×" if tk else "∞×"
        agree = agreement([report.record_from_result(full, generated=True)],
                          [report.record_from_result(kv, generated=True)])
        same = "Same ranking ✓" if agree["ranking_agreement"] == 1 else (
            f"Same top-{kv.top_n} {'✓' if agree['top_n_agreement'] == 1 else '✗'}; the full ranking differs "
            f"(near-tied scores, max difference {agree['max_abs_score_diff']:.1e})")
        # The reader reads from the stored KV too; the generator prefills its top-n documents anew.
        computed = "no document token computed" if kv.reading is not None else "the generator read its top-n anew"
        lines.append(f"**KV reuse reranked {len(kv.docs)} documents {speed} faster than full prefill** "
                     f"({seconds_text(tk)} vs {seconds_text(tf)}); end to end {seconds_text(kv.timings['total'])} vs "
                     f"{seconds_text(full.timings['total'])}, {computed}. {same} · same answer "
                     f"{'✓' if agree['answer_agreement'] == 1 else '✗'}")
    ranked = kv or full
    if ranked and plain:
        moved = sum(d.rank <= ranked.top_n for d in ranked.docs if d.retrieval_rank > ranked.top_n)
        same = (plain.reading.answer == ranked.reading.answer if plain.reading and ranked.reading
                else plain.reading is None and plain.answer == ranked.answer)
        change = ("the same answer" if same
                  else f"“{_md(plain.answer)}” over the retriever's order, “{_md(ranked.answer)}” reranked")
        reader = "reader" if ranked.reading is not None else "generator"
        lines.append(f"**Reranking** moved {moved} passage(s) into the top {ranked.top_n} from lower in the "
                     f"retriever's list; the {reader} gave {change}.")
    return "  \n".join(lines)


def reference_markdown(results: dict[str, RAGResult], gold: Query | None) -> str:
    """The traditional generator's answers (the reference, not trained for this prompt)."""
    return "\n\n---\n\n".join(f"#### {MODE_TITLES[mode]} · {timing_markdown(r)}\n\n{answer_markdown(r, gold)}"
                                 for mode, r in results.items())


def status_markdown(status: dict) -> str:
    """The header line for :meth:`Workbench.status`."""
    if status["state"] == "failed":
        return f"**Engine failed to load:** {status['error']}"
    if status["state"] == "loading":
        return "Loading models and index…"
    adapter = f" + {status['adapter']}" if status["adapter"] else " · zero-shot (no adapter, so no reader)"
    text = (f"**Model** `{status['model']}`{adapter} · **weights** `{status['weights']}` · **device** "
            f"{status['device']} ({status['dtype']}) · "
            f"**store** `{status['store']}` ({status['codec']}) · **batch** {status['batch_size']}")
    if status["store_problem"] == "fallback":
        text += f" · ⚠ `{status['configured_store']}` could not be used: an in-process store stands in"
    elif status["store_problem"] == "unreachable":
        text += " · ⚠ the store is unreachable: document KV is computed per query until it is back"
    return text


def banner(messages: Sequence[str]) -> dict:
    """The visible warning banner (hidden when there is nothing to say)."""
    unique = list(dict.fromkeys(m for m in messages if m))
    text = "\n\n".join(f"⚠ {m}" for m in unique)
    return gr.update(value=text, visible=bool(unique))


def gold_choices(entry: CorpusEntry) -> list[tuple[str, str]]:
    queries = entry.corpus.queries[:MAX_GOLD_CHOICES]
    return [(q.question, q.question) for q in queries]


def batch_headline(step: BatchStep, result: dict, seconds: float) -> str:
    """The batch tab's status line once a batch is done."""
    headline = [f"{step.queries} queries × {len(step.modes)} modes in {seconds:.0f} s"]
    speed = (result.get("e2e") or {}).get("speedup_vs_baseline")
    if speed:
        headline.append(f"end to end, reuse is {speed:.1f}× the baseline's queries/s")
    agree = (result.get("quality") or {}).get("ranking_agreement")
    if agree is not None:
        headline.append(f"identical rankings reuse vs baseline: {agree:.0%}")
    return "**Done:** " + "; ".join(headline)


def corpus_markdown(entry: CorpusEntry, estimate: dict | None = None) -> str:
    c = entry.corpus
    text = f"**{entry.label}** — {len(c):,} documents, {len(c.queries):,} gold questions"
    if estimate:
        rows = {r["codec"]: r for r in estimate["codecs"]}
        chosen = rows[estimate["codec"]]
        others = ", ".join(f"{r['codec']} {format_bytes(r['bytes'])}" for r in estimate["codecs"]
                           if r["codec"] != estimate["codec"])
        text += (f"\n\n**Storage estimate:** {estimate['tokens']:,} document tokens × "
                 f"{chosen['bytes_per_token'] / 1e3:.1f} KB/token = **{format_bytes(chosen['bytes'])}** "
                 f"with the {estimate['codec']} codec in `{estimate['store']}` (other codecs: {others}); "
                 f"precomputing takes about {format_duration(estimate['precompute_s'])} on a 2-core CPU "
                 "(the rate measured on one, scaled by tokens).")
    if entry.report is not None:
        r = entry.report
        text += (f"\n\n**KV caches:** {r.encoded} encoded, {r.skipped} already stored, {r.failed} failed; "
                 f"{format_bytes(r.bytes)} written in {r.seconds:.1f} s")
    return text


# --------------------------------------------------------------------------------------------
# callbacks (plain values in, plain values / updates out)
# --------------------------------------------------------------------------------------------
def _gr_progress(progress, desc: str):
    def report(done: int, total: int) -> None:
        if progress is not None:
            progress((done, max(total, 1)), desc=desc)
    return report


def _gold(entry: CorpusEntry, question: str) -> Query | None:
    return entry.gold.get(question.strip())


@shows_errors
def cb_pick_gold(gold: str | None):
    """A picked gold question goes into the question box; a reset list (page load, another
    corpus) leaves whatever the user typed there."""
    return gold if gold else gr.update()


# -- batch of gold queries with live dashboards --------------------------------------------------
DASHBOARDS = (("Latency per stage", figures.latency_figure), ("Throughput", figures.throughput_figure),
              ("Quality", figures.quality_figure), ("Storage", figures.storage_figure),
              ("Quality vs throughput", figures.frontier_figure))
FIGURE_NAMES = [name for name, _ in DASHBOARDS]


class Callbacks:
    """The app's callbacks over its one workbench (the app's state: no module-level singleton)."""

    def __init__(self, workbench: Workbench):
        self.wb = workbench

    @shows_errors
    def resolve_entry(self, source: str, files: Sequence[str] | None, key: str | None,
                      progress: Callable[[int, int], None] | None = None) -> CorpusEntry:
        """The corpus a Corpus-tab action is about: the default one, the staged upload, or a new upload
        (documents read into passages with ``progress``; files that gave none are shown as warnings)."""
        if source != UPLOAD:
            return self.wb.entry(DEFAULT_KEY)
        files = [str(f) for f in files or [] if f]
        staged = self.wb.find(key) if key and key != DEFAULT_KEY else None
        if staged is not None and (not files or staged.sources == tuple(files)):
            return staged
        entry = self.wb.stage_upload(files, progress)
        for error in entry.upload_errors:
            gr.Warning(error)
        return entry

    @shows_errors
    def cb_select_corpus(self, source: str, files: Sequence[str] | None, key: str | None, codec: str | None = None,
                         progress=gr.Progress()):
        """Corpus choice or upload changed: validate it, estimate its storage, list its gold questions.

        Returns (corpus key, corpus markdown, gold dropdown update, banner update)."""
        if source == UPLOAD and not files:
            return (key or DEFAULT_KEY, "Choose files to upload: `docs.jsonl` (+ `queries.jsonl`) or "
                    "`.txt`/`.md`/`.pdf`/`.html`/`.docx`/`.zip` files "
                    f"(at most {self.wb.config.upload_max_mb:g} MiB in all).", gr.update(), banner([]))
        entry = self.resolve_entry(source, files, key, _gr_progress(progress, "reading uploaded files"))
        estimate = self.wb.estimate(entry)
        return (entry.key, corpus_markdown(entry, estimate),
                gr.update(choices=gold_choices(entry), value=None), banner(list(entry.upload_errors)))

    @shows_errors
    def cb_files_changed(self, files: Sequence[str] | None, key: str | None, progress=gr.Progress()):
        """Files dropped in (or cleared): switch the corpus choice to match, then as cb_select_corpus."""
        source = UPLOAD if files else SHIPPED
        return (source, *self.cb_select_corpus(source, files, key, progress=progress))

    @shows_errors
    def cb_prepare(self, source: str, files: Sequence[str] | None, key: str | None, progress=gr.Progress()):
        """The one button: embed and index the corpus, then precompute its document KV caches.

        Returns (corpus key, corpus markdown, gold dropdown update, banner update, status)."""
        if progress is not None:
            progress(0, desc="loading models")
        self.wb.wait_ready()
        entry = self.resolve_entry(source, files, key, _gr_progress(progress, "reading uploaded files"))
        estimate = self.wb.estimate(entry)
        warnings = self.wb.prepare(entry, _gr_progress(progress, "embedding documents"),
                                   _gr_progress(progress, "precomputing document KV caches"))
        for w in warnings:
            gr.Warning(w)
        return (entry.key, corpus_markdown(entry, estimate), gr.update(choices=gold_choices(entry), value=None),
                banner(warnings), status_markdown(self.wb.status()))

    @shows_errors
    def cb_apply_settings(self, codec: str, store_url: str, batch_size: float, key: str | None):
        """Explicit settings change: re-open the store and/or rebuild the reranker (shared by all users)."""
        notes = self.wb.reconfigure(codec, store_url, int(batch_size))
        warnings = [n for n in notes if "fail" in n.lower() or "unreachable" in n.lower() or "could not" in n.lower()]
        for w in warnings:
            gr.Warning(w)
        entry = self.wb.entry(key)
        text = corpus_markdown(entry, self.wb.estimate(entry))
        return (status_markdown(self.wb.status()), "; ".join(notes), text, banner(warnings),
                redact_url(self.wb.settings.store_url))

    def compare_modes(self) -> tuple[str, ...]:
        return compare_modes("reader_kv" in self.wb.modes())

    def model_view(self) -> tuple:
        """What the page shows of the live model beyond the status line: the Ask tab's column
        titles, the batch tab's modes, and the model fields (as the live model has them)."""
        s, modes = self.wb.settings, self.wb.modes()
        ask = self.compare_modes()
        return (*[column_title(m) for m in ask],
                gr.update(choices=[(MODE_TITLES[m], m) for m in modes], value=[m for m in ask if m in modes]),
                gr.update(value=s.model if s.model in MODELS else None), "" if s.model in MODELS else s.model,
                _adapter_field(s))

    @shows_errors
    def cb_switch_model(self, model: str | None, model_path: str, adapter: str, key: str | None,
                        progress=gr.Progress()):
        """Load another model (the path field wins over the list) and make it the live one of the
        whole app; a model that cannot be loaded is an error message, and the live one stays.

        Returns (status, notes, corpus markdown, banner, the model view: column titles, batch
        modes, model list, path, adapter)."""
        choice = (model_path or "").strip() or (model or "")

        def stage(done: int, total: int) -> None:
            progress((done, total), desc=f"{choice}: {SWITCH_STAGES[min(done, total - 1)]}")

        notes = self.wb.switch_model(choice, adapter, stage if progress is not None else None)
        entry = self.wb.entry(key)
        return (status_markdown(self.wb.status()), "; ".join(notes),
                corpus_markdown(entry, self.wb.estimate(entry)), banner([]), *self.model_view())

    @shows_errors
    def cb_random_gold(self, key: str | None, seed: float | None = None) -> tuple[str, dict]:
        entry = self.wb.entry(key)
        if not entry.corpus.queries:
            raise UserError("this corpus has no gold questions (queries.jsonl)")
        queries = entry.corpus.queries
        q = random.Random(seed).choice(queries) if seed is not None else random.choice(queries)
        return q.question, gr.update(value=q.question if q.question in {c for c, _ in gold_choices(entry)} else None)

    @shows_errors
    def cb_compare(self, question: str, top_k: float, top_n: float, key: str | None):
        """Ask one question in each of ``COMPARE_MODES``; yields after each mode.

        Yields (summary, banner, then answer/timings/docs for each mode)."""
        entry = self.wb.entry(key)
        try:
            question, notes = clean_question(question)
        except QuestionError as err:
            raise UserError(f"{err} (or pick a gold question)") from None
        gold = _gold(entry, question)
        results: dict[str, RAGResult] = {}
        warnings: list[str] = list(notes)
        outputs: list[Any] = [gr.update()] * (2 + 3 * len(COMPARE_MODES))
        for i, mode in enumerate(self.compare_modes()):
            result = self.wb.ask(entry, question, mode, int(top_k), int(top_n))
            results[mode] = result
            warnings += [w for w in result.warnings if w not in notes]
            outputs[2 + 3 * i: 5 + 3 * i] = [answer_markdown(result, gold), timing_markdown(result),
                                             docs_frame(result, gold)]
            outputs[0] = summary_markdown(results) or f"Running… {MODE_TITLES[mode]} done."
            outputs[1] = banner(warnings)
            yield tuple(outputs)
        for w in dict.fromkeys(warnings):
            gr.Warning(w)

    @shows_errors
    def cb_reference(self, question: str, top_k: float, top_n: float, key: str | None) -> str:
        """The traditional generator on the same question (``REFERENCE_MODES``): the reference the
        reader is measured against, one click away."""
        entry = self.wb.entry(key)
        try:
            question, _ = clean_question(question)
        except QuestionError as err:
            raise UserError(f"{err} (or pick a gold question)") from None
        results = {mode: self.wb.ask(entry, question, mode, int(top_k), int(top_n)) for mode in REFERENCE_MODES}
        return reference_markdown(results, _gold(entry, question))

    def batch_result(self, entry: CorpusEntry, records: list[dict]) -> dict:
        """The bench's result dict for the records so far, with the storage part of this store."""
        return report.batch_summary(records, self.wb.estimate(entry), self.wb.wait_ready().store.describe(),
                                    entry.report)

    @shows_errors
    def cb_run_batch(self, n_queries: float, modes: Sequence[str], seed: float, top_k: float, top_n: float,
                     key: str | None):
        """Run gold queries in the chosen modes (interleaved per query); yield updated dashboards.

        Yields (status, banner, 5 figures, per-query table, export files)."""
        entry = self.wb.entry(key)
        records: list[dict] = []
        warnings: list[str] = []
        t0 = time.perf_counter()
        result: dict = {}
        step = None
        for step in self.wb.run_batch(entry, int(n_queries), modes, int(seed or 0), int(top_k), int(top_n)):
            if not step.done:  # the zero-shot reference's document KV comes first
                yield (f"Computing the zero-shot reranker's document KV for the candidates of {step.queries} queries…",
                       banner([]), *[gr.update()] * (len(DASHBOARDS) + 2))
                continue
            for query, mode, res in step.answers:
                warnings += res.warnings
                records.append({**report.record_from_result(res, query), "mode": mode})
            result = self.batch_result(entry, records)
            if step.done < step.queries:
                status = (f"{step.done}/{step.queries} queries × {len(step.modes)} modes in "
                          f"{time.perf_counter() - t0:.0f} s — running…")
                yield (status, banner(warnings), *[fn(result) for _, fn in DASHBOARDS], self._table(records), None)
        s = self.wb.settings
        result["config"] = {"corpus": entry.corpus.name, "queries": step.queries, "modes": step.modes,
                            "seed": int(seed or 0), "top_k": int(top_k), "top_n": int(top_n), "codec": s.codec,
                            "store": self.wb.store_label(), "model": s.model, "batch_size": s.batch_size}
        folder = self.wb.config.exports / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        files = report.write_batch_exports(folder, result, records)
        prune_folders(self.wb.config.exports, self.wb.config.keep_exports, keep={folder})
        yield (batch_headline(step, result, time.perf_counter() - t0), banner(warnings),
               *[fn(result) for _, fn in DASHBOARDS], self._table(records), files)

    @staticmethod
    def _table(records: list[dict]) -> pd.DataFrame:
        return pd.DataFrame([report.batch_row(r) for r in records], columns=report.BATCH_COLUMNS)

    @shows_errors
    def api_ask(self, question: str, mode: str = "reuse", top_k: int = 0, top_n: int = 0, corpus: str = "") -> dict:
        """Answer one question in one mode (retrieval | baseline | prefix | reuse) on a loaded corpus.

        ``corpus``: "" for the app's default corpus, or the id an upload was given. Returns the
        answer (reader modes: ``found`` False when it declined, with its ``confidence``), the ranked
        documents (``relevance``: calibrated P(the passage answers), where calibrated), stage timings
        (seconds) and warnings."""
        if mode not in ENGINE_MODES:
            raise UserError(f"unknown mode {mode!r}; choose one of {', '.join(ENGINE_MODES)}")
        entry = self.wb.entry(corpus or DEFAULT_KEY)
        s = self.wb.settings
        result = self.wb.ask(entry, question, mode, int(top_k) or s.top_k, int(top_n) or s.top_n)
        return {"question": result.question, "mode": result.mode, "answer": result.answer, "top_n": result.top_n,
                "found": result.found, "confidence": result.confidence,
                "docs": [{"id": d.id, "score": d.score, "rank": d.rank, "retrieval_rank": d.retrieval_rank,
                          "relevance": d.relevance} for d in result.docs],
                "timings": result.timings, "warnings": result.warnings, "corpus": entry.key}

    def on_load(self):
        """The page opened: the status line, the default corpus and its gold questions, and the
        live model's view (another user may have switched the model since the app started)."""
        self.wb.wait_ready()
        _, info, gold_update, _ = self.cb_select_corpus(SHIPPED, None, DEFAULT_KEY)
        return status_markdown(self.wb.status()), info, gold_update, *self.model_view()


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------
def _logo_html() -> str:
    svg = (ASSETS / "logo.svg").read_text(encoding="utf-8")
    return (f'<div class="hr-header">{svg}<div><h1>HyperRAG workbench</h1>'
            "<p>RAG whose decoder reranker reuses precomputed per-document KV caches: compare it side by side "
            "with full-prefill reranking and with retrieval-only RAG.</p></div></div>")


def css() -> str:
    return (ASSETS / "style.css").read_text(encoding="utf-8")


def _corpus_tab(wb: Workbench) -> SimpleNamespace:
    """Tab 1: corpus choice or upload, the prepare button, the process-wide store settings and model."""
    s = wb.settings
    c = SimpleNamespace()
    with gr.Row():
        with gr.Column(scale=2):
            c.source = gr.Radio([(f"Default: {Path(s.corpus).name}", SHIPPED), (UPLOAD, UPLOAD)],
                                value=SHIPPED, label="Corpus")
            c.files = gr.File(file_count="multiple", file_types=[".jsonl", *UPLOAD_DOC_SUFFIXES],
                              label=f"Upload {UPLOAD_KINDS}")
            gr.Markdown(
                f"jsonl lines: `{{\"id\", \"title\", \"text\"}}`; gold questions: `{{\"id\", \"question\", "
                f"\"answers\": [...], \"doc_ids\": [...]}}`. Limits: {wb.config.upload_max_mb:g} MiB per "
                f"upload, {wb.config.upload_max_docs:,} documents.", elem_classes=["hr-small"])
        with gr.Column(scale=3):
            c.info = gr.Markdown("Loading…", elem_id="hr-corpus")
            c.prepare = gr.Button("Build index & precompute KV caches", variant="primary")
            c.prepare_status = gr.Markdown("")
    with gr.Accordion("Store and reranker settings, and the model (shared by every user of this app)", open=False):
        with gr.Row():
            c.codec = gr.Dropdown(list(CODECS), value=s.codec, label="KV codec")
            c.store_url = gr.Textbox(redact_url(s.store_url), label="Store URL",
                                     info="fs://DIR (embedded) · memory:// · lm://HOST:PORT · redis://HOST:PORT")
            c.batch = gr.Slider(1, MAX_BATCH_SIZE, value=min(s.batch_size, MAX_BATCH_SIZE), step=1,
                                label="Reranker batch size")
        c.apply = gr.Button("Apply (re-opens the store / rebuilds the reranker)")
        c.apply_notes = gr.Markdown("")
        gr.Markdown("**Model** (reranker, reader and generator). The new model loads while the live one "
                    "keeps answering, and takes over once loaded; one that cannot be loaded leaves the live one "
                    "as it was. Stored KV is keyed by the model's weights: each model computes its own (press "
                    "*Build index & precompute* after a switch), and none is deleted.", elem_classes=["hr-small"])
        with gr.Row():
            c.model = gr.Dropdown(list(MODELS), value=s.model if s.model in MODELS else None, label="Packaged model",
                                  info="each with its trained adapter (the reader)")
            c.model_path = gr.Textbox("" if s.model in MODELS else s.model, label="…or a model on this machine",
                                      placeholder="/path/to/hf-folder or /path/to/model.gguf",
                                      info="a Hugging Face folder (config.json, *.safetensors, tokenizer) or a "
                                           ".gguf file; when filled, it is loaded instead of the list's model")
            c.adapter = gr.Textbox(_adapter_field(s), label="LoRA adapter folder (optional)",
                                   placeholder="empty: the packaged model's own; none for any other model",
                                   info="empty: a packaged model gets its shipped adapter, any other model runs "
                                        "zero-shot (reranker and generator, no reader)")
        c.switch = gr.Button(SWITCH_BUTTON)
        c.switch_notes = gr.Markdown("")
        gr.Markdown(f"dtype `{s.dtype}` on device `{s.device}`, documents cut to {s.max_doc_tokens} tokens: set when "
                    "the app starts (flags or `HYPERRAG_*` variables).", elem_classes=["hr-small"])
    return c


def _adapter_field(s: Settings) -> str:
    """The adapter field's value for settings ``s``: empty for none or a shipped one (the field's
    empty value gives a packaged model its own)."""
    return "" if not s.adapter or Path(s.adapter) in SHIPPED_ADAPTERS.values() else s.adapter


def _ask_tab(wb: Workbench) -> SimpleNamespace:
    """Tab 2: one question answered by the reader over three rankings, side by side; the
    traditional generator one click away."""
    s, a = wb.settings, SimpleNamespace(outputs=[])
    with gr.Row():
        a.question = gr.Textbox(label="Question", placeholder="Type a question, or pick a gold question",
                                scale=4, lines=1, max_length=4000)
        a.gold = gr.Dropdown([], label="Gold questions", scale=3, value=None, allow_custom_value=False)
        a.rand = gr.Button("Random gold question", scale=1)
    with gr.Row():
        a.top_k = gr.Slider(1, MAX_TOP_K, value=min(s.top_k, MAX_TOP_K), step=1, label="top-k (retrieved candidates)")
        a.top_n = gr.Slider(1, MAX_TOP_N, value=min(s.top_n, MAX_TOP_N), step=1,
                            label="top-n (documents given to the generator)")
        a.ask = gr.Button(ASK_BUTTON, variant="primary")
    a.summary = gr.Markdown("", elem_id="hr-summary")
    a.titles = []
    with gr.Row(equal_height=False):
        for mode, shown in zip(COMPARE_MODES, compare_modes("reader_kv" in wb.modes())):
            with gr.Column(elem_classes=["hr-mode", f"hr-mode-{mode}"]):
                a.titles.append(gr.Markdown(column_title(shown)))
                a.outputs += [gr.Markdown("", elem_classes=["hr-answer"]),
                              gr.Markdown("", elem_classes=["hr-timing"]),
                              gr.Dataframe(headers=DOC_COLUMNS, max_height=360, interactive=False,
                                           label="Documents (Δ: rank change vs retrieval; P(answers): "
                                                 "calibrated probability that the passage answers; used: "
                                                 "read or given to the generator)",
                                           column_widths=["7%", "12%", "14%", "14%", "29%", "12%", "12%"])]
    with gr.Accordion("Reference: the traditional generator (untrained for this prompt) on the same question",
                      open=False):
        a.reference = gr.Button("Ask the traditional generator (retrieval only, and after KV-reuse rerank)")
        a.reference_out = gr.Markdown("")
    return a


def _batch_tab(wb: Workbench) -> SimpleNamespace:
    """Tab 3: a batch of gold queries in the chosen modes, with live dashboards and exports."""
    b = SimpleNamespace()
    with gr.Row():
        b.n_queries = gr.Slider(1, MAX_BATCH_QUERIES, value=10, step=1, label="Gold queries")
        modes = wb.modes()
        b.modes = gr.CheckboxGroup([(MODE_TITLES[m], m) for m in modes], label="Modes",
                                   value=[m for m in compare_modes("reader_kv" in modes) if m in modes])
        b.seed = gr.Number(wb.settings.seed, label="Seed", precision=0)
    with gr.Row():
        b.run = gr.Button("Run batch", variant="primary")
        b.stop = gr.Button("Stop")
    b.status = gr.Markdown("Uses the Ask tab's top-k and top-n.")
    b.plots = []
    with gr.Row():
        b.plots += [gr.Plot(label=FIGURE_NAMES[0]), gr.Plot(label=FIGURE_NAMES[1])]
    with gr.Row():
        b.plots += [gr.Plot(label=FIGURE_NAMES[2]), gr.Plot(label=FIGURE_NAMES[3])]
    b.plots.append(gr.Plot(label=FIGURE_NAMES[4]))
    b.table = gr.Dataframe(headers=report.BATCH_COLUMNS, label="Per query", wrap=True, max_height=320,
                           interactive=False)
    b.exports = gr.File(label="Export (JSON, CSV)", file_count="multiple", interactive=False)
    return b


def _wire(cb: Callbacks, page: SimpleNamespace, c: SimpleNamespace, a: SimpleNamespace, b: SimpleNamespace) -> None:
    """The events: which callback each control runs, on which inputs and outputs, under which API name."""
    corpus_outputs = [page.corpus_key, c.info, a.gold, page.warn]
    c.source.change(cb.cb_select_corpus, [c.source, c.files, page.corpus_key, c.codec], corpus_outputs,
                    api_name="select_corpus")
    c.files.change(cb.cb_files_changed, [c.files, page.corpus_key], [c.source, *corpus_outputs],
                   api_visibility="private")
    c.prepare.click(cb.cb_prepare, [c.source, c.files, page.corpus_key], [*corpus_outputs, page.status],
                    api_name="prepare", concurrency_id="prepare", concurrency_limit=1).then(
        lambda: "Done.", None, c.prepare_status, api_visibility="private")
    c.apply.click(cb.cb_apply_settings, [c.codec, c.store_url, c.batch, page.corpus_key],
                  [page.status, c.apply_notes, c.info, page.warn, c.store_url], api_name="apply_settings",
                  concurrency_id="prepare", concurrency_limit=1)
    c.switch.click(cb.cb_switch_model, [c.model, c.model_path, c.adapter, page.corpus_key],
                   [page.status, c.switch_notes, c.info, page.warn, *model_view(c, a, b)], api_name="switch_model",
                   concurrency_id="prepare", concurrency_limit=1)
    a.gold.change(cb_pick_gold, a.gold, a.question, api_visibility="private")
    a.rand.click(cb.cb_random_gold, page.corpus_key, [a.question, a.gold], api_visibility="private")
    ask_event = dict(fn=cb.cb_compare, inputs=[a.question, a.top_k, a.top_n, page.corpus_key],
                     outputs=[a.summary, page.warn, *a.outputs])
    a.ask.click(**ask_event, api_name="compare")
    a.reference.click(cb.cb_reference, [a.question, a.top_k, a.top_n, page.corpus_key], a.reference_out,
                      api_name="reference")
    a.question.submit(**ask_event, api_visibility="private")
    gr.api(cb.api_ask, api_name="ask")
    batch_event = b.run.click(cb.cb_run_batch, [b.n_queries, b.modes, b.seed, a.top_k, a.top_n, page.corpus_key],
                              [b.status, page.warn, *b.plots, b.table, b.exports], api_name="run_batch",
                              concurrency_id="batch", concurrency_limit=1)
    b.stop.click(None, None, None, cancels=[batch_event], api_visibility="private")


def model_view(c: SimpleNamespace, a: SimpleNamespace, b: SimpleNamespace) -> list:
    """The components :meth:`Callbacks.model_view` fills, in its order."""
    return [*a.titles, b.modes, c.model, c.model_path, c.adapter]


def build_app(workbench: Workbench) -> gr.Blocks:
    """The Blocks app over ``workbench`` (``app.py`` queues and launches it)."""
    cb = Callbacks(workbench)
    with gr.Blocks(title="HyperRAG workbench", delete_cache=(3600, 24 * 3600)) as demo:
        page = SimpleNamespace(corpus_key=gr.State(DEFAULT_KEY))
        gr.HTML(_logo_html())
        page.status = gr.Markdown(status_markdown(workbench.status()), elem_id="hr-status")
        page.warn = gr.Markdown("", visible=False, elem_id="hr-banner", elem_classes=["hr-banner"])
        with gr.Tabs():
            with gr.Tab("1 · Corpus & KV cache", id="corpus"):
                corpus = _corpus_tab(workbench)
            with gr.Tab("2 · Ask", id="ask"):
                ask = _ask_tab(workbench)
            with gr.Tab("3 · Batch & dashboards", id="batch"):
                batch = _batch_tab(workbench)
        _wire(cb, page, corpus, ask, batch)
        demo.load(cb.on_load, None, [page.status, corpus.info, ask.gold, *model_view(corpus, ask, batch)],
                  api_visibility="private")
    return demo


def launch_kwargs(workbench: Workbench) -> dict:
    """Arguments for ``demo.launch`` that the app needs (CSS, upload limit, the export folder)."""
    workbench.config.exports.mkdir(parents=True, exist_ok=True)
    return {"css": css(), "max_file_size": f"{int(workbench.config.upload_max_mb * 1024)}kb",
            "allowed_paths": [str(workbench.config.exports)], "favicon_path": str(ASSETS / "logo.svg"),
            "theme": gr.themes.Soft(primary_hue="indigo", secondary_hue="cyan")}
