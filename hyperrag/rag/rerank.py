"""The doc-first decoder reranker: one scorer, three ways to run it.

- ``full``: the whole prompt ``[prefix][doc][question][suffix]`` through the model per pair;
- ``prefix``: the shared instruction prefix cached, ``[doc][question][suffix]`` run per pair
  (what vLLM-style prefix caching gives);
- ``reuse``: each document's KV (on the prefix) is loaded from a store into the static batch
  buffer and only ``[question][suffix]`` is run. Missing documents are encoded on the spot,
  written back to the store, and the result says so.

Score = logit(yes) - logit(no) at the last position, computed as one dot product with the
difference of the two LM-head rows. All modes score identically up to float rounding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from hyperrag.model import kernels
from hyperrag.model.decoder import causal_mask
from hyperrag.model.loading import LLM
from hyperrag.model.prompts import RerankPrompt, RerankTemplate
from hyperrag.rag.batch_runner import BatchRunner, DocKVSource, QueryRow, length_batches, missing_kv_warning, query_batches

MODES = ("full", "prefix", "reuse")
# How far fp32 scores of one pair may differ between modes, batch shapes and paths (the
# documented bound, README "Measured"). The math is the same; the kernels' summation order is
# not (oneDNN vs MKL, AVX2 vs AVX-512, how many rows and columns a GEMM sees): 7.6e-5 measured
# on an AMD EPYC, and 1.03e-5 for a recomputation in another batch shape on an Intel Xeon, where
# a 1e-5 tolerance failed. Tests compare against this bound, never against one CPU's rounding.
FP32_SCORE_BOUND = 1e-4


@dataclass
class RerankResult:
    scores: list[float]
    load_s: float = 0.0  # time reading document KV into the batch buffer
    compute_s: float = 0.0  # model time (includes encoding documents the store missed)
    pairs: int = 0
    query_tokens: int = 0  # question + suffix tokens actually run per pair (reuse)
    prompt_tokens: list[int] = field(default_factory=list)  # full prompt length per pair
    encoded_docs: int = 0  # documents encoded because the store did not have them
    warnings: list[str] = field(default_factory=list)
    # keep_question_kv: per document, the KV of [question][suffix] this run computed over it,
    # [layers, 2, kv_heads, query_tokens, head_dim]; the reader continues from it
    question_kv: list[torch.Tensor | None] = field(default_factory=list)


def fuse_scores(scores: Sequence[float], cosines: Sequence[float], weight: float) -> list[float]:
    """The ranking score: reranker score + ``weight`` x the retriever's cosine similarity (the
    weight is tuned with a trained adapter; 0 ranks by the reranker alone)."""
    return [s + weight * c for s, c in zip(scores, cosines)]


class Reranker:
    """Scores (question, document) pairs with a decoder LLM; thread-safe (one batch at a time)."""

    def __init__(self, llm: LLM, template: RerankTemplate | None = None, max_doc_tokens: int = 448,
                 max_question_tokens: int = 64, batch_size: int = 20, streams: int = 2, answer_tokens: int = 16,
                 rotate: bool = True):
        self.llm = llm
        self.template = template or RerankTemplate.for_tokenizer(llm.tokenizer)
        self.prompt = RerankPrompt(llm.tokenizer, self.template, max_doc_tokens, max_question_tokens)
        # The model, the one batch buffer and its lock, shared with the reader (see batch_runner);
        # the buffer's query columns leave room for the reader's cue and ``answer_tokens``.
        self.runner = BatchRunner(llm, self.prompt, batch_size, streams, answer_tokens, rotate)
        self.decoder = self.runner.decoder
        self.batch_size = batch_size
        self.stream_choice = {"small_stream_threads": self.runner.rows.small_threads, "source": "not measured"}
        head = self.decoder.head.weight
        self.score_vec = (head[self.prompt.yes_id] - head[self.prompt.no_id]).float()

    # -- machine ------------------------------------------------------------------------------
    def tune_streams(self, cache_dir: str, setting: int = 0, repeats: int = 5) -> dict:
        """How many OpenMP threads a small (KV-reuse) row stream gets here: ``setting`` when > 0,
        else one or all of torch's threads, whichever ran a reuse-shaped batch (every row a
        200-token document and a 20-token question) faster on this machine, timed once per start
        until two starts agree, then cached (:func:`hyperrag.model.kernels.measured`). One thread won on the AMD EPYC the README's
        figures come from; nothing says it does on another CPU."""
        every = torch.get_num_threads()
        choices = sorted({1, every})

        def measure() -> dict:
            times: dict[int, list[float]] = {n: [] for n in choices}
            with self.runner.lock:
                for rep in range(repeats + 1):  # the first round warms up, untimed
                    for n in choices:
                        t0 = time.perf_counter()
                        self._reuse_shaped_batch(n)
                        if rep:
                            times[n].append((time.perf_counter() - t0) * 1e3)
            figures = {str(n): round(kernels.best_time(t), 2) for n, t in times.items()}
            return {"small_stream_threads": int(min(figures, key=figures.get)), "figures_ms": figures}

        if self.runner.rows.size == 1:
            choice = {"small_stream_threads": 1, "source": "one stream"}
        elif setting > 0:
            choice = {"small_stream_threads": setting, "source": "setting"}
        else:
            dec = self.decoder
            dims = f"{dec.n_layers}x{dec.hidden_size}-{self.batch_size}rows"
            choice = kernels.measured(kernels.cache_file(cache_dir, "streams", dec.dtype, dims),
                                      lambda c: c.get("small_stream_threads") in choices, measure)
        self.runner.rows.small_threads = choice["small_stream_threads"]
        self.stream_choice = choice
        return choice

    def _reuse_shaped_batch(self, small_threads: int) -> None:
        """One reuse batch on the layout's (scratch) rows with small streams of ``small_threads``."""
        layout, device, n = self.runner.layout, self.decoder.device, 20
        lens = [min(200, layout.max_slots)] * layout.max_batch
        ids = torch.full((layout.max_batch, n), self.prompt.yes_id, device=device)
        last = torch.full((layout.max_batch,), n - 1, device=device)

        def score(part: slice) -> list[float]:
            return self._score_queries(ids[part], last[part], lens[part], part)

        previous, self.runner.rows.small_threads = self.runner.rows.small_threads, small_threads
        try:
            self.runner.rows.run(layout.max_batch, score, n)
        finally:
            self.runner.rows.small_threads = previous

    # -- identities ---------------------------------------------------------------------------
    @property
    def kv_identity(self) -> str:
        """What a stored document KV depends on besides the text: model, dtype, template, limit,
        and the basis its keys are cached in."""
        rotated = "|hadamard" if self.decoder.rotation is not None else ""
        return f"{self.llm.fingerprint}|{self.decoder.dtype}|{self.template.digest}|{self.prompt.max_doc_tokens}{rotated}"

    def doc_tokens(self, text: str) -> int:
        return self.runner.doc_tokens(text)

    def encode_docs(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Document KVs on the shared prefix, as this reranker's reuse mode reads them (precompute)."""
        return self.runner.encode_docs(texts)

    # -- scoring ------------------------------------------------------------------------------
    def _score_queries(self, ids: torch.Tensor, last: torch.Tensor, lens: Sequence[int], part: slice,
                       keep: list[torch.Tensor] | None = None) -> list[float]:
        """Scores of right-padded queries ``ids`` (each read at its ``last`` real token) run over
        layout rows ``part``, which hold documents of ``lens`` tokens. A row's own tokens never
        attend to its padding (causal), so rows of questions of different lengths can share a batch.
        ``keep`` gets a copy of each row's query KV (before the next batch overwrites it)."""
        pos, groups = self.runner.layout.query_groups(lens, ids.shape[1])
        kv = self.runner.layout.kv.rows(part)
        hidden = self.decoder.forward_groups(ids, pos, kv, groups, out_index=last)
        if keep is not None:
            keep += [kv.row_view(r, g.start, int(last[r]) + 1).clone() for g in groups for r in range(g.lo, g.hi)]
        return self.score_hidden(hidden)

    def score_hidden(self, hidden: torch.Tensor) -> list[float]:
        """Each row's score from its last position's final hidden state [B, H]:
        logit(yes) - logit(no) as one dot product."""
        return (hidden.float() @ self.score_vec).tolist()

    def score(self, question: str, docs: Sequence[str], mode: str = "reuse",
              source: DocKVSource | None = None) -> RerankResult:
        """Scores of ``docs`` for ``question`` in the given mode (``reuse`` needs a ``source``)."""
        return self.score_many([(question, docs)], mode, source)[0]

    def score_many(self, requests: Sequence[tuple[str, Sequence[str]]], mode: str = "reuse",
                   source: DocKVSource | None = None, keep_question_kv: bool = False) -> list[RerankResult]:
        """Scores for several (question, documents) requests at once: their pairs share batches,
        each row with its own question (concurrent users; :mod:`hyperrag.workbench.batcher`). Every
        result equals asking alone up to float rounding; its times are the whole call's, which
        is what each request waited for. ``keep_question_kv`` (reuse mode) keeps each pair's
        question KV in its result, for the reader to continue from."""
        if mode not in MODES:
            raise ValueError(f"unknown rerank mode {mode!r}; choose one of {MODES}")
        if mode == "reuse" and source is None:
            raise ValueError("reuse mode needs a document KV source (a KVStore)")
        if keep_question_kv and mode != "reuse":
            raise ValueError("only reuse mode runs the question on its own, so only it can keep the question's KV")
        results, pairs = [], []
        for r, (question, docs) in enumerate(requests):
            query = self.prompt.query(question)
            result = RerankResult(scores=[0.0] * len(docs), pairs=len(docs), query_tokens=len(query.ids),
                                  question_kv=[None] * len(docs) if keep_question_kv else [])
            result.prompt_tokens = [self.runner.prefix_len + self.doc_tokens(d) + len(query.ids) for d in docs]
            if query.truncated:
                result.warnings.append(f"question cut to {self.prompt.max_question_tokens} tokens")
            results.append(result)
            pairs += [QueryRow(r, i, d, query.ids) for i, d in enumerate(docs)]
        if pairs:
            with self.runner.lock:
                load_s, compute_s = (self._score_reuse(pairs, source, results, keep_question_kv) if mode == "reuse"
                                     else self._score_prefill(pairs, mode, results))
            for result in results:
                result.load_s, result.compute_s = load_s, compute_s
                if result.encoded_docs:
                    result.warnings.append(missing_kv_warning(result.encoded_docs))
        return results

    def _score_prefill(self, pairs: Sequence[QueryRow], mode: str, results: list[RerankResult]) -> tuple[float, float]:
        t0 = time.perf_counter()
        start = 0 if mode == "full" else self.runner.prefix_len
        seqs = [(self.prompt.prefix_ids if mode == "full" else []) + list(self.prompt.doc_ids(p.text)) + p.query
                for p in pairs]
        device = self.decoder.device
        for batch in length_batches([len(s) for s in seqs], self.batch_size):
            def score(part: slice) -> list[float]:
                rows, kv = batch[part], self.runner.layout.kv.rows(part)
                ids, last = self.runner.batch_ids([seqs[i] for i in rows])
                pos = (start + torch.arange(ids.shape[1], device=device)).expand(len(rows), -1)
                if mode == "full":
                    mask = None  # causal from column 0; right padding never touches real tokens
                else:
                    kv.fill_prefix(self.runner.prefix_kv)
                    mask = causal_mask(ids.shape[1], start, device)
                return self.score_hidden(self.decoder.forward(ids, pos, kv, start, mask, out_index=last))

            for i, s in zip(batch, self.runner.rows.run(len(batch), score, max(len(seqs[i]) for i in batch))):
                results[pairs[i].request].scores[pairs[i].doc] = s
        if mode == "full":  # it wrote a freshly computed prefix (equal up to rounding) over the cached one
            self.runner.layout.kv.fill_prefix(self.runner.prefix_kv)
        return 0.0, time.perf_counter() - t0

    def _score_reuse(self, pairs: Sequence[QueryRow], source: DocKVSource, results: list[RerankResult],
                     keep_question_kv: bool) -> tuple[float, float]:
        total_load, total = 0.0, time.perf_counter()
        for chunk in query_batches(pairs, self.doc_tokens, self.batch_size):
            lens = [self.doc_tokens(p.text) for p in chunk]  # batch row r holds chunk[r]
            load_s, missing = self.runner.load_rows([p.text for p in chunk], lens, source)
            total_load += load_s
            for r in missing:
                results[chunk[r].request].encoded_docs += 1

            def score(part: slice) -> list[tuple[float, torch.Tensor | None]]:
                kept: list[torch.Tensor] | None = [] if keep_question_kv else None
                scores = self._score_queries(*self.runner.batch_ids([p.query for p in chunk[part]]), lens[part], part, kept)
                return list(zip(scores, kept or [None] * len(scores)))

            for p, (s, kv) in zip(chunk, self.runner.rows.run(len(chunk), score, max(len(p.query) for p in chunk))):
                results[p.request].scores[p.doc] = s
                if keep_question_kv:
                    results[p.request].question_kv[p.doc] = kv
        return total_load, time.perf_counter() - total - total_load  # documents computed count as compute
