"""The reader: answers read from the reranked documents' stored KV, one document per batch row.

The reader's prompt is the reranker's plus an answer cue,
``[prefix][document][question][suffix] Answer:``, and one adapter is trained for both jobs
(:mod:`hyperrag.train_reranker`). So the document KV the store already holds for reranking is
exactly the reader's too: at answer time only ``[question][suffix][cue]`` and the answer's own
tokens run. The top-n documents sit in the rows of one static batch buffer (the reranker's
layout type), the question runs on all rows in one forward, and the rows decode together, one
token per row per step. Each row yields a candidate answer from its own document; the answer is
the candidate with the best ``ranking score + selection_weight x answer log-likelihood``.

``span`` decoding (the default) keeps each row's answer a span of its own document: at every
step only tokens that continue some span of the document's tokens (or the end token, once the
answer is not empty) may be chosen. SQuAD answers are spans, so this removes paraphrase and
restatement; the log-likelihood is the model's own, unconstrained probability of the tokens.

``mode="full"`` computes the documents' KV instead of loading it (``reader_full``: what a
system without a KV store pays); the answers are the same up to float rounding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from hyperrag.decoder import RowGroup
from hyperrag.kv.layout import StaticLayout
from hyperrag.rerank import DocKVSource, Reranker, missing_kv_warning

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


@dataclass
class Reading:
    answer: str
    doc: int  # which document the answer was read from (-1: none)
    start: int
    end: int
    candidates: list[Candidate]
    load_s: float = 0.0  # reading the documents' KV into the batch buffer
    compute_s: float = 0.0  # the question, the decode steps (and document encoding in full mode)
    encoded_docs: int = 0  # documents whose KV was computed because the store lacked it
    warnings: list[str] = field(default_factory=list)


def select(candidates: Sequence[Candidate], rank_scores: Sequence[float], weight: float) -> int:
    """Index of the chosen candidate: ranking score + ``weight`` x answer log-likelihood (the
    weight is tuned on SQuAD train); empty answers are never chosen while another exists."""
    best, best_value = -1, float("-inf")
    for i, c in enumerate(candidates):
        value = rank_scores[c.doc] + weight * c.logprob - (1e9 if not c.text else 0.0)
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
    """Reads answers with the reranker's model, prompt and prefix KV (thread-safe: one at a time)."""

    def __init__(self, reranker: Reranker, max_rows: int = 8, max_new_tokens: int = 16, span: bool = True,
                 selection_weight: float = 1.0):
        self.reranker = reranker
        self.decoder = reranker.decoder
        self.prompt = reranker.prompt
        self.max_new_tokens = max_new_tokens
        self.span = span
        self.selection_weight = selection_weight
        if max_new_tokens > reranker.answer_tokens:
            raise ValueError(f"the reader's {max_new_tokens} answer tokens do not fit the reranker's batch buffer "
                             f"(room for {reranker.answer_tokens}: build the Reranker with answer_tokens={max_new_tokens})")
        # The first rows of the reranker's own layout, whose query columns the reranker sized for
        # the question, cue and answer (reading and reranking take turns under its lock).
        rerank = reranker.layout
        self.layout = StaticLayout(self.decoder, reranker.prefix_kv, min(max_rows, rerank.max_batch),
                                   reranker.max_doc_len, rerank.max_query_len, kv=rerank.kv)
        tok = reranker.llm.tokenizer
        self.stop_ids = {self.prompt.answer_end_id, tok.eos_token_id}
        self._lock = reranker.lock  # one model, one scratch buffer: reading and reranking take turns

    def read(self, question: str, docs: Sequence[str], rank_scores: Sequence[float], mode: str = "kv",
             source: DocKVSource | None = None) -> Reading:
        """Read ``question`` from each of ``docs`` (best first) and pick one answer."""
        if mode not in READ_MODES:
            raise ValueError(f"unknown read mode {mode!r}; choose one of {READ_MODES}")
        if mode == "kv" and source is None:
            raise ValueError("reading from stored KV needs a document KV source (a KVStore)")
        if not docs:
            return Reading("", -1, -1, -1, [])
        cut = len(docs) > self.layout.max_batch
        docs = list(docs)[: self.layout.max_batch]
        with self._lock:
            reading = self._read(question, docs, mode, source)
        if cut:
            reading.warnings.append(f"the reader reads at most {self.layout.max_batch} documents: the rest were left out")
        chosen = select(reading.candidates, rank_scores, self.selection_weight)
        if chosen >= 0:
            c = reading.candidates[chosen]
            reading.answer, reading.doc, reading.start, reading.end = c.text, c.doc, c.start, c.end
        return reading

    def _read(self, question: str, docs: list[str], mode: str, source: DocKVSource | None) -> Reading:
        layout, device = self.layout, self.decoder.device
        query = self.prompt.read_query(question)
        order = sorted(range(len(docs)), key=lambda i: self.reranker.doc_tokens(docs[i]))  # rows by length
        texts = [docs[i] for i in order]
        lens = [self.reranker.doc_tokens(t) for t in texts]
        reading = Reading("", -1, -1, -1, [])
        t0 = time.perf_counter()
        if mode == "kv":
            reading.load_s, reading.encoded_docs = self.reranker.load_rows(layout, texts, lens, source)
            t0 += reading.load_s  # documents the store lacked count as compute
        else:
            self.reranker.encode_rows([self.prompt.doc_ids(t) for t in texts], layout.kv)
        n_query = len(query.ids)
        pos, groups = layout.query_groups(lens, n_query)
        ids = torch.tensor([query.ids], device=device).expand(len(texts), -1)
        last = torch.full((len(texts),), n_query - 1, device=device)
        hidden = self.decoder.forward_groups(ids, pos, layout.kv, groups, out_index=last)
        tokens = self._decode(hidden, texts, lens, groups, pos[:, -1] + 1, n_query)
        reading.compute_s = time.perf_counter() - t0
        tok = self.reranker.llm.tokenizer
        for row, (answer, logprob) in enumerate(tokens):
            text = tok.decode(answer, skip_special_tokens=True).strip()
            start = docs[order[row]].find(text) if text else -1
            reading.candidates.append(Candidate(order[row], text, logprob, len(answer), start,
                                                start + len(text) if start >= 0 else -1))
        reading.candidates.sort(key=lambda c: c.doc)
        if reading.encoded_docs:
            reading.warnings.append(missing_kv_warning(reading.encoded_docs))
        return reading

    def _decode(self, hidden: torch.Tensor, texts: list[str], lens: list[int], groups: list[RowGroup],
                next_pos: torch.Tensor, n_query: int) -> list[tuple[list[int], float]]:
        """Greedy decoding of every row at once; per row its answer tokens and log-likelihood."""
        device, rows = self.decoder.device, len(texts)
        tail = len(self.prompt.tail_ids)
        limits = [SpanConstraint(self.prompt.doc_ids(t)[:-tail], self.prompt.answer_end_id) if self.span else None
                  for t in texts]
        answers: list[list[int]] = [[] for _ in range(rows)]
        logprob = [0.0] * rows
        done = [False] * rows
        for step in range(self.max_new_tokens + 1):
            logp = torch.log_softmax(self.decoder.logits(hidden).float(), -1)
            picked = []
            for r in range(rows):
                if done[r]:
                    picked.append(self.prompt.answer_end_id)
                    continue
                if limits[r] is not None:
                    allowed = torch.tensor(limits[r].allowed(), device=device)
                    token = int(allowed[logp[r, allowed].argmax()])
                else:
                    token = int(logp[r].argmax())
                logprob[r] += float(logp[r, token])
                if token in self.stop_ids or step == self.max_new_tokens:
                    done[r] = True
                else:
                    answers[r].append(token)
                    if limits[r] is not None:
                        limits[r].advance(token)
                picked.append(token)
            if all(done):
                break
            col = n_query + step  # this step's token goes right after the query and earlier tokens
            step_groups = [RowGroup(g.lo, g.hi, g.start + col, self.layout.query_mask(
                lens[g.lo:g.hi], g.start - self.layout.prefix_len, col + 1)[:, :, -1:]) for g in groups]
            ids = torch.tensor(picked, device=device)[:, None]
            hidden = self.decoder.forward_groups(ids, (next_pos + step)[:, None], self.layout.kv, step_groups)[:, -1]
        return list(zip(answers, logprob))
