"""One place for every setting: a dataclass with documented defaults.

Precedence, lowest first: the defaults below, environment variables named
``HYPERRAG_<FIELD>`` (e.g. ``HYPERRAG_TOP_K=30``), then command-line flags
(``--top-k 30``) for front doors that call :func:`add_cli_args`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

# The shipped corpus and adapter are package data (hyperrag/shipped/, listed in pyproject.toml),
# so the defaults are the same folders in a source checkout and in an installed wheel.
REPO_ROOT = Path(__file__).resolve().parents[2]  # a checkout's root (training inputs, app assets)
SHIPPED = Path(__file__).resolve().parents[1] / "shipped"
SHIPPED_CORPUS = SHIPPED / "squad-dev-mini"
SHIPPED_ADAPTER = SHIPPED / "hyperrag-lora"
# The adapter follows the model: a packaged model with a shipped adapter gets it by default.
SHIPPED_ADAPTERS = {"smollm2-135m": SHIPPED_ADAPTER, "gemma3-270m": SHIPPED / "gemma3-270m-lora"}
# Corpora built here (ingest, the SQuAD builders) go to corpora/<name> under the current folder: the
# checkout's top level when run through ./run.sh, where corpora/squad-dev-mini links to the shipped corpus.
CORPORA = Path("corpora")
KV_ROUNDINGS = ("hessian", "nearest")  # how quantized codecs choose codes (hyperrag.rag.kv_rounding)
FOLDER_SETTINGS = {
    "corpus": "a corpus folder (docs.jsonl [+ queries.jsonl], or .txt/.md files)",
    "adapter": "a LoRA adapter folder, or '' for the zero-shot base model (no reader)",
}


def shipped_adapter(model: str) -> str:
    """The adapter a model gets when none is named: a packaged model's shipped one, else ''
    (zero-shot: the base model alone, no reader)."""
    return str(SHIPPED_ADAPTERS[model]) if model in SHIPPED_ADAPTERS else ""


def corpus_out(name: str) -> Path:
    """The default folder of a corpus built under ``name``: ``corpora/<name>``, a slug of it."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:60] or "corpus"
    return CORPORA / slug


def default_cache_dir() -> str:
    return os.environ.get("HYPERRAG_CACHE_DIR") or str(Path.home() / ".cache" / "hyperrag")


@dataclass
class Settings:
    """Engine settings. Each field's ``metadata['help']`` is its CLI help text."""

    corpus: str = field(
        default=str(SHIPPED_CORPUS),
        metadata={"help": "corpus folder (docs.jsonl [+ queries.jsonl], or .txt/.md files)"},
    )
    model: str = field(
        default="smollm2-135m",
        metadata={"help": "LLM (reranker base and generator): a packaged id (smollm2-135m, gemma3-270m: "
                          "hyperrag.model.loading.MODELS), a Hugging Face folder (config.json, *.safetensors, "
                          "tokenizer; relative or absolute), a .gguf file, or a Hub id (org/name) where the network "
                          "allows it (HF_HUB_OFFLINE=0). The default adapter follows a packaged model (each ships one); "
                          "with any other model pass --adapter '' or an adapter trained for it"},
    )
    adapter: str = field(
        default=str(SHIPPED_ADAPTER),
        metadata={"help": "LoRA adapter folder for the reranker and reader (default: the shipped trained "
                          "one); '' for the zero-shot base model (no reader)"},
    )
    retrieval_weight: float = field(
        default=-1.0,
        metadata={"help": "rank by reranker score + w x retriever cosine; -1 = the adapter's w tuned on "
                          "SQuAD train (its hyperrag.json; 0 without adapter), 0 = reranker score alone"},
    )
    embedder: str = field(
        default="all-minilm-l6-v2", metadata={"help": "embedder id from hyperrag.model.loading.EMBEDDERS"}
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(
        default="auto",
        metadata={"help": "compute dtype: auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16"},
    )
    top_k: int = field(default=20, metadata={"help": "candidates retrieved per question"})
    top_n: int = field(default=3, metadata={"help": "reranked documents given to the generator"})
    batch_size: int = field(default=20, metadata={"help": "(question, document) pairs per reranker batch"})
    cpu_streams: int = field(
        default=2,
        metadata={"help": "CPU threads that run at once on one model call (every op still uses torch's "
                          "threads): a reranker batch's rows split between them, a long answer prompt "
                          "prefills as two chunks; 1 = one stream. Ignored on GPU"},
    )
    cpu_linear: str = field(
        default="auto",
        metadata={"help": "CPU kernel for the model's projections and output head: auto = timed on this machine at first start "
                          "and cached per CPU model (hyperrag.model.kernels), aten (F.linear / MKL) or onednn"},
    )
    cpu_stream_threads: int = field(
        default=0,
        metadata={"help": "OpenMP threads of a small (KV-reuse) row stream: 0 = one or all of torch's threads, "
                          "whichever ran a reuse-shaped batch faster on this machine at first start (cached per "
                          "CPU model), N = N threads"},
    )
    max_new_tokens: int = field(default=16, metadata={"help": "answer length limit (greedy decoding)"})
    selection_weight: float = field(
        default=-1.0,
        metadata={"help": "reader: the answer is the top-n candidate with the best ranking score + w x its "
                          "log-likelihood; -1 = the adapter's w tuned on SQuAD train (its hyperrag.json)"},
    )
    reader_span: int = field(
        default=-1, metadata={"help": "reader: 1 = each answer must be a span of its document (constrained "
                                      "decoding), 0 = free greedy decoding, -1 = the adapter's choice, measured "
                                      "on SQuAD train (span if it has none)"},
    )
    reader_first_tokens: int = field(
        default=1, metadata={"help": "reader: rows per document, whose answers start with its 1st, 2nd, ... likeliest "
                                     "first token and go on greedily; every row is a candidate (2: answer EM +0.01, "
                                     "F1 unchanged, reading 30% slower; see hyperrag.rag.reader)"},
    )
    abstain_threshold: float = field(
        default=-1.0,
        metadata={"help": "reader: decline (\"not found in these documents\", with the closest passages) when an "
                          "answer's confidence (from the best passage's fused score, its lead over the next passage read "
                          "and the answer's likelihood, "
                          "hyperrag.rag.calibration) is below this; -1 = the adapter's threshold, chosen on held-out "
                          "SQuAD train articles (its hyperrag.json; never declines without one), 0 = never decline"},
    )
    draft_tokens: int = field(
        default=8, metadata={"help": "reader: document tokens after the answer so far that one decode step checks "
                                     "as a draft (prompt-lookup decoding: the same greedy answers in fewer "
                                     "forwards); 0 = one token per step"},
    )
    max_question_tokens: int = field(
        default=64, metadata={"help": "longer questions are truncated, with a notice"}
    )
    max_doc_tokens: int = field(
        default=448, metadata={"help": "documents are truncated to this many tokens for the reranker"}
    )
    store_url: str = field(
        default="",
        metadata={
            "help": "KV store: fs://DIR (default <cache-dir>/kv) | memory:// | lm://HOST:PORT | redis://HOST:PORT"
        },
    )
    codec: str = field(default="fp16", metadata={"help": "stored KV codec: fp32 | fp16 | bf16 | int8 | int4 | int2"})
    kv_rotation: int = field(
        default=1, metadata={"help": "1 = queries and keys are multiplied by a Hadamard matrix after RoPE, so "
                                     "stored keys have no outlier channels and quantized codecs (int8/int4/int2) "
                                     "lose less; attention is unchanged. 0 = keys as the model computes them"},
    )
    kv_rounding: str = field(
        default="hessian",
        metadata={"help": "how int8/int4/int2 choose their codes: hessian = GPTQ-style rounding that pushes "
                          "errors where the reranker's and the reader's queries barely read (measured once per "
                          "model on the shipped SQuAD-train calibration set, cached; about half of int4's "
                          "largest score error), nearest = each value to its nearest level. The bytes decode "
                          "the same way"},
    )
    hot_cache_gb: float = field(
        default=-1.0,
        metadata={"help": "in-process LMCache CPU tier in front of the store, GB; -1 = sized to hold the corpus's "
                          "KV plus a tenth (at least 0.5, at most a quarter of RAM) within memory_budget_gb, "
                          "0 = none (a 20-document load from fs:// then takes ~33 ms instead of ~14 ms)"},
    )
    memory_budget_gb: float = field(
        default=-1.0,
        metadata={"help": "peak resident memory (decimal GB) the automatic CPU tier (hot_cache_gb -1) keeps the "
                          "process under: the tier gets what the loaded models and buffers and the model's working "
                          "margin leave; -1 = the packaged model's own, as measured (hyperrag.model.loading.MODELS: "
                          "its memory), none for other models; 0 = no budget"},
    )
    store_timeout_s: float = field(
        default=5.0, metadata={"help": "bound on any single store operation before falling back to compute"}
    )
    batch_window_ms: float = field(
        default=10.0,
        metadata={"help": "concurrent requests: how long a request waits for others to share its model calls "
                          "(reranker batches, reader decode steps); requests that queue while a batch runs "
                          "join the next one anyway (hyperrag.workbench.batcher)"},
    )
    batch_requests: int = field(
        default=8, metadata={"help": "concurrent requests: most questions answered together in one batch"}
    )
    queue_size: int = field(
        default=64, metadata={"help": "concurrent requests: most waiting at once; more are told the engine is busy"}
    )
    serve_max_body_mb: float = field(
        default=4.0,
        metadata={"help": "HTTP service (python -m hyperrag.serve): largest request body, MB; larger ones get 413 "
                          "(1,000 documents of max_doc_tokens tokens take about 2.5 MB of JSON)"},
    )
    serve_max_documents: int = field(
        default=1000,
        metadata={"help": "HTTP service: most documents in one rerank or answer request (Cohere's limit); more get "
                          "422. Each document is cut at max_doc_tokens, and the response lists the ones cut. "
                          "Requests waiting beyond queue_size get 429 with Retry-After"},
    )
    cache_dir: str = field(
        default_factory=default_cache_dir,
        metadata={"help": "models (safetensors copies), indexes and the default KV store live here"},
    )
    seed: int = field(default=0, metadata={"help": "seed for anything random (query sampling)"})

    def __post_init__(self) -> None:
        if self.adapter == str(SHIPPED_ADAPTER) and self.model in SHIPPED_ADAPTERS:
            self.adapter = str(SHIPPED_ADAPTERS[self.model])
        if not self.store_url:
            self.store_url = f"fs://{Path(self.cache_dir) / 'kv'}"
        for name in ("top_k", "top_n", "batch_size", "cpu_streams", "max_new_tokens", "max_question_tokens", "max_doc_tokens",
                     "batch_requests", "queue_size", "reader_first_tokens", "serve_max_documents"):
            if getattr(self, name) < 1:
                raise ValueError(f"setting {name} must be >= 1, got {getattr(self, name)}")
        if self.kv_rounding not in KV_ROUNDINGS:
            raise ValueError(f"setting kv_rounding must be one of {', '.join(KV_ROUNDINGS)}, got {self.kv_rounding!r}")
        if self.serve_max_body_mb <= 0:
            raise ValueError(f"setting serve_max_body_mb must be > 0, got {self.serve_max_body_mb}")
        if self.draft_tokens < 0:
            raise ValueError(f"setting draft_tokens must be >= 0, got {self.draft_tokens}")
        if not (self.abstain_threshold == -1 or 0 <= self.abstain_threshold <= 1):
            raise ValueError(f"setting abstain_threshold must be -1 (the adapter's) or a confidence in [0, 1], "
                             f"got {self.abstain_threshold}")
        if self.cpu_stream_threads < 0:
            raise ValueError(f"setting cpu_stream_threads must be >= 0 (0 = measured), got {self.cpu_stream_threads}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Defaults, then ``HYPERRAG_*`` variables, then keyword overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f"HYPERRAG_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _coerce(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def folder(self, name: str) -> Path:
        """The ``corpus`` or ``adapter`` folder, checked before it is read: a missing one is
        reported with the variable and flag that set it, not by a later, unrelated failure."""
        value = getattr(self, name)
        default = next(f.default for f in fields(self) if f.name == name)
        return existing_folder(value, f"HYPERRAG_{name.upper()} or --{name.replace('_', '-')}", FOLDER_SETTINGS[name],
                               " (the default: the package's shipped folder)" if value == default else "")


def existing_folder(path: str | Path, setting: str, expected: str, note: str = "") -> Path:
    """``path`` if it is a folder, else a :class:`FileNotFoundError` naming ``setting`` to change."""
    folder = Path(path)
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"{folder} {state}{note}: set {setting} to {expected}")
    return folder


def _coerce(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str}.get(str(f.type), str)
    try:
        return kind(raw)
    except ValueError as err:
        raise ValueError(f"HYPERRAG_{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from err


def add_cli_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per setting (default: unset, so env and defaults still apply)."""
    group = parser.add_argument_group("engine settings (also HYPERRAG_<NAME> env vars)")
    for f in fields(Settings):
        if f.name in skip:
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        group.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None, help=f.metadata.get("help")
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    names = {f.name for f in fields(Settings)}
    return Settings.from_env(**{k: v for k, v in vars(args).items() if k in names})
