"""The query-first baseline: the usual prompt, question before document, scored as the reranker scores.

It cannot reuse document KV (the document follows the question), so it is what the doc-first
reranker is measured against: by the evaluation (``query-first`` system) and by the bench (its
query-first-with-prefix-cache timing).
"""
from __future__ import annotations

from typing import Sequence

import torch

from hyperrag.model.decoder import causal_mask
from hyperrag.model.prompts import ChatFormat
from hyperrag.rag.batch_runner import length_batches
from hyperrag.rag.rerank import Reranker


class QueryFirstScorer:
    """``[instruction][question][document][suffix]``: the usual prompt, question before document,
    so no document KV can be shared across questions. Same yes/no score. ``cached=True`` is the
    strongest prefix-caching baseline a vLLM user gets (automatic prefix caching): the
    ``[instruction][question]`` KV is computed once per question and shared by its candidates,
    and only each document's tokens and the suffix run."""

    def __init__(self, reranker: Reranker):
        self.r = reranker
        tok, t, p = reranker.llm.tokenizer, reranker.template, reranker.prompt
        enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
        self.enc = enc
        turns = ChatFormat.of(tok)
        self.head = enc(turns.system_open + t.instruction + turns.system_close + "Question:")
        self.between = enc("\nDocument:")
        self.suffix = enc(t.suffix)
        self.max_doc, self.max_q = p.max_doc_tokens, p.max_question_tokens

    def split_ids(self, question: str, doc: str) -> tuple[list[int], list[int]]:
        """(the question's shared prefix, the document's part) of the query-first prompt."""
        q = self.enc(" " + question)[: self.max_q]
        d = self.enc("\n" + doc)[: self.max_doc]
        return self.head + q + self.between, d + self.suffix

    def score(self, question: str, docs: Sequence[str], cached: bool = False) -> list[float]:
        r, runner, dec = self.r, self.r.runner, self.r.decoder
        parts = [self.split_ids(question, d) for d in docs]
        shared = parts[0][0] if parts else []
        start = len(shared) if cached else 0
        seqs = [tail if cached else head + tail for head, tail in parts]
        prefix_kv = runner.encode_prefix(shared) if cached else None  # once, as a prefix cache holds it
        out = [0.0] * len(seqs)
        for batch in length_batches([len(s) for s in seqs], r.batch_size):
            longest = max(len(seqs[i]) for i in batch)
            kv = dec.new_kv(len(batch), start + longest)
            if cached:
                kv.fill_prefix(prefix_kv)

            def score_rows(part: slice) -> list[float]:  # as the reranker runs a batch: rows in streams
                rows = batch[part]
                ids, last = runner.batch_ids([seqs[i] for i in rows])
                pos = (start + torch.arange(ids.shape[1], device=dec.device)).expand(len(rows), -1)
                mask = causal_mask(ids.shape[1], start, dec.device) if cached else None
                return r.score_hidden(dec.forward(ids, pos, kv.rows(part), start, mask, out_index=last))

            for i, s in zip(batch, runner.rows.run(len(batch), score_rows, longest)):
                out[i] = s
        return out
