"""The batch runner the reranker and the reader share: one model, one static batch buffer, one lock.

Both jobs run the same doc-first prompt over the same stored document KV: rows (one document
of one request each, with that request's query tokens), the documents' KV loaded from a source
into the rows of one preallocated :class:`~hyperrag.model.layout.StaticLayout` (or computed in
place where the source lacks it), batches cut by query and document length, and the rows run as
concurrent CPU streams (:mod:`hyperrag.model.rowsplit`). The buffer is the process's largest
scratch allocation, so there is exactly one; whoever writes it (reranking, reading, document
encoding, full prefill) holds :attr:`BatchRunner.lock`.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from hyperrag.model.batch_kv import BatchKV, row_runs
from hyperrag.model.decoder import Decoder, causal_mask
from hyperrag.model.layout import StaticLayout
from hyperrag.model.loading import LLM
from hyperrag.model.prompts import RerankPrompt
from hyperrag.model.rowsplit import row_streams


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


class BatchRunner:
    """The model, its doc-first prompt, the cached instruction prefix and the one batch buffer.

    ``answer_tokens``: room the buffer's query columns leave after the question, suffix and
    answer cue, for the reader's answer."""

    def __init__(self, llm: LLM, prompt: RerankPrompt, batch_size: int = 20, streams: int = 2,
                 answer_tokens: int = 16, rotate: bool = True):
        self.llm = llm
        self.prompt = prompt
        # Keys are cached in a rotated basis (see Decoder): quantized codecs lose less of them.
        self.decoder = Decoder(llm.model, llm.linear, llm.head_linear, rotate=rotate)
        self.batch_size = batch_size
        # On CPU a batch's rows run as concurrent streams (see rowsplit); one stream on GPU.
        self.rows = row_streams(streams if self.decoder.device.type == "cpu" else 1)
        self.lock = threading.Lock()  # one batch at a time on the buffer
        self.prefix_len = len(prompt.prefix_ids)
        self.max_doc_len = prompt.max_doc_tokens + len(prompt.tail_ids)
        self.prefix_kv = self.encode_prefix(prompt.prefix_ids)
        # ONE batch buffer (fp32: ~0.5 GB at 20 rows) for everything that runs under ``lock``:
        # reuse and the reader use it as their static layout, document encoding and full prefill
        # use its rows from column 0 (a full prefill then restores the cached prefix columns).
        self.answer_tokens = answer_tokens
        max_query = (prompt.max_question_tokens + len(prompt.suffix_ids) + len(prompt.answer_cue_ids)
                     + answer_tokens)
        self.layout = StaticLayout(self.decoder, self.prefix_kv, batch_size, self.max_doc_len, max_query)

    def doc_tokens(self, text: str) -> int:
        return len(self.prompt.doc_ids(text))

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

    def load_rows(self, texts: Sequence[str], lens: Sequence[int], source: DocKVSource) -> tuple[float, list[int]]:
        """Fill rows ``0..`` of the layout with the documents' stored KV; the ones the source
        lacks are computed in their own rows (each run of adjacent rows as one batch), once per
        text (rows of several questions may hold the same document), and stored. Returns
        (seconds loading, the rows computed). Hold ``lock``."""
        layout = self.layout
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
