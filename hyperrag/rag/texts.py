"""Rerank and read documents a caller sends rather than a corpus (the HTTP service's engine).

Each document's KV is found in the store by its content (:func:`hyperrag.kv.frame.content_address`
over the reranker's identity and the text), so a document that a client sent before, or that
precompute stored, is loaded; one never seen is encoded once, stored, and reused by the next
request. Requests scored together share that work too: :meth:`Reranker.load_rows` encodes a
text once per batch, and the request whose row encoded it is the one that counts it computed.
Scores are the reranker's alone (logit(yes) - logit(no)): documents sent to be reranked come
without a retriever, so no retrieval cosine is fused in (:meth:`Engine.ask_many` fuses one for
its corpus's candidates).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from hyperrag.rag.reader import Reader, Reading
from hyperrag.rag.batch_runner import DocKVSource
from hyperrag.rag.rerank import Reranker


@dataclass
class TextRanking:
    scores: list[float]  # per document, in the order sent
    order: list[int]  # document indices, best first (ties: the earlier one first)
    kv_reused: int  # documents whose KV came from the store (or from another row of the same batch)
    kv_computed: int  # documents encoded by this request and stored
    truncated: list[int]  # documents cut at max_doc_tokens (scored on their first tokens)
    timings: dict[str, float]  # seconds of the call that scored it: kv_load, rerank
    warnings: list[str] = field(default_factory=list)
    question_kv: list[torch.Tensor | None] = field(default_factory=list, repr=False)  # for the reader


def rerank_texts(reranker: Reranker, store: DocKVSource, requests: Sequence[tuple[str, Sequence[str]]],
                 keep_question_kv: bool = False) -> list[TextRanking]:
    """Rank each (query, documents) request's documents, all requests in shared batches, in reuse
    mode: stored KV loaded, missing KV computed and written to ``store``."""
    results = reranker.score_many(requests, "reuse", store, keep_question_kv)
    rankings = []
    for (_, docs), r in zip(requests, results):
        order = sorted(range(len(docs)), key=lambda i: (-r.scores[i], i))
        truncated = [i for i, d in enumerate(docs) if reranker.prompt.doc_truncated(d)]
        warnings = list(r.warnings)
        if truncated:
            warnings.append(f"{len(truncated)} document(s) longer than {reranker.prompt.max_doc_tokens} tokens "
                            "were cut to that length")
        rankings.append(TextRanking(r.scores, order, len(docs) - r.encoded_docs, r.encoded_docs, truncated,
                                    {"kv_load": r.load_s, "rerank": r.compute_s}, warnings, r.question_kv))
    return rankings


def answer_texts(reranker: Reranker, reader: Reader, store: DocKVSource,
                 requests: Sequence[tuple[str, Sequence[str], int]]) -> list[tuple[TextRanking, Reading]]:
    """Rank each (query, documents, top_n) request's documents, then read its ``top_n`` best
    from their stored KV, continuing from the question KV the ranking computed (as the engine's
    ``reader_kv`` mode does). A reading's ``doc`` is an index into the documents as sent."""
    rankings = rerank_texts(reranker, store, [(q, docs) for q, docs, _ in requests], keep_question_kv=True)
    tops = [ranking.order[:top_n] for ranking, (_, _, top_n) in zip(rankings, requests)]
    readings = reader.read_many(
        [(q, [docs[i] for i in top], [ranking.scores[i] for i in top])
         for (q, docs, _), ranking, top in zip(requests, rankings, tops)],
        "kv", store, [[ranking.question_kv[i] for i in top] for ranking, top in zip(rankings, tops)],
        calibrated=False)  # reranker scores without the retriever's cosine: not what the calibration maps
    for ranking, reading, top in zip(rankings, readings, tops):
        ranking.question_kv = []
        reading.doc = top[reading.doc] if reading.doc >= 0 else -1
        ranking.timings["kv_load"] += reading.load_s
        ranking.timings["generate"] = reading.compute_s
    return list(zip(rankings, readings))
