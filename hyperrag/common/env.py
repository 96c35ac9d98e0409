"""The process environment HyperRAG runs best in, set once as defaults (a value the user set wins).

Imported by ``hyperrag/__init__``, so every entry point (the app, the bench, the CLIs, a script
that imports any hyperrag module) has these before the libraries that read them load:

- ``GOMP_SPINCOUNT``: read by GNU OpenMP when torch loads it. Idle OpenMP threads spin only
  briefly before sleeping: the reranker's row streams (:mod:`hyperrag.model.rowsplit`) own OpenMP
  teams of their own, and with libgomp's default spin those teams kept spinning after a rerank
  and slowed what came next (retrieval 22%, generation 7% in an A/B on 2 cores).
- ``HF_HUB_OFFLINE``: models come from packages and the local cache, never the network.
- ``TRANSFORMERS_NO_ADVISORY_WARNINGS``, ``TOKENIZERS_PARALLELISM``: no advice in the logs, no
  tokenizer thread pool next to torch's.
- ``LMCACHE_TRACK_USAGE``: LMCache sends no usage reports.
- ``LMCACHE_LOG_LEVEL``: LMCache logs every failed attempt while it evicts from a full CPU tier;
  the store reports what matters (misses, errors) through its own warnings.
"""
from __future__ import annotations

import os

DEFAULTS = {
    "GOMP_SPINCOUNT": "10000",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "LMCACHE_TRACK_USAGE": "false",
    "LMCACHE_LOG_LEVEL": "ERROR",
}

for _name, _value in DEFAULTS.items():
    os.environ.setdefault(_name, _value)
