"""Storage accounting and planning for the document KV store.

What one stored document costs, what a corpus costs, and what N documents of L tokens would
cost, per codec, before anything is computed (the app shows :func:`estimate` before precompute).

    >>> from hyperrag.kv.codec import get_codec
    >>> from hyperrag.kv.planner import estimate
    >>> plan = estimate(n_docs=10_000, doc_tokens=200, codec=get_codec("fp16"))   # SmolLM2-135M geometry
    >>> plan.total_bytes, plan.bytes_per_token, plan.human()
    (46081920000, 23040.96, '10,000 docs x 200 tokens, fp16: 46.1 GB (23,041 B/token, 4.61 MB/doc)')

Numbers are exact for the store's format: codec payload (KV values plus quantization scales)
plus the entry frame (magic, JSON header with address, shape and CRC32C, padded to 64 bytes).
Backends add a little of their own: ``fs://`` writes LMCache's per-file metadata and the file
system rounds files up to its block size (4 KiB: +2 KiB/doc on average); ``redis://`` keeps two
keys per entry; ``lm://`` holds entries in the server's RAM. The instruction prefix KV is shared
by every document and is not stored per document.

Functions:

- :func:`geometry_for` (model id or folder) / :meth:`~hyperrag.model.geometry.KVGeometry.of` (a live reranker): the KV shape;
- :func:`entry_bytes` / :func:`bytes_per_token`: one document / per token, codec + frame;
- :func:`estimate`: N documents of L tokens (or a list of token counts);
- :func:`plan_corpus`: a real corpus, counted with the reranker's tokenizer and truncation;
- :func:`codec_table`: :func:`estimate` for every codec, for a comparison table;
- :func:`hot_tier_gb`, :func:`budget_room_gb`: the default size of the in-process CPU tier for a corpus
  within the memory budget;
- :func:`precompute_hours`: how long precompute takes at a rate, on W workers.

From the command line, bytes per codec and hours per worker count for N passages:

    python -m hyperrag.kv.planner --docs 1000000 --tokens-per-doc 200 [--docs-per-s R] [--workers 1,8,32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Sequence

from hyperrag.kv.codec import CODECS, Codec
from hyperrag.kv.frame import frame_bytes
from hyperrag.model.geometry import KVGeometry
from hyperrag.model.loading import MODELS, MemoryFit

AUTO_TIER_MIN_GB = 0.5  # the automatic CPU tier never goes below this (room for uploaded corpora)
AUTO_TIER_HEADROOM = 1.10  # ... and holds the corpus's entries plus 10%
AUTO_TIER_MEMORY_SHARE = 0.25  # ... within a quarter of the memory this process may use
# ... and within the memory budget (Settings.memory_budget_gb; see hyperrag.model.loading.MemoryFit).


# Precompute rate of one 2-core worker (fp32 compute, fp16 store, fs://), from the record
# docs/bench/bench-default.json (storage.precompute_docs_per_s: 309 SQuAD paragraphs, 52,044 tokens;
# 2-core AMD EPYC (family 25, model 17); a 2-core Intel Xeon (family 6, model 167) measured 6.01).
# `python -m hyperrag.docs check` fails when these leave that record.
MEASURED_RECORD = "docs/bench/bench-default.json"
MEASURED_DOCS_PER_S = 4.04
MEASURED_TOKENS_PER_DOC = 52_044 / 309  # 168.4


def geometry_for(model: str | KVGeometry) -> KVGeometry:
    """The geometry of a packaged model id, or of a Hugging Face folder (its ``config.json``)."""
    if isinstance(model, KVGeometry):
        return model
    if model in MODELS:
        return MODELS[model].kv
    config = Path(model) / "config.json"
    if config.is_file():
        return KVGeometry.from_config(SimpleNamespace(**{"head_dim": None, **json.loads(config.read_text())}))
    raise ValueError(f"no KV geometry known for model {model!r}; pass a KVGeometry or a model folder "
                     f"(known: {', '.join(MODELS)})")


def entry_bytes(codec: Codec, geometry: KVGeometry | str, tokens: int) -> int:
    """Bytes of one stored document of ``tokens`` tokens: codec payload + frame."""
    g = geometry_for(geometry)
    return codec.nbytes(g.shape(tokens)) + frame_bytes(codec, g.shape(tokens))


def bytes_per_token(codec: Codec, geometry: KVGeometry | str = "smollm2-135m", tokens: int = 256) -> float:
    """Entry bytes per token for documents of ``tokens`` tokens (the frame amortized)."""
    return entry_bytes(codec, geometry, tokens) / tokens


@dataclass(frozen=True)
class StorePlan:
    codec: str
    docs: int
    tokens: int  # document tokens stored (all documents)
    total_bytes: int
    payload_bytes: int  # codec output alone (KV values + scales)
    max_doc_bytes: int

    @property
    def bytes_per_token(self) -> float:
        return self.total_bytes / self.tokens if self.tokens else 0.0

    @property
    def bytes_per_doc(self) -> float:
        return self.total_bytes / self.docs if self.docs else 0.0

    @property
    def precompute_s(self) -> float:
        """Seconds to precompute these documents on one worker like the measured one (its rate
        scaled by this plan's tokens per document)."""
        return precompute_hours(self.docs, docs_per_s_for(self.tokens / self.docs)) * 3600 if self.docs else 0.0

    def human(self) -> str:
        mean_tokens = self.tokens / self.docs if self.docs else 0
        return (f"{self.docs:,} docs x {mean_tokens:,.0f} tokens, {self.codec}: {format_bytes(self.total_bytes)} "
                f"({self.bytes_per_token:,.0f} B/token, {format_bytes(self.bytes_per_doc)}/doc)")

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_per_token": self.bytes_per_token, "bytes_per_doc": self.bytes_per_doc}


def _plan(codec: Codec, geometry: KVGeometry, token_counts: Iterable[int]) -> StorePlan:
    counts: dict[int, int] = {}
    for n in token_counts:
        counts[n] = counts.get(n, 0) + 1
    total = payload = biggest = 0
    for n, k in counts.items():
        size = entry_bytes(codec, geometry, n)
        total += k * size
        payload += k * codec.nbytes(geometry.shape(n))
        biggest = max(biggest, size)
    return StorePlan(codec.name, sum(counts.values()), sum(n * k for n, k in counts.items()), total, payload, biggest)


def estimate(n_docs: int, doc_tokens: int | Sequence[int], codec: Codec = CODECS["fp16"],
             model: str | KVGeometry = "smollm2-135m") -> StorePlan:
    """Store size for ``n_docs`` documents of ``doc_tokens`` tokens each (or one count per
    document: a sequence of length ``n_docs``). ``doc_tokens`` counts what is stored: the
    reranker stores each document cut to ``max_doc_tokens`` plus its 3-token tail."""
    g = geometry_for(model)
    if isinstance(doc_tokens, int):
        if n_docs < 0 or doc_tokens < 1:
            raise ValueError("need n_docs >= 0 and doc_tokens >= 1")
        size = entry_bytes(codec, g, doc_tokens)
        return StorePlan(codec.name, n_docs, n_docs * doc_tokens, n_docs * size,
                         n_docs * codec.nbytes(g.shape(doc_tokens)), size if n_docs else 0)
    if len(doc_tokens) != n_docs:
        raise ValueError(f"{len(doc_tokens)} token counts for {n_docs} documents")
    return _plan(codec, g, doc_tokens)


def plan_corpus(reranker, texts: Sequence[str], codec: Codec = CODECS["fp16"]) -> StorePlan:
    """Exact size of a corpus's entries: token counts from the reranker (truncation and tail
    included); duplicate texts are stored once."""
    unique = list(dict.fromkeys(texts))
    return _plan(codec, KVGeometry.of(reranker), (reranker.doc_tokens(t) for t in unique))


def codec_table(n_docs: int, doc_tokens: int | Sequence[int], model: str | KVGeometry = "smollm2-135m",
                codecs: Sequence[Codec] | None = None) -> list[StorePlan]:
    """:func:`estimate` for each codec (default: all, in CODECS order)."""
    return [estimate(n_docs, doc_tokens, codec, model) for codec in (codecs or list(CODECS.values()))]


def memory_bytes() -> int:
    """Memory this process may use: physical RAM, or the container's (cgroup) limit when lower,
    since a Space or a pod reports the host's RAM but is killed at its own limit."""
    limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit():
            limit = min(limit, int(raw))
    return limit


def hot_tier_gb(corpus_bytes: int, memory: int | None = None, room_gb: float | None = None) -> float:
    """The automatic size of the in-process CPU tier (``hot_cache_gb = -1``): big enough to hold
    the corpus's entries, so steady-state loads never wait on the backend (a tier smaller than
    the working set serves a share and reads the rest), but at most a quarter of ``memory``
    (default :func:`memory_bytes`), since LMCache reserves the whole tier when the store opens,
    and at most ``room_gb`` (what a memory budget leaves, :func:`budget_room_gb`; 0: no tier)."""
    want = max(AUTO_TIER_MIN_GB, corpus_bytes * AUTO_TIER_HEADROOM / 2**30)
    cap = (memory_bytes() if memory is None else memory) * AUTO_TIER_MEMORY_SHARE / 2**30
    if room_gb is not None:
        cap = min(cap, max(room_gb, 0.0))
    return round(min(want, cap), 3)


def memory_fit(model: str) -> MemoryFit | None:
    """A packaged model's measured memory budget and margin; None for any other model."""
    return MODELS[model].memory if model in MODELS else None


def memory_budget_gb(budget_gb: float, model: str) -> float:
    """The budget a ``memory_budget_gb`` setting stands for: -1 (the default) is the packaged model's
    own (:func:`memory_fit`), none (0) for any other model; 0 is none; else the setting."""
    if budget_gb >= 0:
        return budget_gb
    fit = memory_fit(model)
    return fit.budget_gb if fit else 0.0


def budget_room_gb(budget_gb: float, model: str, resident_bytes: int | None = None) -> float | None:
    """What a memory budget (:func:`memory_budget_gb`) leaves for the CPU tier, in the tier's GiB:
    the budget less this process's resident memory now (models and buffers loaded) and the model's
    working margin (:class:`MemoryFit`; for a model without one, the largest measured); None without
    a budget. Why a budget at all: the tier trades resident memory for ~1 ms per entry read (fs://
    reads come from the OS page cache, which the machine can reclaim and the tier cannot)."""
    budget_gb = memory_budget_gb(budget_gb, model)
    if budget_gb <= 0:
        return None
    if resident_bytes is None:
        from hyperrag.common.memory import resident_bytes as now

        resident_bytes = now()
    fit = memory_fit(model)
    margin = fit.margin_gb if fit else max(m.memory.margin_gb for m in MODELS.values() if m.memory)
    return (budget_gb * 1e9 - resident_bytes) / 2**30 - margin


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:,.0f} {unit}"
    return f"{n:.0f} B"


def format_duration(seconds: float) -> str:
    """``42 s``, ``7.5 min``, ``3.2 h``, ``2.1 days``: a precompute estimate at a readable scale."""
    for unit, size, from_ in (("days", 86_400, 172_800), ("h", 3600, 3600), ("min", 60, 60)):
        if seconds >= from_:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.0f} s"


def docs_per_s_for(tokens_per_doc: float, docs_per_s: float | None = None) -> float:
    """A precompute rate for documents of ``tokens_per_doc`` tokens: ``docs_per_s`` when given,
    else the measured rate scaled by tokens (encoding cost is close to linear in tokens at a
    few hundred tokens per document; attention's quadratic part is small at this length)."""
    if docs_per_s:
        return docs_per_s
    return MEASURED_DOCS_PER_S * MEASURED_TOKENS_PER_DOC / tokens_per_doc


def precompute_hours(n_docs: int, docs_per_s: float, workers: int = 1) -> float:
    """Hours to precompute ``n_docs`` at ``docs_per_s`` per worker on ``workers`` workers
    (each a machine like the measured one; linear: the store is assumed not to be the limit)."""
    return n_docs / (docs_per_s * workers) / 3600


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperrag.kv.planner",
                                     description="KV store bytes per codec and precompute hours for N passages.")
    parser.add_argument("--docs", type=int, required=True, help="number of passages")
    parser.add_argument("--tokens-per-doc", type=int, default=200, help="stored tokens per passage")
    parser.add_argument("--docs-per-s", type=float, default=None,
                        help=f"precompute rate of one worker (default: {MEASURED_DOCS_PER_S} docs/s measured at "
                             f"{MEASURED_TOKENS_PER_DOC:.0f} tokens/doc, scaled by tokens)")
    parser.add_argument("--workers", default="1,2,4,8,16,32,64", help="worker counts, comma-separated")
    parser.add_argument("--model", default="smollm2-135m", help="a packaged model id or a Hugging Face folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    plans = codec_table(args.docs, args.tokens_per_doc, args.model)
    rate = docs_per_s_for(args.tokens_per_doc, args.docs_per_s)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    hours = {w: precompute_hours(args.docs, rate, w) for w in workers}
    if args.json:
        print(json.dumps({"docs": args.docs, "tokens_per_doc": args.tokens_per_doc, "docs_per_s_per_worker": rate,
                          "codecs": [p.to_dict() for p in plans], "hours_by_workers": hours}, indent=2))
        return 0
    print(f"{args.docs:,} passages x {args.tokens_per_doc} tokens ({args.model}):")
    print(f"  {'codec':6} {'total':>10} {'per doc':>10} {'B/token':>9}")
    for p in plans:
        print(f"  {p.codec:6} {format_bytes(p.total_bytes):>10} {format_bytes(p.bytes_per_doc):>10} {p.bytes_per_token:9,.0f}")
    source = "given" if args.docs_per_s else f"measured {MEASURED_DOCS_PER_S} docs/s at {MEASURED_TOKENS_PER_DOC:.0f} tokens/doc, scaled"
    print(f"precompute at {rate:.2f} docs/s per worker ({source}):")
    for w, h in hours.items():
        print(f"  {w:4} worker{'s' if w > 1 else ' '} {h:10,.1f} h  ({h / 24:,.1f} days)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
