"""Held-out quality of the rerank step: retrieval only vs decoder rerankers, on a corpus's gold queries.

    python -m hyperrag.evaluate --queries 300 --json /tmp/eval.json
    python -m hyperrag.evaluate --queries 300 --systems retrieval,zero-shot,trained --generate 200
    python -m hyperrag.evaluate --queries 100 --systems zero-shot,wording:relevant,query-first
    python -m hyperrag.evaluate --queries 300 --systems retrieval,trained,trained+retrieval \\
        --generate 300 --generate-systems retrieval,trained+retrieval --read 300
    python -m hyperrag.evaluate --queries 300 --systems retrieval,trained+retrieval --read 300 \\
        --unanswerable 0.5

One code path for every system, before and after training: the retriever's top-k candidates of
a fixed random sample of questions (``--seed``) are reordered by each system and scored with
recall@1/5, MRR@10 and NDCG@10 (binary relevance: the question's gold paragraph), each with a
95% bootstrap interval over the questions. Answers (SQuAD EM/F1, with intervals):

- ``--generate N``: the first N questions answered by the traditional generator from each
  system's top-n documents, concatenated (``retrieval+generator`` is retrieval-only RAG);
- ``--read N``: answered by the reader from the top-n of each of ``--read-systems``, one
  document per row, from the trained model's stored (exact fp32) document KV, as ``reader_kv``
  reads (a codec system, ``trained+retrieval@int4``, reads its codec's KV); ``oracle`` reads
  the gold paragraph alone (the reader's ceiling); ``retrieval+reader`` is the same reader over
  the retriever's order: the reranker's own share of the answer quality.

Every answer row also gets a paired interval of "row minus retrieval-only RAG" on the same
questions (``_minus_retrieval``: the traditional generator over the retriever's order, when
generated) and of "row minus the reader over the retriever's order" (``_minus_retrieval_reader``).

``--unanswerable F`` makes that fraction of the read questions unanswerable: their gold passages,
and every passage that holds one of their answers, are removed from the candidates (retrieval
runs on the rest of the corpus), the trained+retrieval
ranking and the reader run again on what is left, and ``abstain`` reports how well declining
separates them (an unanswerable question is right only when declined): the calibrated rule of
:mod:`hyperrag.rag.calibration` and, for comparison, the fused ranking score alone and the
answer likelihood alone, each at its threshold chosen on held-out SQuAD train articles. With
the adapter's calibration, ``calibration`` reports the relevance map's expected calibration
error on these questions' candidates. Systems:

- ``retrieval``: MiniLM + faiss order (cosine similarity);
- ``zero-shot``: the base model as a doc-first reranker (the default :class:`RerankTemplate`);
- ``wording:<name>``: the zero-shot reranker with another instruction (see ``WORDINGS``);
- ``trained``: the base model with the LoRA adapter (``--adapter``, default: the shipped one);
- ``trained+retrieval``: the trained score plus ``w`` times the retriever's cosine, where ``w``
  is read from the adapter folder's ``hyperrag.json`` (tuned on SQuAD train, never on dev);
- ``query-first``: ``[instruction][question][document][suffix]`` in full prefill (its KV cannot
  be reused), built here from token ids and run through the :class:`Decoder`;
- ``trained@CODEC``, ``trained+retrieval@CODEC`` (listed after the system itself; ``CODEC`` as
  in ``bench --codecs``, e.g. ``int4`` or ``int4:nearest``): the same scores from document KV
  stored through the codec, with the agreement and a paired NDCG@10 difference against the
  exact-KV run (``codec_check``).

Rerankers run in ``reuse`` mode against an exact in-memory fp32 document-KV source (``--mode``
chooses); ``--check-full N`` also scores the first N questions in ``full`` mode and reports their
agreement (:func:`hyperrag.rag.metrics.agreement`: largest score difference, identical rankings, same top-n).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence


import torch

from hyperrag.data.corpus import Doc
from hyperrag.kv.local import LocalKV
from hyperrag.rag.calibration import Trust, auroc, auroc_interval, expected_calibration_error
from hyperrag.rag.metrics import agreement, contains_answer, exact_match, f1_score, mean_interval, ranking_metrics
from hyperrag.model.prompts import RerankTemplate
from hyperrag.rag.query_first import QueryFirstScorer
from hyperrag.rag.reader import Reading
from hyperrag.rag.rerank import Reranker, fuse_scores

if TYPE_CHECKING:
    from hyperrag.common.settings import Settings
    from hyperrag.model.loading import LLM
    from hyperrag.rag.reader import Reader
    from hyperrag.rag.retrieval import DenseIndex

log = logging.getLogger("hyperrag.evaluate")

WORDINGS = {
    "contain": RerankTemplate.instruction,
    "relevant": "Is the document relevant to the question? Answer Yes or No.",
    "answers": "Read the document and the question. Can the question be answered from the document? "
               "Answer Yes or No.",
}
RANK_KEYS = ("recall@1", "recall@5", "mrr@10", "ndcg@10")
DEFAULT_READ = ("retrieval", "trained+retrieval", "oracle")
CALIBRATED = "trained+retrieval"  # the system whose fused score the adapter's calibration maps


@dataclass
class Candidates:
    """One question with its retrieved candidates (best first)."""

    qid: str
    question: str
    answers: list[str]
    gold: list[str]
    doc_ids: list[str]
    cosine: list[float]


@dataclass
class SystemRun:
    name: str
    scores: list[list[float]] = field(default_factory=list)  # per question, per candidate
    seconds: float = 0.0
    answers: dict[str, str] = field(default_factory=dict)  # qid -> generated answer

    def order(self, i: int) -> list[int]:
        return ranked_order(self.scores[i])


def ranked_order(scores: Sequence[float]) -> list[int]:
    """Candidate indices best first (stable: ties keep retrieval order)."""
    return sorted(range(len(scores)), key=lambda j: -scores[j])


def score_records(scores: Sequence[Sequence[float]], cands: Sequence[Candidates], top_n: int) -> list[dict]:
    """One system's per-question scores as the records :func:`hyperrag.rag.metrics.agreement` pairs up."""
    return [{"query_id": c.qid, "scores": dict(zip(c.doc_ids, s)), "top_n": top_n,
             "ranked_ids": [c.doc_ids[j] for j in ranked_order(s)]} for s, c in zip(scores, cands)]


def retrieve(index, queries, k: int) -> list[Candidates]:
    out = []
    for q in queries:
        hits = index.search(q.question, k)
        out.append(Candidates(q.id, q.question, list(q.answers), list(q.doc_ids), [h[0] for h in hits],
                              [h[1] for h in hits]))
    return out


def rerank_scores(reranker: Reranker, cands: Sequence[Candidates], by_id: dict, mode: str = "reuse",
                  source: LocalKV | None = None, progress: Callable[[int, int], None] | None = None
                  ) -> list[list[float]]:
    """The reranker's score of every candidate of every question (``reuse`` fills ``source``)."""
    source = source if source is not None else LocalKV()
    out = []
    for i, c in enumerate(cands):
        texts = [by_id[d].text for d in c.doc_ids]
        out.append(reranker.score(c.question, texts, mode, source if mode == "reuse" else None).scores)
        if progress:
            progress(i + 1, len(cands))
    return out


def ranking_per_question(run: SystemRun, cands: Sequence[Candidates]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in RANK_KEYS}
    for i, c in enumerate(cands):
        for key, value in ranking_metrics([c.doc_ids[j] for j in run.order(i)], c.gold).items():
            out[key].append(value)
    return out


def ranking_summary(run: SystemRun, cands: Sequence[Candidates]) -> dict[str, float]:
    per = ranking_per_question(run, cands)
    return {k: sum(v) / len(cands) for k, v in per.items()} | {"questions": len(cands)}


def with_intervals(per_question: dict[str, list[float]]) -> dict[str, float | list[float]]:
    """Each metric's mean over the questions and its 95% bootstrap interval (``<key>_ci95``)."""
    out: dict[str, float | list[float]] = {}
    for key, values in per_question.items():
        out[key] = sum(values) / max(1, len(values))
        out[key + "_ci95"] = mean_interval(values)
    return out


def paired_differences(per: dict[str, list[float]], ref: dict[str, list[float]], keys: Sequence[str],
                       suffix: str) -> dict[str, float | list[float]]:
    """``<key>_<suffix>``: the mean of ``per - ref`` question by question (as far as both go) and
    its 95% bootstrap interval (``_ci95``), for each of ``keys``."""
    return with_intervals({f"{key}_{suffix}": [a - b for a, b in zip(per[key], ref[key])] for key in keys})


def answer_scores(answers: Sequence[str], cands: Sequence[Candidates]) -> dict[str, list[float]]:
    return {"em": [exact_match(a, c.answers) for a, c in zip(answers, cands)],
            "f1": [f1_score(a, c.answers) for a, c in zip(answers, cands)]}


def generate_answers(generator, run: SystemRun, cands: Sequence[Candidates], by_id: dict, top_n: int,
                     cache: dict, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """The traditional generator's answer to each question from the system's top-n documents,
    concatenated; answers for an identical top-n are reused."""
    out = []
    for i, c in enumerate(cands):
        top = tuple(c.doc_ids[j] for j in run.order(i)[:top_n])
        key = (c.question, top)
        if key not in cache:
            cache[key] = generator.answer(c.question, [by_id[d].text for d in top]).text
        out.append(cache[key])
        if progress:
            progress(i + 1, len(cands))
    return out


def read_answers(reader, run: SystemRun | None, cands: Sequence[Candidates], by_id: dict, top_n: int, source,
                 progress: Callable[[int, int], None] | None = None, calibrated: bool = False) -> list[Reading]:
    """The reader's reading of each question from the system's top-n documents (their KV from
    ``source``, as ``reader_kv`` reads them); ``run=None`` reads the gold paragraph alone (the
    oracle: the reader's ceiling). ``calibrated``: the run's scores are the fused scores the
    adapter's calibration was fitted on (each reading gets a confidence)."""
    out = []
    for i, c in enumerate(cands):
        if run is None:
            texts, scores = [by_id[c.gold[0]].text], [0.0]
        else:
            top = run.order(i)[:top_n]
            texts, scores = [by_id[c.doc_ids[j]].text for j in top], [run.scores[i][j] for j in top]
        out.append(reader.read(c.question, texts, scores, "kv", source, calibrated=calibrated))
        if progress:
            progress(i + 1, len(cands))
    return out


# -- unanswerable questions and declining ---------------------------------------------------------

def pick_unanswerable(n: int, fraction: float, seed: int) -> set[int]:
    """Which of the first ``n`` questions are made unanswerable (a fixed random ``fraction``)."""
    if not 0.0 <= fraction <= 1.0:
        raise SystemExit(f"--unanswerable must be a fraction in [0, 1], got {fraction}")
    return set(random.Random(seed).sample(range(n), round(fraction * n)))


def without_gold(index, c: Candidates, k: int, by_id: Mapping[str, Doc]) -> Candidates:
    """``c`` made unanswerable: the retriever's top ``k`` of the corpus less its gold passages and
    less every passage that holds one of its answers (SQuAD articles repeat facts across
    paragraphs, so removing the gold paragraph alone leaves some questions answerable)."""
    def answers_it(doc_id: str) -> bool:
        return doc_id in c.gold or contains_answer(by_id[doc_id].text, c.answers)

    depth = k + len(c.gold)
    while True:
        found = index.search(c.question, depth)
        hits = [h for h in found if not answers_it(h[0])][:k]
        if len(hits) == k or len(found) < depth:
            break
        depth *= 2
    return Candidates(c.qid, c.question, c.answers, c.gold, [h[0] for h in hits], [h[1] for h in hits])


def abstain_record(reading: Reading, scores: Sequence[float], c: Candidates, unanswerable: bool, top_n: int,
                   doc_ids: Sequence[str]) -> dict:
    """What declining is decided and judged from, for one question as read."""
    return {"qid": c.qid, "unanswerable": unanswerable, "doc_ids": list(doc_ids), "top_scores": sorted(scores, reverse=True)[:top_n],
            "logprob": reading.logprob, "answer": reading.answer, "f1": f1_score(reading.answer, c.answers)}


def signal_values(records: Sequence[dict], trust: Trust | None) -> dict[str, list[float]]:
    """Per question, each signal declining can use (higher = more likely answerable): the rule
    (the calibrated confidence), the fused ranking score of the best passage alone, and the
    answer's log-likelihood alone."""
    out = {"fused": [r["top_scores"][0] for r in records], "likelihood": [r["logprob"] for r in records]}
    if trust is not None:
        out = {"rule": [trust.confidence(r["top_scores"], r["logprob"]) for r in records]} | out
    return out


def abstain_summary(values: Sequence[float], records: Sequence[dict], threshold: float | None) -> dict:
    """How well ``values`` separate answerable from unanswerable questions (AUROC) and, declining
    below ``threshold``: the share of each kind handled right, F1 on the answerable ones (a
    declined one scores 0) against never declining, and F1 overall (an unanswerable question
    scores 1 when declined, else 0); 95% bootstrap intervals."""
    answerable = [not r["unanswerable"] for r in records]
    out: dict = {"questions": len(records), "unanswerable": answerable.count(False)}
    if all(answerable) or not any(answerable):
        return out
    out |= {"auroc": auroc(values, answerable), "auroc_ci95": auroc_interval(values, answerable)}
    if threshold is None:
        return out
    declined = [v < threshold for v in values]
    ans = [i for i, a in enumerate(answerable) if a]
    una = [i for i, a in enumerate(answerable) if not a]
    f1 = [records[i]["f1"] for i in ans]
    kept = [0.0 if declined[i] else records[i]["f1"] for i in ans]
    per = {"unanswerable_declined": [float(declined[i]) for i in una],
           "answerable_answered": [float(not declined[i]) for i in ans],
           "f1_answerable": kept, "f1_answerable_without_declining": f1,
           "f1_overall": [float(declined[i]) if not a else (0.0 if declined[i] else records[i]["f1"])
                          for i, a in enumerate(answerable)]}
    return out | {"threshold": threshold} | with_intervals(per) | with_intervals(
        {"f1_answerable_minus_without_declining": [a - b for a, b in zip(kept, f1)]})


def abstain_report(records: Sequence[dict], trust: Trust | None, threshold: float | None) -> dict:
    """``abstain``: the rule at ``threshold``, then each single signal at its own threshold (from
    the calibration), so the rule's gain is visible."""
    values = signal_values(records, trust)
    out = {}
    for name, vals in values.items():
        cut = threshold if name == "rule" else (trust.baselines.get(name) if trust is not None else None)
        out[name] = abstain_summary(vals, records, cut)
    if "rule" in values:
        out["rule"]["ece"] = expected_calibration_error(values["rule"], [int(not r["unanswerable"]) for r in records])
    return out


def measure_trust(report: dict, trust: Trust | None, abstain_threshold: float = -1.0) -> None:
    """The record's ``calibration`` and ``abstain`` sections from its per-question records and the
    adapter's calibration (``abstain_threshold`` -1: the calibration's own threshold): also for a
    record measured before the calibration was fitted (``python -m hyperrag.calibrate --measure``)."""
    report["calibrated"] = trust is not None
    if trust is not None and any(CALIBRATED in q["scores"] for q in report["per_question"]):
        report["calibration"] = calibration_report(trust, report["per_question"])
    if report.get("abstain_records"):
        threshold = None if trust is None else (abstain_threshold if abstain_threshold >= 0 else trust.threshold)
        report["abstain"] = {k: v for k, v in report["abstain"].items() if k in ("system", "fraction")} | abstain_report(
            report["abstain_records"], trust, threshold)


def relevance_examples(per_question: Sequence[dict]) -> list[tuple[list[float], list[int]]]:
    """Each question's (fused scores, is-gold) over the calibrated system's candidates: what the
    relevance map is fitted on (``python -m hyperrag.calibrate``) and measured on."""
    return [(q["scores"][CALIBRATED], [int(d in q["gold"]) for d in q["doc_ids"]])
            for q in per_question if CALIBRATED in q["scores"]]


def calibration_report(trust: Trust, per_question: Sequence[dict]) -> dict:
    """The relevance map on the record's candidates of the calibrated system: expected
    calibration error over every (question, candidate) pair and over each question's top passage."""
    probs, labels, top_probs, top_labels = [], [], [], []
    for scores, y in relevance_examples(per_question):
        p = trust.relevance_of(scores)
        probs += p
        labels += y
        best = ranked_order(scores)[0]
        top_probs.append(p[best])
        top_labels.append(y[best])
    mean = lambda v: sum(v) / max(1, len(v))  # noqa: E731
    return {"system": CALIBRATED, "pairs": len(probs), "ece": expected_calibration_error(probs, labels),
            "mean_probability": mean(probs), "relevant_rate": mean(labels), "questions": len(top_probs),
            "ece_top1": expected_calibration_error(top_probs, top_labels),
            "top1_mean_probability": mean(top_probs), "top1_relevant_rate": mean(top_labels)}


# -- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from hyperrag.common.settings import add_cli_args

    p = argparse.ArgumentParser(prog="python -m hyperrag.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("evaluation")
    g.add_argument("--queries", type=int, default=300, help="questions sampled with --seed (default 300)")
    g.add_argument("--systems", default="retrieval,zero-shot,trained",
                   help="comma list: retrieval, zero-shot, wording:<name> (" + ", ".join(WORDINGS) +
                        "), trained, trained+retrieval, query-first; trained@CODEC or trained+retrieval@CODEC "
                        "(after the system itself; e.g. trained+retrieval@int4, @int4:nearest) scores from "
                        "document KV stored through that codec and is compared with the exact-KV run")
    g.add_argument("--subset", type=int, default=0,
                   help="run wording:* and query-first on the first N sampled questions only (0 = all)")
    g.add_argument("--mode", default="reuse", choices=("reuse", "full", "prefix"), help="reranker mode")
    g.add_argument("--check-full", type=int, default=0,
                   help="also score the first N questions in full mode and compare with --mode")
    g.add_argument("--generate", type=int, default=0,
                   help="answer the first N sampled questions with each system's top-n (EM/F1)")
    g.add_argument("--generate-systems", default="", help="comma list: answer only for these systems (default all)")
    g.add_argument("--read", type=int, default=0,
                   help="answer the first N sampled questions with the reader (one document per row, its KV "
                        "exact fp32) from the top-n of each of --read-systems")
    g.add_argument("--read-systems", default="",
                   help="comma list of ranked systems the reader reads from; 'retrieval' = the retriever's order "
                        "(retrieval+reader: what reranking adds is measured against it), 'oracle' = the gold "
                        "paragraph alone; a codec system (trained+retrieval@int4) reads the KV stored through its "
                        "codec. Default: " + ",".join(DEFAULT_READ) + ", those of them that --systems ranks")
    g.add_argument("--unanswerable", type=float, default=0.0,
                   help="make this fraction of the read questions unanswerable (gold passages removed from their "
                        "candidates) and report declining on them (needs trained+retrieval and --read)")
    g.add_argument("--json", default="", help="write metrics and per-question scores here")
    g.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    g.add_argument("--scores-from", default="",
                   help="a previous --json of the same sample: take the ranking scores of the systems it has "
                        "from there instead of recomputing them (answers are always regenerated)")
    add_cli_args(p, skip=("store_url", "codec", "hot_cache_gb", "store_timeout_s"))
    return p


@dataclass
class Evaluation:
    """What the phases of one :func:`main` run share: the arguments and settings, the question
    sample with its candidates, the models loaded so far, each system's run, the answers and the report."""

    args: argparse.Namespace
    s: Settings
    index: DenseIndex
    by_id: Mapping[str, Doc]
    cands: list[Candidates]
    retrieve_s: float
    adapter: str
    base: LLM  # the base model, without the adapter
    report: dict
    subset: int
    trained_llm: LLM | None = None
    trained_reranker: Reranker | None = None
    trained_kv: LocalKV = field(default_factory=LocalKV)  # exact fp32 document KV of the trained model: reranking and reading share it
    runs: dict[str, SystemRun] = field(default_factory=dict)
    codec_kv: dict[str, LocalKV] = field(default_factory=dict)  # "int4" -> the candidates' KV through that codec (reranking and reading)
    answered: dict[str, list[str]] = field(default_factory=dict)  # answer row -> answer per question (the first n)

    def make_reranker(self, llm, instruction: str | None = None) -> Reranker:
        from hyperrag.rag.runtime import load_reranker

        return load_reranker(self.s, llm, RerankTemplate.for_tokenizer(llm.tokenizer, instruction=instruction)
                             if instruction else None)

    def codec_source(self, codec: str) -> LocalKV:
        """Every candidate's exact KV (from the trained run) stored through ``codec``, once."""
        from hyperrag.rag.kv_rounding import codec_for

        s, by_id, cands, trained_kv, codec_kv = self.s, self.by_id, self.cands, self.trained_kv, self.codec_kv
        if self.trained_reranker is None:
            raise SystemExit(f"@{codec}: the trained model must run in this process (list trained or "
                             "trained+retrieval without --scores-from covering it)")
        if codec not in codec_kv:
            texts = list(dict.fromkeys(by_id[d].text for c in cands for d in c.doc_ids))
            missing = [t for t in texts if t not in trained_kv.entries]
            for text, kv in zip(missing, self.trained_reranker.encode_docs(missing) if missing else []):
                trained_kv.put(text, kv)
            codec_kv[codec] = LocalKV(codec_for(codec, s.kv_rounding, self.trained_reranker, s.cache_dir))
            for text in texts:
                codec_kv[codec].put(text, trained_kv.entries[text][1])
        return codec_kv[codec]


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    ev = prepare(args)
    previous, old = previous_scores(args, ev.cands, ev.s.top_k)
    for name in [x.strip() for x in args.systems.split(",") if x.strip()]:
        rank_system(ev, name, previous, old)
    if (args.read or args.unanswerable) and ev.trained_reranker is None and ev.adapter and any(
            name.partition("@")[0] in ("trained", "trained+retrieval") for name in ev.runs):
        load_trained_reader_model(ev)
    if args.generate:
        generate_rows(ev)
    reader, readings = read_rows(ev) if args.read else (None, {})
    if args.unanswerable:
        unanswerable_records(ev, reader, readings)
    answer_rows(ev)
    return finish(ev)


def prepare(args: argparse.Namespace) -> Evaluation:
    """Settings, corpus and index, the question sample with its retrieved candidates, the base
    model, and the report's header: everything every system needs before it runs."""
    from hyperrag.common.settings import settings_from_args
    from hyperrag.data.corpus import load_corpus
    from hyperrag.model.loading import load_embedder, load_llm
    from hyperrag.rag.retrieval import DenseIndex

    s = settings_from_args(args)
    torch.manual_seed(s.seed)
    corpus = load_corpus(s.folder("corpus"))
    adapter = str(s.folder("adapter")) if s.adapter else ""
    by_id = corpus.by_id
    embedder = load_embedder(s.embedder, s.cache_dir, s.device)
    index = DenseIndex.load_or_build(corpus, embedder, s.embedder, s.cache_dir)
    queries = corpus.sample_queries(args.queries, s.seed)
    t0 = time.perf_counter()
    cands = retrieve(index, queries, s.top_k)
    retrieve_s = time.perf_counter() - t0
    base = load_llm(s.model, s.cache_dir, s.device, s.dtype, cpu_linear=s.cpu_linear)
    from hyperrag.model.kernels import cpu_model

    # date and cpu: what `python -m hyperrag.docs` prints beside the tables it writes from this record
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(), "corpus": str(s.corpus), "queries": len(cands), "seed": s.seed, "top_k": s.top_k,
                    "top_n": s.top_n, "mode": args.mode, "max_doc_tokens": s.max_doc_tokens,
                    "adapter": adapter, "systems": {}, "full_check": {}, "codec_check": {}}
    if adapter:
        from hyperrag.model.loading import adapter_hash
        report["adapter_hash"] = adapter_hash(adapter)
    subset = args.subset or len(cands)
    return Evaluation(args, s, index, by_id, cands, retrieve_s, adapter, base, report, subset)


def previous_scores(args: argparse.Namespace, cands: Sequence[Candidates], top_k: int) -> tuple[dict, dict]:
    """``--scores-from``: each system's ranking scores from a previous record of the same sample
    (refused when the sample or top-k differ), and that record; empty without the flag."""
    previous: dict[str, list[list[float]]] = {}
    old: dict = {}
    if args.scores_from:
        old = json.loads(Path(args.scores_from).read_text())
        if [q["qid"] for q in old["per_question"]] != [c.qid for c in cands] or old.get("top_k") != top_k:
            raise SystemExit(f"{args.scores_from}: another question sample or top-k; cannot reuse its scores")
        for q in old["per_question"]:
            for name, sc in q["scores"].items():
                previous.setdefault(name, []).append(sc)
    return previous, old


def rank_system(ev: Evaluation, name: str, previous: dict, old: dict) -> None:
    """One system's scores for the sample (its subset for wording:* and query-first), from the
    previous record when it has them, then its ranking metrics in the report."""
    from tqdm import tqdm

    cands = ev.cands
    base_name, _, codec = name.partition("@")
    n = ev.subset if (name.startswith("wording:") or name == "query-first") else len(cands)
    part = cands[:n]
    run = SystemRun(name)
    if name in previous and len(previous[name]) >= n and name != "retrieval":
        reuse_previous(ev, run, part, previous[name][:n], old)
        return
    bar = tqdm(total=len(part), desc=name, mininterval=10)
    tick = lambda i, total: bar.update(1)  # noqa: E731
    t1 = time.perf_counter()
    if name == "retrieval":
        run.scores = [list(c.cosine) for c in part]
        bar.update(len(part))
    elif name in ("zero-shot", "query-first") or name.startswith("wording:"):
        base_scores(ev, run, part, bar, tick)
    elif base_name in ("trained", "trained+retrieval"):
        trained_scores(ev, run, part, tick)
    else:
        raise SystemExit(f"unknown system {name!r}")
    bar.close()
    run.seconds = time.perf_counter() - t1 + (ev.retrieve_s if name == "retrieval" else 0.0)
    ev.runs[name] = run
    record_ranking(ev, run, part)


def reuse_previous(ev: Evaluation, run: SystemRun, part: Sequence[Candidates], scores: list[list[float]],
                   old: dict) -> None:
    """A system's ``scores`` taken from the ``--scores-from`` record ``old``, with its timing and full check."""
    name, report = run.name, ev.report
    run.scores = scores
    run.seconds = old["systems"].get(name, {}).get("seconds", 0.0)
    ev.runs[name] = run
    record_ranking(ev, run, part)  # its intervals and pairings as if ranked here
    report["systems"][name]["scores_from"] = ev.args.scores_from
    check = old.get("full_check", {}).get(name, {})
    if "ranking_agreement" in check:  # files from before the shared agreement keys lack it
        report["full_check"][name] = check


def base_scores(ev: Evaluation, run: SystemRun, part: Sequence[Candidates], bar, tick) -> None:
    """The base model's systems: zero-shot, wording:<name> and query-first (full prefill, question first)."""
    name, args, s, by_id, report = run.name, ev.args, ev.s, ev.by_id, ev.report
    instruction = WORDINGS[name.split(":", 1)[1]] if name.startswith("wording:") else None
    reranker = ev.make_reranker(ev.base, instruction)
    if name == "query-first":
        qf = QueryFirstScorer(reranker)
        for c in part:
            run.scores.append(qf.score(c.question, [by_id[d].text for d in c.doc_ids]))
            bar.update(1)
    else:
        run.scores = rerank_scores(reranker, part, by_id, args.mode, progress=tick)
        if name == "zero-shot" and args.check_full:
            full = rerank_scores(reranker, part[: args.check_full], by_id, "full")
            report["full_check"][name] = agreement(score_records(full, part, s.top_n),
                                                   score_records(run.scores, part, s.top_n))


def trained_scores(ev: Evaluation, run: SystemRun, part: Sequence[Candidates], tick) -> None:
    """The adapter's systems: trained, trained+retrieval (fused with the retriever's cosine), and
    either from a codec's stored KV (``@CODEC``); the trained model is loaded on first use."""
    from hyperrag.model.loading import adapter_meta, load_llm

    args, s, by_id, runs, report, adapter = ev.args, ev.s, ev.by_id, ev.runs, ev.report, ev.adapter
    name = run.name
    base_name, _, codec = name.partition("@")
    if not adapter:
        raise SystemExit("the trained systems need an adapter (--adapter or HYPERRAG_ADAPTER)")
    if ev.trained_llm is None:
        ev.trained_llm = load_llm(s.model, s.cache_dir, s.device, s.dtype, adapter=adapter, cpu_linear=s.cpu_linear)
    if codec:  # the same scores from document KV stored through a codec: what it costs in ranking
        if base_name not in runs:
            raise SystemExit(f"{name}: list {base_name} before it (its exact-KV run is the reference)")
        run.scores = rerank_scores(ev.trained_reranker, part, by_id, args.mode, ev.codec_source(codec), progress=tick)
    elif "trained" in runs:
        run.scores = [list(x) for x in runs["trained"].scores]
    else:
        ev.trained_reranker = reranker = ev.make_reranker(ev.trained_llm)
        run.scores = rerank_scores(reranker, part, by_id, args.mode, ev.trained_kv, progress=tick)
        if args.check_full:
            full = rerank_scores(reranker, part[: args.check_full], by_id, "full")
            report["full_check"]["trained"] = agreement(score_records(full, part, s.top_n),
                                                        score_records(run.scores, part, s.top_n))
    if base_name == "trained+retrieval":
        w = float(adapter_meta(adapter).get("retrieval_weight", 0.0))
        report["retrieval_weight"] = w
        run.scores = [fuse_scores(sc, c.cosine, w) for sc, c in zip(run.scores, part)]


def record_ranking(ev: Evaluation, run: SystemRun, part: Sequence[Candidates]) -> None:
    """A system's ranking metrics (with intervals) in the report, paired with retrieval's on the
    same questions when retrieval ran first (the reranker's own gain); a codec system's agreement
    with its exact-KV run; retrieval's metrics on the subset too, for paired comparisons."""
    name, s, report = run.name, ev.s, ev.report
    base_name, _, codec = name.partition("@")
    per_question = ranking_per_question(run, part)
    metrics = with_intervals(per_question) | {"questions": len(part)}
    if name != "retrieval" and "retrieval" in ev.runs:
        metrics |= paired_differences(per_question, ranking_per_question(ev.runs["retrieval"], part),
                                      ("recall@1", "ndcg@10"), "minus_retrieval")
    report["systems"][name] = {"ranking": metrics, "seconds": run.seconds,
                               "seconds_per_question": run.seconds / max(1, len(part))}
    if codec:  # against the exact-KV run of the same system, question by question
        exact = ev.runs[base_name]
        report["codec_check"][name] = agreement(score_records(exact.scores, part, s.top_n),
                                                score_records(run.scores, part, s.top_n)) | paired_differences(
            per_question, ranking_per_question(exact, part), ["ndcg@10"], "minus_exact")
    log.info("%s: %s", name, {k: round(v, 4) for k, v in metrics.items() if not k.endswith("_ci95")})
    if name == "retrieval":  # same questions, for a paired comparison with subset systems
        report["systems"][name]["ranking_subset"] = ranking_summary(
            SystemRun(name, run.scores[:ev.subset]), ev.cands[:ev.subset])


def load_trained_reader_model(ev: Evaluation) -> None:
    """Every trained score came from --scores-from: the model still reads (and scores what is new)."""
    from hyperrag.model.loading import load_llm

    s = ev.s
    ev.trained_llm = ev.trained_llm or load_llm(s.model, s.cache_dir, s.device, s.dtype, adapter=ev.adapter,
                                                cpu_linear=s.cpu_linear)
    ev.trained_reranker = ev.make_reranker(ev.trained_llm)


def generate_rows(ev: Evaluation) -> None:
    """``--generate``: the traditional generator's answers from each wanted system's top-n."""
    from tqdm import tqdm

    from hyperrag.rag.generate import Generator

    args, s, cands, by_id = ev.args, ev.s, ev.cands, ev.by_id
    generator = Generator(ev.base, s.max_new_tokens, s.max_doc_tokens, streams=s.cpu_streams)
    ev.report["generator_template"] = asdict(generator.prompt.template)
    cache: dict = {}
    n = min(args.generate, len(cands))
    wanted = {x.strip() for x in args.generate_systems.split(",") if x.strip()} or set(ev.runs)
    for name, run in ev.runs.items():
        if len(run.scores) >= n and name in wanted:
            bar = tqdm(total=n, desc=f"generator {name}", mininterval=10)
            ev.answered[f"{name}+generator"] = generate_answers(generator, SystemRun(name, run.scores[:n]), cands[:n],
                                                                by_id, s.top_n, cache, lambda i, t: bar.update(1))
            bar.close()


def read_rows(ev: Evaluation) -> tuple[Reader, dict[str, list[Reading]]]:
    """``--read``: the reader's answers from the top-n of each read system (``oracle``: the gold
    paragraph); returns the reader and its readings, which ``--unanswerable`` goes on from."""
    from tqdm import tqdm

    from hyperrag.rag.runtime import load_reader

    args, s, cands, by_id, runs = ev.args, ev.s, ev.cands, ev.by_id, ev.runs
    readings: dict[str, list[Reading]] = {}
    if ev.trained_reranker is None:
        raise SystemExit("--read needs a trained system (trained or trained+retrieval) in --systems")
    reader = load_reader(s.replace(abstain_threshold=0.0), ev.trained_reranker)  # answers as without declining
    ev.report["reader"] = {"span": reader.span, "selection_weight": reader.selection_weight}
    n = min(args.read, len(cands))
    read_systems = [x.strip() for x in args.read_systems.split(",") if x.strip()]
    if not read_systems:
        read_systems = [x for x in DEFAULT_READ if x == "oracle" or x in runs]
    for name in read_systems:
        run = None if name == "oracle" else runs.get(name)
        if name != "oracle" and (run is None or len(run.scores) < n):
            raise SystemExit(f"--read-systems: {name!r} is not among the ranked systems {sorted(runs)}")
        bar = tqdm(total=n, desc=f"reader {name}", mininterval=10)
        codec = name.partition("@")[2]
        source = ev.codec_source(codec) if codec else ev.trained_kv  # a codec system reads its codec's KV
        readings[name] = read_answers(reader, run, cands[:n], by_id, s.top_n, source, lambda i, t: bar.update(1),
                                      calibrated=name == CALIBRATED)
        ev.answered[f"{name}+reader"] = [r.answer for r in readings[name]]
        bar.close()
    return reader, readings


def unanswerable_records(ev: Evaluation, reader: Reader | None, readings: dict[str, list[Reading]]) -> None:
    """``--unanswerable``: a fraction of the read questions made unanswerable (see the module's
    docstring), ranked and read again; one abstain record per read question in the report."""
    from tqdm import tqdm

    from hyperrag.model.loading import adapter_meta

    args, s, index, cands, by_id, runs = ev.args, ev.s, ev.index, ev.cands, ev.by_id, ev.runs
    trained_reranker, trained_kv = ev.trained_reranker, ev.trained_kv
    if CALIBRATED not in readings or trained_reranker is None:
        raise SystemExit(f"--unanswerable needs {CALIBRATED} ranked in this process and read (--read N)")
    n = len(readings[CALIBRATED])
    chosen = pick_unanswerable(n, args.unanswerable, s.seed)
    w = float(adapter_meta(ev.adapter).get("retrieval_weight", 0.0))
    records = []
    bar = tqdm(total=len(chosen), desc="unanswerable", mininterval=10)
    for i, c in enumerate(cands[:n]):
        if i not in chosen:
            records.append(abstain_record(readings[CALIBRATED][i], runs[CALIBRATED].scores[i], c, False, s.top_n,
                                          c.doc_ids))
            continue
        u = without_gold(index, c, s.top_k, by_id)
        known = dict(zip(c.doc_ids, runs[CALIBRATED].scores[i]))  # a pair's score does not depend on the others
        new = [j for j, d in enumerate(u.doc_ids) if d not in known]
        if new:
            raw = trained_reranker.score(c.question, [by_id[u.doc_ids[j]].text for j in new], args.mode,
                                         trained_kv if args.mode == "reuse" else None).scores
            known |= dict(zip([u.doc_ids[j] for j in new], fuse_scores(raw, [u.cosine[j] for j in new], w)))
        scores = [known[d] for d in u.doc_ids]
        top = ranked_order(scores)[: s.top_n]
        reading = reader.read(c.question, [by_id[u.doc_ids[j]].text for j in top], [scores[j] for j in top], "kv",
                              trained_kv)
        records.append(abstain_record(reading, scores, u, True, s.top_n, u.doc_ids))
        bar.update(1)
    bar.close()
    ev.report["abstain"] = {"system": CALIBRATED, "fraction": args.unanswerable}
    ev.report["abstain_records"] = records


def answer_rows(ev: Evaluation) -> None:
    """Each answer row's EM/F1 with intervals in the report, paired against retrieval-only RAG,
    against the reader over the retriever's order, and a codec's reading against exact KV."""
    s, cands, answered, report = ev.s, ev.cands, ev.answered, ev.report
    reference = answered.get("retrieval+generator")  # retrieval-only RAG: what the others are paired against
    reader_reference = answered.get("retrieval+reader")  # the same reader over the retriever's order
    for row, answers in answered.items():
        per = answer_scores(answers, cands)
        entry = with_intervals(per) | {"questions": len(answers), "top_n": 1 if row.startswith("oracle") else s.top_n}
        if reference is not None and row != "retrieval+generator":
            entry |= paired_differences(per, answer_scores(reference, cands), ("em", "f1"), "minus_retrieval")
        if reader_reference is not None and row.endswith("+reader") and row != "retrieval+reader":
            entry |= paired_differences(per, answer_scores(reader_reference, cands), ("em", "f1"),
                                        "minus_retrieval_reader")
        system, _, codec = row.removesuffix("+reader").partition("@")
        exact_row = f"{system}+reader"
        if codec and exact_row in answered:  # a codec's reading, paired with the same reading from exact KV
            entry |= paired_differences(per, answer_scores(answered[exact_row], cands), ("em", "f1"), "minus_exact")
            entry["same_answer_as_exact"] = sum(a == b for a, b in zip(answers, answered[exact_row])) / max(1, len(answers))
        report.setdefault("answers", {})[row] = entry
        log.info("%s: EM %.3f F1 %.3f", row, entry["em"], entry["f1"])


def finish(ev: Evaluation) -> dict:
    """Per-question scores and answers, the calibration and abstain sections, the printed table,
    and the record written to ``--json``."""
    from hyperrag.rag.calibration import load_trust

    args, s, report, adapter = ev.args, ev.s, ev.report, ev.adapter
    report["per_question"] = [
        {"qid": c.qid, "gold": c.gold, "doc_ids": c.doc_ids, "cosine": c.cosine,
         "scores": {name: run.scores[i] for name, run in ev.runs.items() if i < len(run.scores)},
         "answers": {row: answers[i] for row, answers in ev.answered.items() if i < len(answers)}}
        for i, c in enumerate(ev.cands)
    ]
    trust = load_trust(adapter) if adapter else None  # fitted for the fused score with the adapter's weight
    measure_trust(report, trust, s.abstain_threshold)
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


def _ci(row: dict, key: str) -> str:
    lo, hi = row.get(key + "_ci95", (row[key], row[key]))
    return f"{row[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def format_table(report: dict) -> str:
    """The ranking table (recall, MRR, NDCG with 95% intervals), then the answer table."""
    lines = [f"{report['queries']} questions, top-{report['top_k']} candidates, answers from top-{report['top_n']}",
             f"{'system':22s} {'n':>4s} {'recall@1 [95% CI]':>22s} {'recall@5':>9s} {'mrr@10':>9s} "
             f"{'ndcg@10 [95% CI]':>22s} {'s/q':>6s}"]
    for name, row in report["systems"].items():
        r = row["ranking"]
        lines.append(f"{name:22s} {r['questions']:4d} {_ci(r, 'recall@1'):>22s} {r['recall@5']:9.4f} "
                     f"{r['mrr@10']:9.4f} {_ci(r, 'ndcg@10'):>22s} {row['seconds_per_question']:6.2f}")
    for name, chk in report.get("full_check", {}).items():
        lines.append(f"{name}: {report['mode']} vs full on {chk['compared_queries']} questions: max |diff| "
                     f"{chk['max_abs_score_diff']:.2e}, identical rankings {chk['ranking_agreement']:.0%}, "
                     f"same top-{report['top_n']} {chk['top_n_agreement']:.0%}")
    for name, chk in report.get("codec_check", {}).items():
        lo, hi = chk["ndcg@10_minus_exact_ci95"]
        lines.append(f"{name} vs exact KV on {chk['compared_queries']} questions: max / mean |diff| "
                     f"{chk['max_abs_score_diff']:.3f} / {chk['mean_abs_score_diff']:.4f}, identical rankings "
                     f"{chk['ranking_agreement']:.0%}, same top-{report['top_n']} {chk['top_n_agreement']:.0%}, "
                     f"NDCG@10 {chk['ndcg@10_minus_exact']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    if report.get("answers"):
        lines.append(f"{'answers (system+answerer)':30s} {'n':>4s} {'EM [95% CI]':>22s} {'F1 [95% CI]':>22s} "
                     f"{'F1 - retrieval+reader':>24s} {'F1 - retrieval+generator':>24s}")
        for name, row in report["answers"].items():
            paired = [f"{row[k]:+.3f} [{row[k + '_ci95'][0]:+.3f}, {row[k + '_ci95'][1]:+.3f}]" if k in row else ""
                      for k in ("f1_minus_retrieval_reader", "f1_minus_retrieval")]
            lines.append(f"{name:30s} {row['questions']:4d} {_ci(row, 'em'):>22s} {_ci(row, 'f1'):>22s} "
                         f"{paired[0]:>24s} {paired[1]:>24s}")
            if "f1_minus_exact" in row:
                lo, hi = row["f1_minus_exact_ci95"]
                lines.append(f"  {name} vs the same reading from exact KV: F1 {row['f1_minus_exact']:+.3f} "
                             f"[{lo:+.3f}, {hi:+.3f}], same answer {row['same_answer_as_exact']:.0%}")
    if report.get("calibration"):
        c = report["calibration"]
        lines.append(f"calibrated relevance ({c['system']}): ECE {c['ece']:.4f} over {c['pairs']} candidates "
                     f"(mean P {c['mean_probability']:.3f}, relevant {c['relevant_rate']:.3f}); top passage ECE "
                     f"{c['ece_top1']:.4f} (mean P {c['top1_mean_probability']:.3f}, relevant {c['top1_relevant_rate']:.3f})")
    if report.get("abstain"):
        a = report["abstain"]
        lines.append(f"declining ({a['system']}): {a['rule' if 'rule' in a else 'fused']['questions']} questions, "
                     f"{a['fused']['unanswerable']} made unanswerable")
        lines.append(f"{'signal':12s} {'AUROC [95% CI]':>22s} {'threshold':>10s} {'unans. declined':>16s} "
                     f"{'ans. answered':>14s} {'F1 answerable':>14s} {'(never declining)':>17s} {'F1 overall':>11s}")
        for name in ("rule", "fused", "likelihood"):
            row = a.get(name)
            if not row or "auroc" not in row:
                continue
            line = f"{name:12s} {_ci(row, 'auroc'):>22s}"
            if "threshold" in row:
                line += (f" {row['threshold']:10.3f} {row['unanswerable_declined']:16.3f} {row['answerable_answered']:14.3f}"
                         f" {row['f1_answerable']:14.3f} {row['f1_answerable_without_declining']:17.3f}"
                         f" {row['f1_overall']:11.3f}")
            lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
