"""The reader: answers read from the reranked documents' stored KV, one document per batch row.

The reader's prompt is the reranker's plus an answer cue,
``[prefix][document][question][suffix] Answer:``, and one adapter is trained for both jobs
(:mod:`hyperrag.train_reranker`). So the document KV the store already holds for reranking is
exactly the reader's too. And the reranker's reuse run has just computed ``[question][suffix]``
over each of these documents: the engine keeps that KV (``keep_question_kv``), so at answer time
only the cue and the answer's own tokens run (without it, ``[question][suffix][cue]`` does). The
top-n documents sit in the rows of the one static batch buffer (:mod:`hyperrag.rag.batch_runner`), the
cue (or the question) runs on all rows in one forward, and the rows decode together. Each row
yields a candidate answer from its own document; the answer is the candidate with the best
``ranking score + selection_weight x answer log-likelihood``.

``span`` decoding (the default) keeps each row's answer a span of its own document: at every
step only tokens that continue some span of the document's tokens (or the end token, once the
answer is not empty) may be chosen. SQuAD answers are spans, so this removes paraphrase and
restatement; the log-likelihood is the model's own, unconstrained probability of the tokens.
``first_tokens`` > 1 reads each document in that many rows, whose answers start with its 1st,
2nd, ... likeliest first token and then continue greedily; each row is a candidate (greedy
commits at the first token, where most wrong answers go wrong: a wrong entity, a word too early
or late). On 300 questions of 3 held-out SQuAD train articles (shipped adapter, free decoding)
2 rows lifted the oracle (gold paragraph alone) from F1 0.685 / EM 0.583 to 0.694 / 0.597 (3:
0.693) but the reader on the reranked top 3 only from 0.630 / 0.533 to 0.632 / 0.540, and on
the 300 dev questions, paired, F1 moved +0.001 (-0.015 to +0.017; oracle -0.003) and EM +0.010
(-0.007 to +0.030), while a reading took 232 ms instead of 178 (median, 24 shipped questions,
interleaved). So the default stays 1.

``mode="full"`` computes the documents' KV instead of loading it (``reader_full``: what a
system without a KV store pays); the answers are the same up to float rounding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from hyperrag.model.decoder import RowGroup
from hyperrag.model.batch_kv import row_runs
from hyperrag.rag.batch_runner import BatchRunner, DocKVSource, QueryRow, missing_kv_warning, query_batches
from hyperrag.rag.calibration import Trust

READ_MODES = ("kv", "full")


@dataclass
class Candidate:
    """One row's answer: read from one document."""

    doc: int  # index into the documents given to :meth:`Reader.read`
    text: str
    logprob: float  # sum of the answer tokens' log-probabilities, the end token included
    tokens: int
    start: int = -1  # character span of ``text`` in the document (-1: not found verbatim)
    end: int = -1
    pruned: bool = False  # decoding stopped once it could no longer be chosen: ``text`` is cut short


@dataclass
class Reading:
    answer: str  # the chosen candidate's text, also when the reader declines (``found`` False)
    doc: int  # which document the answer was read from (-1: none)
    start: int
    end: int
    candidates: list[Candidate]
    logprob: float = 0.0  # the chosen answer's log-likelihood
    confidence: float | None = None  # P(the answer is in these documents); None: no calibration applies
    found: bool = True  # False: declined, the evidence is too weak ("not found in these documents")
    load_s: float = 0.0  # reading the documents' KV into the batch buffer
    compute_s: float = 0.0  # the question, the decode steps (and document encoding in full mode)
    encoded_docs: int = 0  # documents whose KV was computed because the store lacked it
    warnings: list[str] = field(default_factory=list)


def selection_value(rank_score: float, logprob: float, weight: float) -> float:
    """What the answer is chosen by: ranking score + ``weight`` x answer log-likelihood (the
    weight is tuned on SQuAD train)."""
    return rank_score + weight * logprob


def select(candidates: Sequence[Candidate], rank_scores: Sequence[float], weight: float) -> int:
    """Index of the candidate with the best :func:`selection_value`; empty answers are never
    chosen while another exists."""
    best, best_value = -1, float("-inf")
    for i, c in enumerate(candidates):
        value = selection_value(rank_scores[c.doc], c.logprob, weight) - (1e9 if not c.text else 0.0)
        if value > best_value:
            best, best_value = i, value
    return best


class SpanConstraint:
    """Which tokens may come next so that a row's answer stays a span of its document's tokens."""

    def __init__(self, doc_ids: Sequence[int], end_id: int):
        self.doc = list(doc_ids)
        self.end_id = end_id
        self.starts = list(range(len(self.doc)))  # spans still matching the answer so far
        self.length = 0

    def allowed(self) -> list[int]:
        nxt = {self.doc[s + self.length] for s in self.starts if s + self.length < len(self.doc)}
        if self.length:
            nxt.add(self.end_id)
        return sorted(nxt)

    def advance(self, token: int) -> None:
        self.starts = [s for s in self.starts if s + self.length < len(self.doc) and self.doc[s + self.length] == token]
        self.length += 1


class Reader:
    """Reads answers with the reranker's batch runner: its model, prompt and prefix KV (thread-safe:
    one batch at a time)."""

    def __init__(self, runner: BatchRunner, max_rows: int = 8, max_new_tokens: int = 16, span: bool = True,
                 selection_weight: float = 1.0, draft_tokens: int = 8, prune: bool = True, first_tokens: int = 1,
                 trust: Trust | None = None, abstain_threshold: float = 0.0):
        # The reranker's runner: its model, prompt, prefix KV and batch buffer, whose query
        # columns it sized for the question, cue and answer. Reading and reranking take turns
        # under its lock; its rows hold the documents of one question or, batched, of several.
        self.runner = runner
        self.decoder = runner.decoder
        self.prompt = runner.prompt
        self.layout = runner.layout
        self.max_rows = max_rows  # documents read per question
        self.max_new_tokens = max_new_tokens
        self.span = span
        self.selection_weight = selection_weight
        self.draft_tokens = draft_tokens  # document tokens verified per decode step (0: one token a step)
        if first_tokens < 1:
            raise ValueError(f"the reader's first_tokens must be >= 1, got {first_tokens}")
        self.first_tokens = first_tokens  # rows per document, each from another likely first token
        # The answer's confidence from the calibrated ranking score and its likelihood; declined
        # below the threshold (0: never). Fitted for the adapter's fused score only.
        self.trust = trust
        self.abstain_threshold = abstain_threshold
        # Stop rows that can no longer be chosen (the answer is the same; the others' texts are
        # cut). Off where every candidate is wanted whole: tuning the weight on the same candidates.
        self.prune = prune
        if max_new_tokens > runner.answer_tokens:
            raise ValueError(f"the reader's {max_new_tokens} answer tokens do not fit the batch buffer "
                             f"(room for {runner.answer_tokens}: build the Reranker with answer_tokens={max_new_tokens})")
        self.tokenizer = runner.llm.tokenizer
        self.stop_ids = {self.prompt.answer_end_id, self.tokenizer.eos_token_id}

    def read(self, question: str, docs: Sequence[str], rank_scores: Sequence[float], mode: str = "kv",
             source: DocKVSource | None = None, calibrated: bool = True) -> Reading:
        """Read ``question`` from each of ``docs`` (best first) and pick one answer."""
        return self.read_many([(question, docs, rank_scores)], mode, source, calibrated=calibrated)[0]

    def read_many(self, requests: Sequence[tuple[str, Sequence[str], Sequence[float]]], mode: str = "kv",
                  source: DocKVSource | None = None,
                  question_kv: Sequence[Sequence[torch.Tensor | None]] | None = None,
                  calibrated: bool = True) -> list[Reading]:
        """:meth:`read` for several (question, documents, ranking scores) requests at once: their
        rows share batches and decode steps (concurrent users; :mod:`hyperrag.workbench.batcher`). Each
        reading equals reading alone up to float rounding; its times are the whole call's.
        ``question_kv`` (per request, per document): the KV of ``[question][suffix]`` over that
        document, as the reranker's reuse run left it (``keep_question_kv``); those rows run only
        the answer cue instead of the whole question. ``calibrated``: the ranking scores are the
        fused scores ``trust`` was fitted on (not the retriever's cosine), so each answer gets a
        confidence and is declined below ``abstain_threshold``."""
        if mode not in READ_MODES:
            raise ValueError(f"unknown read mode {mode!r}; choose one of {READ_MODES}")
        if mode == "kv" and source is None:
            raise ValueError("reading from stored KV needs a document KV source (a KVStore)")
        readings = [Reading("", -1, -1, -1, []) for _ in requests]
        rows: list[QueryRow] = []
        for r, (question, docs, _) in enumerate(requests):
            if len(docs) > self.max_rows:
                readings[r].warnings.append(f"the reader reads at most {self.max_rows} documents: the rest were left out")
            query = self.prompt.read_query(question).ids
            kvs = question_kv[r] if question_kv is not None else [None] * len(docs)
            rows += [QueryRow(r, i, d, query, kv, b) for i, (d, kv) in enumerate(zip(list(docs)[: self.max_rows], kvs))
                     for b in range(self.first_tokens)]
        load_s = compute_s = 0.0
        scores = [rank_scores for _, _, rank_scores in requests]
        best = [float("-inf")] * len(requests)  # per request: the best finished candidate's value so far
        with self.runner.lock:
            for batch in query_batches(rows, self.runner.doc_tokens, self.layout.max_batch):
                batch_load, batch_compute = self._read(batch, mode, source, readings, scores, best)
                load_s, compute_s = load_s + batch_load, compute_s + batch_compute
        for reading, (_, docs, rank_scores) in zip(readings, requests):
            reading.load_s, reading.compute_s = load_s, compute_s
            reading.candidates.sort(key=lambda c: c.doc)
            if reading.encoded_docs:
                reading.warnings.append(missing_kv_warning(reading.encoded_docs))
            chosen = select(reading.candidates, rank_scores, self.selection_weight)
            if chosen >= 0:
                c = reading.candidates[chosen]
                reading.answer, reading.doc, reading.start, reading.end = c.text, c.doc, c.start, c.end
                reading.logprob = c.logprob
                if calibrated and self.trust is not None:
                    reading.confidence = self.trust.confidence(rank_scores[: self.max_rows], c.logprob)
                    reading.found = reading.confidence >= self.abstain_threshold
        return readings

    def _read(self, rows: list[QueryRow], mode: str, source: DocKVSource | None, readings: list[Reading],
              scores: list[Sequence[float]], best: list[float]) -> tuple[float, float]:
        """One batch of rows (ascending document length): their candidates go to their
        requests' readings (``scores``: their ranking scores; ``best``: see :meth:`_decode`).
        Returns (seconds loading KV, seconds computing)."""
        layout = self.layout
        texts = [row.text for row in rows]
        lens = [self.runner.doc_tokens(t) for t in texts]
        t0 = time.perf_counter()
        load_s = 0.0
        if mode == "kv":
            load_s, missing = self.runner.load_rows(texts, lens, source)
            for r in missing:
                readings[rows[r].request].encoded_docs += 1
        else:
            self.runner.encode_rows([self.prompt.doc_ids(t) for t in texts], layout.kv.rows(slice(0, len(rows))))
        hidden, groups, width, query_lens, written = self._run_question(rows, lens)
        tokens = self._decode(hidden, rows, lens, groups, width, query_lens, written,
                              [scores[row.request][row.doc] for row in rows], best)
        compute_s = time.perf_counter() - t0 - load_s  # documents the store lacked count as compute
        for row, (answer, logprob, pruned) in zip(rows, tokens):
            text = self.tokenizer.decode(answer, skip_special_tokens=True).strip()
            start = row.text.find(text) if text else -1
            readings[row.request].candidates.append(Candidate(row.doc, text, logprob, len(answer), start,
                                                              start + len(text) if start >= 0 else -1, pruned))
        return load_s, compute_s

    def _run_question(self, rows: list[QueryRow], lens: list[int]
                      ) -> tuple[torch.Tensor, list[RowGroup], int, list[int], torch.Tensor]:
        """The reader's prompt after the documents, run on rows ``0..``: each row's last hidden
        state [rows, H], the row groups, the query columns ``width``, each row's tokens in them,
        and the answer columns already written [rows, A].

        Questions of different lengths are right-padded to ``width`` columns; each row's answer
        follows its own question (positions) and never attends to the padding (step_mask). When
        every row carries its question's KV from the reranker, that KV is copied into the query
        columns and only the answer cue runs, as the first answer columns: the same prompt, its
        question computed once for both jobs."""
        layout, device, n = self.layout, self.decoder.device, len(rows)
        kv = layout.kv.rows(slice(0, n))
        none = torch.zeros(n, 0, dtype=torch.bool, device=device)  # no answer column written yet
        if any(row.question_kv is None for row in rows):
            ids, last = self.runner.batch_ids([row.query for row in rows])
            pos, groups = layout.query_groups(lens, ids.shape[1])
            hidden = self.decoder.forward_groups(ids, pos, kv, groups, out_index=last)
            return hidden, groups, ids.shape[1], [len(row.query) for row in rows], none
        asked = [row.question_kv.shape[3] for row in rows]
        width, p, cue = max(asked), layout.prefix_len, self.prompt.answer_cue_ids
        groups, cue_groups = [], []
        for lo, hi, slots in layout.row_splits(lens, width):
            for r in range(lo, hi):
                kv.row_view(r, p + slots, asked[r]).copy_(rows[r].question_kv)
            groups.append(RowGroup(lo, hi, p + slots))  # where the question is; its mask is not needed
            cue_groups.append(RowGroup(lo, hi, p + slots + width, layout.step_mask(
                lens[lo:hi], slots, asked[lo:hi], width, none[lo:hi], len(cue))))
        ids = torch.tensor([cue] * n, device=device)
        pos = torch.tensor([p + d + q for d, q in zip(lens, asked)], device=device)[:, None]
        pos = pos + torch.arange(len(cue), device=device)
        last = torch.full((n,), len(cue) - 1, device=device)
        hidden = self.decoder.forward_groups(ids, pos, kv, cue_groups, out_index=last)
        return hidden, groups, width, asked, torch.ones(n, len(cue), dtype=torch.bool, device=device)

    def _decode(self, hidden: torch.Tensor, rows: list[QueryRow], lens: list[int], groups: list[RowGroup],
                width: int, query_lens: list[int], written: torch.Tensor, rank: list[float],
                best: list[float]) -> list[tuple[list[int], float, bool]]:
        """Greedy decoding of every row at once, after :meth:`_run_question`; per row its answer
        tokens, log-likelihood and whether it was pruned. ``written`` [rows, A] marks the answer
        columns that hold kept tokens (it grows by each step's columns).

        Answers are mostly spans of their documents, so each step feeds a row its next token and,
        as a draft, the up to ``draft_tokens`` document tokens that follow the answer so far where
        it occurs in the document (prompt-lookup decoding). One forward scores the whole draft and
        a row keeps the draft tokens greedy decoding chooses anyway: the answers of one-token steps
        (up to float rounding) in fewer forwards (on 2 CPU cores a step of 9 tokens per row cost
        1.5x a step of one, 3 rows). A rejected draft leaves buffer columns no later token attends
        to. A row whose answer is done leaves the batch (rows of several
        questions finish at very different steps).

        Pruning (branch and bound, exact): a row's selection value ``rank + w x log-likelihood``
        only falls as it decodes (every token's log-probability is <= 0, w >= 0), so a row whose
        value so far is below a finished non-empty answer's of the same request (``best``, kept
        across batches) can never be chosen and leaves the batch. Rows reading a weaker document
        often ramble to ``max_new_tokens`` one token a step, no draft matching; they held the
        whole batch's decode open."""
        device, n, p = self.decoder.device, len(rows), self.layout.prefix_len
        kv = self.layout.kv.rows(slice(0, n))
        tail = len(self.prompt.tail_ids)
        docs = [list(self.prompt.doc_ids(row.text)[:-tail]) for row in rows]
        limits = [SpanConstraint(d, self.prompt.answer_end_id) if self.span else None for d in docs]
        next_pos = [p + d + q + int(w.sum()) for d, q, w in zip(lens, query_lens, written)]
        columns = kv.tensor.shape[-2] - width - max(g.start for g in groups)  # answer columns every group has
        answers: list[list[int]] = [[] for _ in range(n)]
        logprob = [0.0] * n
        logp = torch.log_softmax(self.decoder.logits(hidden).float(), -1)[:, None]  # [rows, fed, vocab]
        fed: dict[int, list[int]] = {r: [] for r in range(n)}  # per row in logp: the tokens just run
        w, pruned = self.selection_weight, [False] * n
        while True:
            going: dict[int, int] = {}  # row -> its next token, for the rows that go on
            kept = torch.zeros(n, logp.shape[1], dtype=torch.bool, device=device)
            for j, (r, tokens) in enumerate(fed.items()):
                kept[r, 0] = bool(tokens)  # the token chosen last step
                for i in range(logp.shape[1]):
                    token = self._choose(logp[j, i], limits[r], 0 if answers[r] else rows[r].branch)
                    logprob[r] += float(logp[j, i, token])
                    if token in self.stop_ids or len(answers[r]) >= self.max_new_tokens:
                        break
                    answers[r].append(token)
                    if limits[r] is not None:
                        limits[r].advance(token)
                    if i + 1 < len(tokens) and tokens[i + 1] == token:
                        kept[r, i + 1] = True  # the draft had it: its K/V are written already
                        continue
                    going[r] = token
                    break
                next_pos[r] += int(kept[r].sum())
            if any(fed.values()):  # not the question's run: this step's columns follow the answers
                written = torch.cat([written, kept], 1)
            if self.prune and w >= 0:
                for r in fed:
                    if r not in going and answers[r]:
                        best[rows[r].request] = max(best[rows[r].request], selection_value(rank[r], logprob[r], w))
                for r in [r for r in going if selection_value(rank[r], logprob[r], w) < best[rows[r].request]]:
                    del going[r]
                    pruned[r] = True
            if not going:
                break
            active = sorted(going)
            # As many draft tokens as leave room, should every draft be rejected, for the tokens
            # the longest answer may still take one step each.
            room = columns - written.shape[1] - (self.max_new_tokens - min(len(answers[r]) for r in active))
            m = max(1, min(self.draft_tokens + 1, room))
            fed = {r: [going[r]] + draft(docs[r], answers[r], m - 1) for r in active}
            ids = torch.tensor([f + [f[-1]] * (m - len(f)) for f in fed.values()], device=device)
            pos = torch.tensor([next_pos[r] for r in active], device=device)[:, None] + torch.arange(m, device=device)
            at = width + written.shape[1]
            step_groups = [RowGroup(lo, hi, g.start + at, self.layout.step_mask(
                lens[lo:hi], g.start - p, query_lens[lo:hi], width, written[lo:hi], m))
                for g in groups for lo, hi in row_runs([r for r in active if g.lo <= r < g.hi])]
            hidden = self.decoder.forward_groups(ids, pos, kv, step_groups)
            logp = torch.log_softmax(self.decoder.logits(hidden).float(), -1)
        return list(zip(answers, logprob, pruned))

    @staticmethod
    def _choose(logp: torch.Tensor, limit: SpanConstraint | None, rank: int = 0) -> int:
        """The greedy token: the most likely one, or the most likely one ``limit`` allows
        (``rank`` > 0: the (rank+1)-th most likely instead, where there are that many)."""
        allowed = None if limit is None else torch.tensor(limit.allowed(), device=logp.device)
        scores = logp if allowed is None else logp[allowed]
        best = int(scores.topk(min(rank + 1, scores.numel())).indices[-1]) if rank else int(scores.argmax())
        return best if allowed is None else int(allowed[best])


def draft(doc: Sequence[int], answer: Sequence[int], k: int) -> list[int]:
    """Up to ``k`` document tokens that follow ``answer``'s longest suffix (of at most 4 tokens)
    found in ``doc``, at its first occurrence; empty when even its last token is not there."""
    if not k or not answer:
        return []
    for n in range(min(4, len(answer)), 0, -1):
        tail = list(answer[-n:])
        for s in range(len(doc) - n):
            if doc[s : s + n] == tail:
                return list(doc[s + n : s + n + k])
    return []
