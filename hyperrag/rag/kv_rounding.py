"""Hessian-aware rounding for the quantized codecs: what reads a document's cached KV, measured once per model.

Nearest rounding treats every channel of a cached key alike, but the reranker does not read them
alike: a key error ``e`` moves the attention logit of a query ``q`` by ``q.e``, so what an error
costs is ``e^T H e`` with ``H = E[q q^T]`` over the queries that attend to the document, and
those queries are far from isotropic. A value error reaches the residual stream through o_proj,
so its ``H`` is ``sum_h W_o,h^T W_o,h`` over the query heads that share the KV head. Given
``H`` per layer, part and KV head, :meth:`QuantCodec._sweep <hyperrag.kv.codec.QuantCodec._sweep>`
rounds each token's vector channel by channel and pushes each error into directions ``H`` weighs
little (GPTQ's sweep, applied to cached KV). The byte format and the decoder are unchanged.

``H`` for keys is measured on the shipped calibration set (``shipped/kv-calibration``: 32 SQuAD
**train** questions, each against the five paragraphs of its article; no dev question) by
summing the outer products of every query attention receives while the reranker scores them in
reuse mode and while the reader reads them (both jobs read the stored KV, and count alike); the
factors are cached per reranker identity in ``<cache_dir>/kv-rounding`` (~30 s to measure,
once). Calibrated on the reranker's queries alone, reading from int4 KV moved F1 by -0.019
(-0.036 to -0.003) against exact KV on 300 dev questions, with 91% of answers unchanged; with
the reader's queries too, -0.013 (-0.033 to +0.005) and 94% (nearest rounding: -0.008, 92%).
Ranking, 12 dev questions x 20 candidates (reuse scores against exact KV; the format then,
fp16 value metadata): int4 k32/v32 max /
mean score error 0.51 / 0.075 with nearest rounding, 0.29 / 0.056 with this; int2 k128/v64
6.5 -> 3.3 max (README "KV compression" has the 24- and 300-question figures).
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from hyperrag.data.corpus import load_corpus
from hyperrag.kv.codec import Codec, QuantCodec, get_codec
from hyperrag.kv.local import LocalKV
from hyperrag.common.settings import KV_ROUNDINGS, SHIPPED

if TYPE_CHECKING:
    from hyperrag.rag.rerank import Reranker

log = logging.getLogger("hyperrag")
CALIBRATION = SHIPPED / "kv-calibration"
# H + DAMP x mean(diag H) x I before inverting (GPTQ's default; 0.001 and 0.1 measured the same).
DAMP = 0.01
METHOD = "rerank+read"  # what reader_moments measures; part of the cache key, so a change re-measures


def parse_codec(entry: str) -> tuple[str, str]:
    """``int4`` or ``int4:nearest`` (a codec, optionally with the rounding to use) -> (name,
    rounding or ''); a ValueError names what is unknown."""
    name, _, rounding = entry.partition(":")
    get_codec(name)
    if rounding and rounding not in KV_ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r} in {entry!r}; choose one of {', '.join(KV_ROUNDINGS)}")
    return name, rounding


def codec_for(entry: str, rounding: str, reranker: "Reranker", cache_dir: str | Path) -> Codec:
    """Codec ``entry`` (``int4``, or ``int4:nearest`` to override ``rounding``) as ``reranker``'s
    store uses it: quantized codecs round by ``hessian`` (with this reranker's measured factors)
    or ``nearest``; casts are as they are."""
    name, asked = parse_codec(entry)
    codec = get_codec(name)
    if isinstance(codec, QuantCodec) and (asked or rounding) == "hessian":
        return codec.rounded_by(rounding_factors(reranker, cache_dir))
    return codec


def rounding_factors(reranker: "Reranker", cache_dir: str | Path) -> torch.Tensor:
    """[layers, 2, kv_heads, D, D]: upper Cholesky factors of the damped ``H^-1`` of keys
    (index 0) and values (1), loaded from the cache or measured and cached."""
    digest = hashlib.sha256()
    for part in (reranker.kv_identity, str(DAMP), METHOD, *(p.read_text() for p in sorted(CALIBRATION.glob("*.jsonl")))):
        digest.update(part.encode())
    path = Path(cache_dir) / "kv-rounding" / f"{digest.hexdigest()[:16]}.safetensors"
    if path.exists():
        return load_file(path)["hinv"]
    log.info("measuring what reads the cached KV for Hessian-aware rounding (once per model)")
    hinv = hinv_factors(reader_moments(reranker))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({"hinv": hinv.contiguous()}, tmp)
    os.replace(tmp, path)  # workers measuring at once each write a whole file
    return hinv


def reader_moments(reranker: "Reranker") -> torch.Tensor:
    """[layers, 2, kv_heads, D, D] float64. Keys: the second moment of the queries that attend
    to a cached document, summed over each KV head's query heads, from both jobs that read the
    store: the reranker's question and suffix (reuse scoring of each calibration question
    against its article's paragraphs) and the reader's question, cue and answer tokens (reading
    the same paragraphs); each job's moment is scaled to a mean diagonal of 1 before they are
    added, so both count alike. Values: ``sum_h W_o,h^T W_o,h`` over the same query heads.
    Every matrix is scaled to a mean diagonal of 1 (scale does not change the rounding). (The
    reader is imported here: this is where the KV package meets the model that reads it.)"""
    from hyperrag.rag.reader import Reader

    dec = reranker.decoder
    n_q, n_kv, d = dec.n_heads, dec.n_kv_heads, dec.head_dim
    lock = threading.Lock()
    corpus = load_corpus(CALIBRATION)
    by_title: dict[str, list[str]] = {}
    for doc in corpus.docs:
        by_title.setdefault(doc.title, []).append(doc.text)
    source = LocalKV()  # exact KV: the probe must see queries only, not the documents' encoding
    texts = [doc.text for doc in corpus.docs]
    for text, kv in zip(texts, reranker.encode_docs(texts)):
        source.put(text, kv)
    pairs = [(q.question, by_title[corpus.by_id[q.doc_ids[0]].title]) for q in corpus.queries]
    reader = Reader(reranker.runner, max_rows=max(len(docs) for _, docs in pairs),
                    max_new_tokens=reranker.runner.answer_tokens)
    jobs = (lambda q, docs: reranker.score(q, docs, "reuse", source),
            lambda q, docs: reader.read(q, docs, [0.0] * len(docs), "kv", source))
    keys = torch.zeros(dec.n_layers, n_kv, d, d, dtype=torch.float64)
    for job in jobs:
        moment = torch.zeros_like(keys)

        def probe(layer: int, q: torch.Tensor, moment: torch.Tensor = moment) -> None:
            g = q.detach().double().cpu().unflatten(1, (n_kv, n_q // n_kv)).transpose(0, 1).flatten(1, 3)  # [kv, N, D]
            with lock:  # the batch's row streams run in threads
                moment[layer] += g.transpose(1, 2) @ g

        dec.probe = probe
        try:
            for question, docs in pairs:
                job(question, docs)
        finally:
            dec.probe = None
        keys += _unit_trace(moment)
    wo = torch.stack([layer.self_attn.o_proj.weight.detach().double().cpu().unflatten(1, (n_kv, n_q // n_kv, d))
                      for layer in dec.body.layers])  # [L, hidden, kv, group, D]
    values = torch.einsum("lnkgc,lnkgd->lkcd", wo, wo)
    return _unit_trace(torch.stack([keys, values], 1))


def _unit_trace(m: torch.Tensor) -> torch.Tensor:
    """``m`` [..., D, D] scaled to a mean diagonal of 1 per matrix."""
    return m / m.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]


def hinv_factors(moments: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factors of ``(H + damp x mean(diag H) x I)^-1`` over the leading axes, as
    GPTQ's sweep uses them (float32)."""
    h = moments.double()
    h = h + damp * h.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(h.shape[-1], dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
