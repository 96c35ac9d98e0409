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

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from hyperrag.model import kernels
from hyperrag.model.decoder import Decoder, causal_mask
from hyperrag.model.batch_kv import BatchKV, row_runs
from hyperrag.model.layout import StaticLayout
from hyperrag.model.loading import LLM
from hyperrag.model.prompts import RerankPrompt, RerankTemplate
from hyperrag.model.rowsplit import row_streams

MODES = ("full", "prefix", "reuse")
# How far fp32 scores of one pair may differ between modes, batch shapes and paths (the
# documented bound, README "Measured"). The math is the same; the kernels' summation order is
# not (oneDNN vs MKL, AVX2 vs AVX-512, how many rows and columns a GEMM sees): 7.6e-5 measured
# on an AMD EPYC, and 1.03e-5 for a recomputation in another batch shape on an Intel Xeon, where
# a 1e-5 tolerance failed. Tests compare against this bound, never against one CPU's rounding.
FP32_SCORE_BOUND = 1e-4


class DocKVSource(Protocol):
    """Where reuse reads document KV from (the LMCache-backed store implements it). A source
    may also offer ``load_many(texts, outs) -> list[bool]`` to overlap its reads in a batch."""

    def load_into(self, doc_text: str, out: torch.Tensor) -> bool: ...

    def put(self, doc_text: str, kv: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class QueryRow:
    """One batch row: document ``doc`` (text ``text``) of request ``request``, run with that
    request's query tokens (the reranker's question, or the reader's question and cue)."""

    request: int
    doc: int
    text: str
    query: list[int]
    # The KV of this row's [question][suffix] over its document, computed already (the
    # reranker's run of the same tokens): a reader row then runs only its answer cue.
    question_kv: torch.Tensor | None = None
    branch: int = 0  # reader: the row's answer starts with its document's (branch+1)-th likeliest token


def load_batch(source: DocKVSource, texts: Sequence[str], outs: Sequence[torch.Tensor]) -> list[bool]:
    """Which of ``texts`` the source decoded into ``outs`` (one call when it has ``load_many``)."""
    many = getattr(source, "load_many", None)
    return many(texts, outs) if many is not None else [source.load_into(t, o) for t, o in zip(texts, outs)]


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


def length_batches(lengths: Sequence[int], max_batch: int, max_waste: float = 0.15) -> list[list[int]]:
    """Indices grouped into batches of similar length, so padding adds at most ~``max_waste``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        candidate = current + [i]
        padded = len(candidate) * lengths[i]
        real = sum(lengths[j] for j in candidate)
        if current and (len(candidate) > max_batch or padded > (1 + max_waste) * real):
            batches.append(current)
            candidate = [i]
        current = candidate
    if current:
        batches.append(current)
    return batches


def query_batches(rows: Sequence[QueryRow], doc_len: Callable[[str], int], size: int) -> list[list[QueryRow]]:
    """Rows that run a query on stored document KV, cut into batches of ``size``: by query length
    first (a batch pads its queries to its longest, and a padded query token costs a whole
    token's compute), each batch then in ascending document length (the static layout's order).
    The rows of one question come out as before: by document length."""
    ordered = sorted(rows, key=lambda row: (len(row.query), doc_len(row.text)))
    return [sorted(ordered[i : i + size], key=lambda row: doc_len(row.text)) for i in range(0, len(ordered), size)]


def missing_kv_warning(n: int) -> str:
    """What a caller is told when ``n`` documents' KV had to be computed at query time."""
    return f"{n} document KV(s) were not in the store: computed and stored"


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
        # Keys are cached in a rotated basis (see Decoder): quantized codecs lose less of them.
        self.decoder = Decoder(llm.model, llm.linear, llm.head_linear, rotate=rotate)
        self.batch_size = batch_size
        # On CPU a batch's rows run as concurrent streams (see rowsplit); one stream on GPU.
        self.rows = row_streams(streams if self.decoder.device.type == "cpu" else 1)
        self.stream_choice = {"small_stream_threads": self.rows.small_threads, "source": "not measured"}
        head = self.decoder.head.weight
        self.score_vec = (head[self.prompt.yes_id] - head[self.prompt.no_id]).float()
        self.lock = threading.Lock()  # one batch at a time (the reader takes it too)
        self.prefix_len = len(self.prompt.prefix_ids)
        self.max_doc_len = max_doc_tokens + len(self.prompt.tail_ids)
        self.prefix_kv = self.encode_prefix(self.prompt.prefix_ids)
        # ONE batch buffer (fp32: ~0.5 GB at 20 rows) for everything that runs under ``lock``:
        # reuse and the reader use it as their static layout, document encoding and full prefill
        # use its rows from column 0 (a full prefill then restores the cached prefix columns).
        # Its query columns leave room for the reader's cue and ``answer_tokens`` answer tokens.
        self.answer_tokens = answer_tokens
        max_query = max_question_tokens + len(self.prompt.suffix_ids) + len(self.prompt.answer_cue_ids) + answer_tokens
        self.layout = StaticLayout(self.decoder, self.prefix_kv, batch_size, self.max_doc_len, max_query)

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
            with self.lock:
                for rep in range(repeats + 1):  # the first round warms up, untimed
                    for n in choices:
                        t0 = time.perf_counter()
                        self._reuse_shaped_batch(n)
                        if rep:
                            times[n].append((time.perf_counter() - t0) * 1e3)
            figures = {str(n): round(kernels.best_time(t), 2) for n, t in times.items()}
            return {"small_stream_threads": int(min(figures, key=figures.get)), "figures_ms": figures}

        if self.rows.size == 1:
            choice = {"small_stream_threads": 1, "source": "one stream"}
        elif setting > 0:
            choice = {"small_stream_threads": setting, "source": "setting"}
        else:
            dec = self.decoder
            dims = f"{dec.n_layers}x{dec.hidden_size}-{self.batch_size}rows"
            choice = kernels.measured(kernels.cache_file(cache_dir, "streams", dec.dtype, dims),
                                      lambda c: c.get("small_stream_threads") in choices, measure)
        self.rows.small_threads = choice["small_stream_threads"]
        self.stream_choice = choice
        return choice

    def _reuse_shaped_batch(self, small_threads: int) -> None:
        """One reuse batch on the layout's (scratch) rows with small streams of ``small_threads``."""
        layout, device, n = self.layout, self.decoder.device, 20
        lens = [min(200, layout.max_slots)] * layout.max_batch
        ids = torch.full((layout.max_batch, n), self.prompt.yes_id, device=device)
        last = torch.full((layout.max_batch,), n - 1, device=device)

        def score(part: slice) -> list[float]:
            return self._score_queries(ids[part], last[part], lens[part], part)

        previous, self.rows.small_threads = self.rows.small_threads, small_threads
        try:
            self.rows.run(layout.max_batch, score, n)
        finally:
            self.rows.small_threads = previous

    # -- identities ---------------------------------------------------------------------------
    @property
    def kv_identity(self) -> str:
        """What a stored document KV depends on besides the text: model, dtype, template, limit,
        and the basis its keys are cached in."""
        rotated = "|hadamard" if self.decoder.rotation is not None else ""
        return f"{self.llm.fingerprint}|{self.decoder.dtype}|{self.template.digest}|{self.prompt.max_doc_tokens}{rotated}"

    def doc_tokens(self, text: str) -> int:
        return len(self.prompt.doc_ids(text))

    # -- batch building blocks ----------------------------------------------------------------
    # Public so that the reader and the evaluation's query-first baseline run their batches the
    # way the reranker runs its own. Those that use the reranker's batch buffer (its layout or a
    # view of it) must hold ``lock``.
    def encode_prefix(self, ids: Sequence[int]) -> torch.Tensor:
        """The KV ``[layers, 2, kv_heads, n, head_dim]`` of ``ids`` from column 0: a prefix that
        batch rows then share (the prompt's instruction; a question's, for query-first caching).
        Uses a buffer of its own, so it needs no lock."""
        dec = self.decoder
        kv = dec.new_kv(1, len(ids))
        dec.forward(torch.tensor([list(ids)], device=dec.device), torch.arange(len(ids), device=dec.device)[None], kv, 0)
        return kv.row_view(0, 0, len(ids))

    def batch_ids(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids [B, longest] and each row's last position [B]."""
        ids = torch.zeros((len(seqs), max(len(t) for t in seqs)), dtype=torch.long)
        for r, toks in enumerate(seqs):
            ids[r, : len(toks)] = torch.tensor(toks)
        device = self.decoder.device
        return ids.to(device), torch.tensor([len(t) - 1 for t in seqs], device=device)

    def encode_rows(self, token_lists: Sequence[Sequence[int]], kv: BatchKV) -> None:
        """Run documents on the cached prefix into rows ``0..m-1`` of ``kv`` (columns ``P..``):
        the documents' KV computed in place (``reader_full``; the reranker's misses)."""
        p = self.prefix_len
        ids, _ = self.batch_ids(token_lists)
        kv.fill_prefix(self.prefix_kv, slice(0, len(token_lists)))
        pos = (p + torch.arange(ids.shape[1], device=ids.device)).expand(len(token_lists), -1)
        self.decoder.forward(ids, pos, kv, start=p, mask=causal_mask(ids.shape[1], p, ids.device))

    def encode_docs(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Document KVs ``[layers, 2, kv_heads, n, head_dim]`` on the shared prefix (precompute)."""
        with self.lock:
            return self._encode_docs(texts)

    def _encode_docs(self, texts: Sequence[str]) -> list[torch.Tensor]:
        toks = [self.prompt.doc_ids(t) for t in texts]
        out: list[torch.Tensor | None] = [None] * len(texts)
        p = self.prefix_len
        for batch in length_batches([len(t) for t in toks], self.batch_size):
            def encode(part: slice) -> list[torch.Tensor]:
                rows, kv = batch[part], self.layout.kv.rows(part)
                self.encode_rows([toks[i] for i in rows], kv)
                return [kv.row_view(r, p, len(toks[i])).clone() for r, i in enumerate(rows)]

            for i, kv in zip(batch, self.rows.run(len(batch), encode, max(len(toks[i]) for i in batch))):
                out[i] = kv
        return out  # type: ignore[return-value]

    def load_rows(self, layout: StaticLayout, texts: Sequence[str], lens: Sequence[int],
                  source: DocKVSource) -> tuple[float, list[int]]:
        """Fill rows ``0..`` of ``layout`` with the documents' stored KV; the ones the source
        lacks are computed in their own rows (each run of adjacent rows as one batch), once per
        text (rows of several questions may hold the same document), and stored. Returns
        (seconds loading, the rows computed). The layout is the reranker's buffer or a view of
        it: hold ``lock``."""
        t0 = time.perf_counter()
        views = [layout.doc_view(r, n) for r, n in enumerate(lens)]
        # Each row stream decodes its share of the rows (why not the calling thread: rowsplit).
        found = self.rows.run(len(texts), lambda part: load_batch(source, texts[part], views[part]), 1)
        load_s = time.perf_counter() - t0
        first: dict[str, int] = {}  # text -> the row that computes it
        computed = [r for r, ok in enumerate(found) if not ok and first.setdefault(texts[r], r) == r]
        for lo, hi in row_runs(computed):
            self.encode_rows([self.prompt.doc_ids(t) for t in texts[lo:hi]], layout.kv.rows(slice(lo, hi)))
        for r, ok in enumerate(found):
            if not ok and first[texts[r]] != r:
                layout.doc_view(r, lens[r]).copy_(layout.doc_view(first[texts[r]], lens[r]))
        for r in computed:
            source.put(texts[r], layout.doc_view(r, lens[r]).clone())
        return load_s, computed

    def _score_queries(self, ids: torch.Tensor, last: torch.Tensor, lens: Sequence[int], part: slice,
                       keep: list[torch.Tensor] | None = None) -> list[float]:
        """Scores of right-padded queries ``ids`` (each read at its ``last`` real token) run over
        layout rows ``part``, which hold documents of ``lens`` tokens. A row's own tokens never
        attend to its padding (causal), so rows of questions of different lengths can share a batch.
        ``keep`` gets a copy of each row's query KV (before the next batch overwrites it)."""
        pos, groups = self.layout.query_groups(lens, ids.shape[1])
        kv = self.layout.kv.rows(part)
        hidden = self.decoder.forward_groups(ids, pos, kv, groups, out_index=last)
        if keep is not None:
            keep += [kv.row_view(r, g.start, int(last[r]) + 1).clone() for g in groups for r in range(g.lo, g.hi)]
        return self.score_hidden(hidden)

    def score_hidden(self, hidden: torch.Tensor) -> list[float]:
        """Each row's score from its last position's final hidden state [B, H]:
        logit(yes) - logit(no) as one dot product."""
        return (hidden.float() @ self.score_vec).tolist()

    # -- scoring ------------------------------------------------------------------------------

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
            result.prompt_tokens = [self.prefix_len + self.doc_tokens(d) + len(query.ids) for d in docs]
            if query.truncated:
                result.warnings.append(f"question cut to {self.prompt.max_question_tokens} tokens")
            results.append(result)
            pairs += [QueryRow(r, i, d, query.ids) for i, d in enumerate(docs)]
        if pairs:
            with self.lock:
                load_s, compute_s = (self._score_reuse(pairs, source, results, keep_question_kv) if mode == "reuse"
                                     else self._score_prefill(pairs, mode, results))
            for result in results:
                result.load_s, result.compute_s = load_s, compute_s
                if result.encoded_docs:
                    result.warnings.append(missing_kv_warning(result.encoded_docs))
        return results

    def _score_prefill(self, pairs: Sequence[QueryRow], mode: str, results: list[RerankResult]) -> tuple[float, float]:
        t0 = time.perf_counter()
        start = 0 if mode == "full" else self.prefix_len
        seqs = [(self.prompt.prefix_ids if mode == "full" else []) + list(self.prompt.doc_ids(p.text)) + p.query
                for p in pairs]
        device = self.decoder.device
        for batch in length_batches([len(s) for s in seqs], self.batch_size):
            def score(part: slice) -> list[float]:
                rows, kv = batch[part], self.layout.kv.rows(part)
                ids, last = self.batch_ids([seqs[i] for i in rows])
                pos = (start + torch.arange(ids.shape[1], device=device)).expand(len(rows), -1)
                if mode == "full":
                    mask = None  # causal from column 0; right padding never touches real tokens
                else:
                    kv.fill_prefix(self.prefix_kv)
                    mask = causal_mask(ids.shape[1], start, device)
                return self.score_hidden(self.decoder.forward(ids, pos, kv, start, mask, out_index=last))

            for i, s in zip(batch, self.rows.run(len(batch), score, max(len(seqs[i]) for i in batch))):
                results[pairs[i].request].scores[pairs[i].doc] = s
        if mode == "full":  # it wrote a freshly computed prefix (equal up to rounding) over the cached one
            self.layout.kv.fill_prefix(self.prefix_kv)
        return 0.0, time.perf_counter() - t0

    def _score_reuse(self, pairs: Sequence[QueryRow], source: DocKVSource, results: list[RerankResult],
                     keep_question_kv: bool) -> tuple[float, float]:
        layout, total_load, total = self.layout, 0.0, time.perf_counter()
        for chunk in query_batches(pairs, self.doc_tokens, self.batch_size):
            lens = [self.doc_tokens(p.text) for p in chunk]  # batch row r holds chunk[r]
            load_s, missing = self.load_rows(layout, [p.text for p in chunk], lens, source)
            total_load += load_s
            for r in missing:
                results[chunk[r].request].encoded_docs += 1

            def score(part: slice) -> list[tuple[float, torch.Tensor | None]]:
                kept: list[torch.Tensor] | None = [] if keep_question_kv else None
                scores = self._score_queries(*self.batch_ids([p.query for p in chunk[part]]), lens[part], part, kept)
                return list(zip(scores, kept or [None] * len(scores)))

            for p, (s, kv) in zip(chunk, self.rows.run(len(chunk), score, max(len(p.query) for p in chunk))):
                results[p.request].scores[p.doc] = s
                if keep_question_kv:
                    results[p.request].question_kv[p.doc] = kv
        return total_load, time.perf_counter() - total - total_load  # documents computed count as compute
