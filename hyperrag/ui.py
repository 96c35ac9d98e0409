"""The HyperRAG workbench: a Gradio Blocks app over the engine (``app.py`` launches it).

All work is engine calls (:class:`hyperrag.pipeline.Engine`) and the bench's figure functions;
this module only keeps the process-wide state a multi-user app needs and turns results into
components:

- :class:`Workbench`: the models, reranker, generator and KV store are loaded once per process
  (module-level cache, guarded by a lock) and shared by every session; each corpus (the shipped
  one, uploads) gets its own index, and a light ``Engine`` view over the shared parts, so one
  user's upload never changes another user's answers. Store and reranker settings (codec,
  store URL, batch size) are process-wide and change only through an explicit *Apply*, which
  waits for running requests and re-opens the store.
- uploads are size-limited, copied into ``<data dir>/uploads/<id>/`` under sanitized names and
  validated with :func:`hyperrag.corpus.load_corpus`; nothing is written outside the data folder.
- callbacks (``cb_*``) take and return plain component values, so tests call them directly.
"""
from __future__ import annotations

import csv
import html
import io
import json
import logging
import os
import random
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import gradio as gr
import pandas as pd

from hyperrag import figures, report
from hyperrag.corpus import TEXT_SUFFIXES, Corpus, CorpusError, Query, load_corpus
from hyperrag.kv import planner
from hyperrag.kv.codec import CODECS
from hyperrag.kv.store import StoreError, parse_store_url, redact_url
from hyperrag.metrics import exact_match, f1_score
from hyperrag.modes import MODE_TABLE, MODES as MODE_SPECS
from hyperrag.pipeline import MODES, Engine, QuestionError, RAGResult, clean_question
from hyperrag.precompute import PrecomputeReport, precompute
from hyperrag.runtime import Runtime
from hyperrag.settings import REPO_ROOT, Settings

log = logging.getLogger("hyperrag.ui")
ASSETS = REPO_ROOT / "assets"
DEFAULT_KEY = "default"
SHIPPED, UPLOAD = "Shipped corpus", "Upload my own"
# The Ask tab's columns: traditional RAG, the full-prefill and KV-reuse rerankers with the
# traditional generator, and HyperRAG's reader on the same stored KV (reader_full: batch tab).
COMPARE_MODES = ("retrieval", "baseline", "reuse", "reader_kv")
MODE_TITLES = {m.name: m.title for m in MODE_TABLE}
ZERO_SHOT = "zero_shot"  # batch-only mode: what the trained adapter is measured against
MAX_GOLD_CHOICES = 400
MAX_BATCH_QUERIES = 200
MAX_TOP_K, MAX_TOP_N = 50, 10  # per request: bounds the work (and memory) one request can ask for
MAX_BATCH_SIZE = 32  # the reranker's buffers grow linearly with it (~55 MB per row for SmolLM2)


class UploadError(ValueError):
    """An upload that cannot be used; the message is shown to the user as is."""


def UserError(message: str) -> gr.Error:  # noqa: N802 (reads like the exception it makes)
    """A message for the user (bad input, busy, ...): shown in the UI, no traceback in the log."""
    return gr.Error(message, print_exception=False)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


@dataclass
class AppConfig:
    """App-side limits and folders (engine settings live in :class:`Settings`)."""

    data_dir: Path
    upload_max_mb: float = 25.0  # per upload, all files together
    upload_max_files: int = 1000
    upload_max_docs: int = 5000
    keep_uploads: int = 20  # upload folders kept on disk (oldest removed first)
    keep_exports: int = 20
    allow_any_store: bool = False  # let users point the app at any store URL (trusted deployments)

    @classmethod
    def from_env(cls, settings: Settings, data_dir: str | Path | None = None, **overrides: Any) -> "AppConfig":
        folder = data_dir or os.environ.get("HYPERRAG_DATA_DIR") or Path(settings.cache_dir) / "app"
        values = dict(
            upload_max_mb=_env_float("HYPERRAG_UPLOAD_MAX_MB", cls.upload_max_mb),
            upload_max_docs=int(_env_float("HYPERRAG_UPLOAD_MAX_DOCS", cls.upload_max_docs)),
            allow_any_store=os.environ.get("HYPERRAG_ALLOW_ANY_STORE", "") in ("1", "true", "yes"),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(Path(folder).expanduser().resolve(), **values)

    @property
    def upload_max_bytes(self) -> int:
        return int(self.upload_max_mb * 2**20)

    @property
    def uploads(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def exports(self) -> Path:
        return self.data_dir / "exports"

    @property
    def stores(self) -> Path:
        return self.data_dir / "stores"


# --------------------------------------------------------------------------------------------
# process-wide state
# --------------------------------------------------------------------------------------------
class _Gate:
    """Many requests at once, or one reconfiguration alone (it waits for running requests)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0
        self._writer = False

    @contextmanager
    def use(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self, timeout_s: float) -> Iterator[None]:
        with self._cond:
            if not self._cond.wait_for(lambda: not self._writer, timeout_s):
                raise TimeoutError("another settings change is in progress")
            self._writer = True
            if not self._cond.wait_for(lambda: self._users == 0, timeout_s):
                self._writer = False
                self._cond.notify_all()
                raise TimeoutError("requests are still running (a precompute or a batch?)")
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class CorpusEntry:
    key: str
    label: str
    corpus: Corpus
    index: Any = None  # DenseIndex once built
    doc_tokens: list[int] | None = None
    report: PrecomputeReport | None = None
    sources: tuple[str, ...] = ()  # the uploaded files this entry was staged from
    upload_errors: tuple[str, ...] = ()  # files (or pages) of the upload that gave no passages, and why
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def gold(self) -> dict[str, Query]:
        return {q.question: q for q in self.corpus.queries}


class Workbench:
    """Everything one app process shares: models and store (loaded once), corpora, settings."""

    def __init__(self, settings: Settings, config: AppConfig, max_corpora: int = 8):
        self.settings = settings
        self.config = config
        self.max_corpora = max_corpora
        self.startup_store_url = settings.store_url
        self.gate = _Gate()
        self._lock = threading.Lock()  # loading, corpus registry
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._base: Engine | None = None
        self._zero_shot: Runtime | None = None
        self._corpora: OrderedDict[str, CorpusEntry] = OrderedDict()
        self._loader: threading.Thread | None = None

    # -- loading ------------------------------------------------------------------------------
    def load(self, progress: Callable[[int, int], None] | None = None) -> Engine:
        """Load models, store and the default corpus's index once; later calls return at once."""
        with self._lock:
            if self._base is None:
                try:
                    self._base = Engine.load(self.settings, progress=progress)
                except BaseException as err:
                    self._load_error = err
                    self._ready.set()
                    raise
                default = self._base.corpus
                self._corpora[DEFAULT_KEY] = CorpusEntry(DEFAULT_KEY, default_label(default), default,
                                                         self._base.index)
                self._load_error = None
                self._ready.set()
        return self._base

    def start_loading(self) -> None:
        """Load in a background thread (the page shows while the models load)."""
        def run() -> None:
            try:
                self.load()
            except BaseException:  # kept in _load_error, shown by status()
                log.exception("loading the engine failed")

        self._loader = threading.Thread(target=run, name="hyperrag-load", daemon=True)
        self._loader.start()

    def wait_ready(self, timeout_s: float = 600.0) -> Engine:
        if self._base is None and self._loader is None:
            return self.load()
        if not self._ready.wait(timeout_s):
            raise UserError("the models are still loading: try again in a minute")
        if self._load_error is not None or self._base is None:
            raise UserError(f"the engine could not be loaded: {self._load_error}")
        return self._base

    @property
    def ready(self) -> bool:
        return self._base is not None

    def close(self) -> None:
        if self._zero_shot is not None:
            self._zero_shot.close()
        if self._base is not None:
            self._base.close()

    # -- corpora ------------------------------------------------------------------------------
    def entry(self, key: str | None) -> CorpusEntry:
        self.wait_ready()
        with self._lock:
            entry = self._corpora.get(key or DEFAULT_KEY)
            if entry is None:
                raise UserError("that uploaded corpus is no longer loaded (the app keeps the latest few): "
                                "upload it again")
            self._corpora.move_to_end(entry.key)
            return entry

    def find(self, key: str) -> CorpusEntry | None:
        with self._lock:
            return self._corpora.get(key)

    def _register(self, entry: CorpusEntry) -> None:
        with self._lock:
            self._corpora[entry.key] = entry
            uploads = [k for k in self._corpora if k != DEFAULT_KEY]
            for old in uploads[: max(0, len(uploads) - self.max_corpora)]:
                del self._corpora[old]

    def stage_upload(self, paths: Sequence[str], progress: Callable[[int, int], None] | None = None) -> CorpusEntry:
        """Check, copy and load uploaded files as a new corpus (no index yet). Documents
        (.txt/.md/.pdf/.html/.docx/.zip) go through :func:`hyperrag.ingest.ingest` into passages
        with their source (file, page); ``progress(files done, files)`` after each file."""
        base = self.wait_ready()
        folder = copy_upload(paths, self.config)
        errors: list[str] = []
        try:
            if not (folder / "docs.jsonl").exists():
                errors = ingest_upload(folder, base.reranker.llm.tokenizer, self.settings.max_doc_tokens,
                                       self.config, progress)
            corpus = load_corpus(folder, max_file_bytes=self.config.upload_max_bytes)
            if len(corpus) > self.config.upload_max_docs:
                raise UploadError(f"{len(corpus):,} documents: the app takes at most "
                                  f"{self.config.upload_max_docs:,} per upload (HYPERRAG_UPLOAD_MAX_DOCS)")
        except CorpusError as err:
            shutil.rmtree(folder, ignore_errors=True)
            raise UploadError(_relative_message(str(err), folder)) from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        key = folder.name
        entry = CorpusEntry(key, f"upload {key} ({len(corpus)} docs)", corpus, sources=tuple(map(str, paths)),
                            upload_errors=tuple(errors))
        self._register(entry)
        with self._lock:
            in_use = {e.corpus.root for e in self._corpora.values()}
        prune_folders(self.config.uploads, self.config.keep_uploads, keep=in_use)
        return entry

    def doc_tokens(self, entry: CorpusEntry) -> list[int]:
        """Stored tokens of each distinct document (the reranker's truncation and tail included)."""
        if entry.doc_tokens is None:
            reranker = self.wait_ready().reranker
            entry.doc_tokens = [reranker.doc_tokens(t) for t in dict.fromkeys(d.text for d in entry.corpus.docs)]
        return entry.doc_tokens

    def engine(self, entry: CorpusEntry, progress: Callable[[int, int], None] | None = None) -> Engine:
        """A view over the shared runtime for this corpus (its index built once)."""
        base = self.wait_ready()
        with entry.lock:
            if entry.index is None:
                entry.index = base.runtime.index(entry.corpus, progress)
        return Engine(base.runtime, entry.corpus, entry.index)

    def zero_shot_engine(self, entry: CorpusEntry) -> Engine:
        """The base model without the adapter as reranker over this corpus: the reference the
        trained adapter is measured against. Made on first use; its document KV lives in its own
        in-process store (as big as the main store's CPU tier, at least 1 GB), computed when
        first needed."""
        view = self.engine(entry)
        with self._lock:
            if self._zero_shot is None:
                self._zero_shot = view.runtime.zero_shot(max(1.0, view.store.hot_cache_gb))
            zero_shot = self._zero_shot
        return Engine(zero_shot, view.corpus, view.index)

    # -- storage estimate ---------------------------------------------------------------------
    def estimate(self, entry: CorpusEntry, codecs: Sequence[str] | None = None) -> dict:
        """What the document KV of this corpus will take in the store, per codec (the planner)."""
        geometry = planner.KVGeometry.of(self.wait_ready().reranker)
        tokens = self.doc_tokens(entry)
        rows = [{"codec": p.codec, "bytes": p.total_bytes, "bytes_per_token": p.bytes_per_token,
                 "tokens": p.tokens, "docs": p.docs}
                for p in planner.codec_table(len(tokens), tokens, geometry, codecs)]
        return {"docs": len(tokens), "tokens": sum(tokens), "codecs": rows,
                "codec": self.settings.codec, "store": self.store_label()}

    # -- settings -----------------------------------------------------------------------------
    def store_label(self) -> str:
        base = self._base
        return redact_url(base.store.url if base else self.settings.store_url)  # never show a password

    def check_store_url(self, url: str) -> str:
        """Refuse store URLs that would let a web user write anywhere or reach any host."""
        url = (url or "").strip()
        if not url or url == redact_url(self.startup_store_url):  # the field shows the startup URL redacted
            url = self.startup_store_url
        try:
            scheme, _ = parse_store_url(url) if not url.startswith("fs://") else ("fs", None)
        except StoreError as err:
            raise UserError(str(err)) from None
        if self.config.allow_any_store or url == self.startup_store_url or scheme == "memory":
            return url
        if scheme == "fs":
            folder = Path(url[len("fs://"):]).expanduser()
            folder = (folder if folder.is_absolute() else self.config.stores / folder).resolve()
            allowed = [self.config.data_dir, Path(self.startup_store_url[len("fs://"):]).expanduser().resolve()
                       if self.startup_store_url.startswith("fs://") else self.config.data_dir]
            if not any(folder == a or folder.is_relative_to(a) for a in allowed):
                raise UserError(f"fs:// stores must live under the app's data folder ({self.config.stores}); "
                               "relative paths are placed there (start the app with --allow-any-store to lift this)")
            return f"fs://{folder}"
        host = url.split("://", 1)[1].rpartition("@")[2].rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise UserError(f"{scheme}:// stores on other hosts are off for web users: start the app with "
                           "--store-url (or HYPERRAG_STORE_URL) pointing at it, or with --allow-any-store")
        return url

    def reconfigure(self, codec: str, store_url: str, batch_size: int, timeout_s: float = 60.0) -> list[str]:
        """Re-open the store (codec, URL) and/or rebuild the reranker (batch size); returns notes."""
        base = self.wait_ready()
        if codec not in CODECS:
            raise UserError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
        batch_size = int(batch_size)
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise UserError(f"batch size must be between 1 and {MAX_BATCH_SIZE}")
        url = self.check_store_url(store_url)
        notes: list[str] = []
        try:
            with self.gate.exclusive(timeout_s):
                new = self.settings.replace(codec=codec, store_url=url, batch_size=batch_size)
                notes = base.runtime.reconfigure(new)
                if any(n.startswith("store re-opened") for n in notes):
                    for entry in list(self._corpora.values()):
                        entry.report = None
                self.settings = new
                with self._lock:  # the zero-shot reference is remade with a new codec or batch size
                    zs = self._zero_shot
                    if zs is not None and (zs.settings.codec, zs.settings.batch_size) != (codec, batch_size):
                        zs.close()
                        self._zero_shot = None
        except TimeoutError as err:
            raise UserError(f"settings not changed: {err}; try again when it ends") from None
        return notes or ["nothing changed"]

    def status(self) -> str:
        if self._load_error is not None:
            return f"**Engine failed to load:** {self._load_error}"
        if not self.ready:
            return "Loading models and index…"
        s, store = self.settings, self._base.store
        text = (f"**Model** {s.model}{' + ' + Path(s.adapter).name if s.adapter else ''} · "
                f"**device** {self._base.reranker.decoder.device} · "
                f"**store** `{redact_url(store.url)}` ({store.codec.name}) · **batch** {s.batch_size}")
        if store.url != s.store_url:
            text += f" · ⚠ `{redact_url(s.store_url)}` could not be used: an in-process store stands in"
        elif not store.available:
            text += " · ⚠ the store is unreachable: document KV is computed per query until it is back"
        return text


# --------------------------------------------------------------------------------------------
# uploads and files
# --------------------------------------------------------------------------------------------
def default_label(corpus: Corpus) -> str:
    shipped = corpus.root.resolve().is_relative_to(REPO_ROOT / "corpora")
    return f"{corpus.name} ({'shipped' if shipped else 'default'})"


def safe_name(name: str) -> str:
    """A file name that cannot escape its folder: basename only, [A-Za-z0-9._-], no leading dot."""
    base = re.split(r"[\\/]", name)[-1]
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip("._-")[:100]
    return clean or "file"


UPLOAD_DOC_SUFFIXES = (*TEXT_SUFFIXES, ".pdf", ".html", ".htm", ".docx", ".zip")  # read by hyperrag.ingest
UPLOAD_KINDS = "docs.jsonl (+ queries.jsonl) or .txt/.md/.pdf/.html/.docx/.zip files"


def copy_upload(paths: Sequence[str], config: AppConfig) -> Path:
    """Check sizes and kinds, then copy the files into a fresh ``<data>/uploads/<id>/`` folder.

    jsonl uploads become ``docs.jsonl`` (and ``queries.jsonl`` for a file whose name says so);
    documents (.txt/.md/.pdf/.html/.docx/.zip) keep their sanitized names, for :func:`ingest_upload`."""
    paths = [str(p) for p in paths or [] if p]
    if not paths:
        raise UploadError(f"no files: choose {UPLOAD_KINDS}")
    if len(paths) > config.upload_max_files:
        raise UploadError(f"{len(paths)} files: at most {config.upload_max_files} per upload")
    total = 0
    jsonl, texts = [], []
    for p in paths:
        src = Path(p)
        name = src.name
        if not src.is_file():
            raise UploadError(f"{name}: not a readable file")
        size = src.stat().st_size
        total += size
        if size > config.upload_max_bytes or total > config.upload_max_bytes:
            raise UploadError(f"{name}: the upload is over the {config.upload_max_mb:g} MiB limit "
                              f"({total / 2**20:.1f} MiB so far; HYPERRAG_UPLOAD_MAX_MB)")
        suffix = src.suffix.lower()
        if suffix == ".jsonl":
            jsonl.append(src)
        elif suffix in UPLOAD_DOC_SUFFIXES:
            texts.append(src)
        else:
            raise UploadError(f"{name}: unsupported file type {suffix or '(none)'}; upload {UPLOAD_KINDS}")
    if jsonl and texts:
        raise UploadError("upload either jsonl files (docs.jsonl + optional queries.jsonl) or documents "
                          "(.txt/.md/.pdf/.html/.docx/.zip), not both")
    plan: list[tuple[Path, str]] = []
    if jsonl:
        queries = [p for p in jsonl if "quer" in p.name.lower()]
        docs = [p for p in jsonl if p not in queries]
        if len(docs) != 1 or len(queries) > 1:
            raise UploadError("jsonl upload: give exactly one documents file (docs.jsonl) and at most one "
                              f"queries file (a name containing 'queries'); got {', '.join(p.name for p in jsonl)}")
        plan.append((docs[0], "docs.jsonl"))
        if queries:
            plan.append((queries[0], "queries.jsonl"))
    else:
        used: set[str] = set()
        for src in texts:
            name = safe_name(src.name)
            stem, suffix = Path(name).stem, Path(name).suffix
            n = 2
            while name.lower() in used:
                name, n = f"{stem}-{n}{suffix}", n + 1
            used.add(name.lower())
            plan.append((src, name))
    config.uploads.mkdir(parents=True, exist_ok=True)
    folder = (config.uploads / secrets.token_hex(6)).resolve()
    folder.mkdir()
    try:
        for src, name in plan:
            dest = (folder / name).resolve()
            if dest.parent != folder:  # cannot happen with safe names; checked anyway
                raise UploadError(f"{src.name}: refused file name")
            shutil.copyfile(src, dest)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def ingest_upload(folder: Path, tokenizer, max_tokens: int, config: AppConfig,
                  progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Cut the uploaded documents in ``folder`` into passages (``folder/docs.jsonl``, each with its
    source file and page); returns the per-file errors. No passage at all is an :class:`UploadError`
    that names every file's problem."""
    from hyperrag.ingest import ingest

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings name no file; the errors returned do
    files = sorted(p for p in folder.iterdir() if p.is_file())
    report = ingest(files, folder, tokenizer, max_tokens, max_file_bytes=config.upload_max_bytes,
                    progress=(lambda done, total, _file: progress(done, total)) if progress else None)
    errors = [_relative_message(e, folder) for e in report.errors]
    if not report.passages:
        raise UploadError("no text could be read from the upload: " + "; ".join(errors or ["no passages"]))
    return errors


def _relative_message(message: str, folder: Path) -> str:
    return message.replace(str(folder) + os.sep, "").replace(str(folder), "upload")


def prune_folders(parent: Path, keep_count: int, keep: set[Path] = frozenset()) -> None:
    """Remove the oldest sub-folders of ``parent`` beyond ``keep_count`` (never those in ``keep``)."""
    if not parent.is_dir():
        return
    folders = sorted((p for p in parent.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    keep = {Path(k).resolve() for k in keep}
    for old in folders[keep_count:]:
        if old.resolve() not in keep:
            shutil.rmtree(old, ignore_errors=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def seconds_text(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


# --------------------------------------------------------------------------------------------
# result rendering
# --------------------------------------------------------------------------------------------
DOC_COLUMNS = ["#", "Δ", "score", "document", "gold", "used"]


def rank_change(doc) -> str:
    delta = doc.retrieval_rank - doc.rank
    return f"▲{delta}" if delta > 0 else f"▼{-delta}" if delta < 0 else "="


def docs_frame(result: RAGResult, gold: Query | None = None) -> pd.DataFrame:
    gold_ids = set(gold.doc_ids) if gold else set()
    rows = [[d.rank, rank_change(d), round(d.score, 2), d.id, "✓" if d.id in gold_ids else "",
             "✓" if d.rank <= result.top_n else ""] for d in result.docs]
    return pd.DataFrame(rows, columns=DOC_COLUMNS)


def judge(result: RAGResult, gold: Query | None) -> dict:
    """For a gold question: EM/F1 of the answer and where the gold documents ended up."""
    if gold is None:
        return {}
    out: dict[str, Any] = {}
    if gold.answers:
        out["em"] = exact_match(result.answer, gold.answers)
        out["f1"] = f1_score(result.answer, gold.answers)
    ranks = {d.id: d for d in result.docs}
    found = [ranks[g] for g in gold.doc_ids if g in ranks]
    out["gold_rank"] = min((d.rank for d in found), default=None)
    out["gold_retrieval_rank"] = min((d.retrieval_rank for d in found), default=None)
    out["gold_in_prompt"] = bool(out["gold_rank"] and out["gold_rank"] <= result.top_n)
    return out


def answer_markdown(result: RAGResult, gold: Query | None) -> str:
    answer = result.answer.strip() or "_(empty answer)_"
    lines = [f"**Answer:** {answer}"]
    if result.reading is not None:
        lines.append(source_markdown(result))
    verdict = judge(result, gold)
    if "em" in verdict:
        ok = "✓ right" if verdict["em"] else ("≈ partly right" if verdict["f1"] >= 0.5 else "✗ wrong")
        lines.append(f"**{ok}** — EM {verdict['em']:.0f} · F1 {verdict['f1']:.2f} — gold: "
                     + " / ".join(f"“{a}”" for a in dict.fromkeys(gold.answers)))
    if gold is not None and gold.doc_ids:
        if verdict["gold_rank"] is None:
            lines.append("✗ gold paragraph not among the candidates")
        else:
            where = "given to the generator ✓" if verdict["gold_in_prompt"] else "not in the top-n ✗"
            lines.append(f"Gold paragraph: rank {verdict['gold_rank']} (retrieval rank "
                         f"{verdict['gold_retrieval_rank']}), {where}")
    return "\n\n".join(lines)


def source_markdown(result: RAGResult, context: int = 160) -> str:
    """Where the reader found its answer: the document, and the answer highlighted in its text."""
    reading = result.reading
    if reading is None or reading.doc < 0:
        return "_(no answer read)_"
    doc = result.docs[reading.doc]
    where = f"Read from **{doc.title or doc.id}** (`{doc.id}`, rank {doc.rank}{source_text(doc.source)})"
    if reading.start < 0:
        return where + " — the answer is not a verbatim span of it."
    lo, hi = max(0, reading.start - context), min(len(doc.text), reading.end + context)
    before, span, after = doc.text[lo:reading.start], doc.text[reading.start:reading.end], doc.text[reading.end:hi]
    return (f"{where}:\n\n> {'…' if lo else ''}{_md(before)}<mark>**{_md(span)}**</mark>{_md(after)}"
            f"{'…' if hi < len(doc.text) else ''}")


def source_text(source: dict | None) -> str:
    """``, file.pdf page 2`` for an ingested passage; nothing for a corpus without sources."""
    if not source or not source.get("file"):
        return ""
    page = f" page {source['page']}" if source.get("page") else ""
    return f", {source['file']}{page}"


def _md(text: str) -> str:
    """Plain text safe inside markdown (no accidental emphasis, links or HTML)."""
    return html.escape(text).replace("*", "\\*").replace("_", "\\_").replace("[", "\\[").replace("\n", " ")


def timing_markdown(result: RAGResult) -> str:
    t = result.timings
    spec = MODE_SPECS[result.mode]
    parts = [f"retrieve {seconds_text(t['retrieve'])}"]
    if spec.rerank is not None:
        if "reuse" == spec.rerank:
            parts.append(f"KV load {seconds_text(t['kv_load'])}")
        parts.append(f"rerank {seconds_text(t['rerank'])}")
    parts.append(f"{'read' if spec.read else 'generate'} {seconds_text(t['generate'])}")
    return " · ".join(parts) + f" · **total {seconds_text(t['total'])}**"


def summary_markdown(results: dict[str, RAGResult]) -> str:
    base, reuse, retr = results.get("baseline"), results.get("reuse"), results.get("retrieval")
    lines = []
    if base and reuse:
        tb = base.timings["kv_load"] + base.timings["rerank"]
        tr = reuse.timings["kv_load"] + reuse.timings["rerank"]
        speed = f"{tb / tr:.1f}×" if tr else "∞×"
        lines.append(f"**KV reuse reranked {len(reuse.docs)} documents {speed} faster than the baseline** "
                     f"({seconds_text(tr)} vs {seconds_text(tb)}); end to end {seconds_text(reuse.timings['total'])} "
                     f"vs {seconds_text(base.timings['total'])}.")
        if base.ranked_ids == reuse.ranked_ids:
            same = "Same ranking ✓"
        else:
            scores = {d.id: d.score for d in base.docs}
            diff = max(abs(scores[d.id] - d.score) for d in reuse.docs if d.id in scores)
            top = set(base.ranked_ids[: base.top_n]) == set(reuse.ranked_ids[: reuse.top_n])
            same = (f"Same top-{reuse.top_n} {'✓' if top else '✗'}; the full ranking differs (near-tied scores, "
                    f"max difference {diff:.1e})")
        lines[-1] += f" {same} · same answer {'✓' if base.answer == reuse.answer else '✗'}"
    reader = results.get("reader_kv")
    if reader and base:
        ratio = base.timings["total"] / reader.timings["total"] if reader.timings["total"] else float("inf")
        lines.append(f"**The reader answered from the stored KV in {seconds_text(reader.timings['total'])}**, "
                     f"{ratio:.1f}× faster end to end than the baseline; no document token was computed.")
    if retr:
        lines.append(f"Retrieval only (no reranker): {seconds_text(retr.timings['total'])}.")
    return "  \n".join(lines)


def banner(messages: Sequence[str]) -> dict:
    """The visible warning banner (hidden when there is nothing to say)."""
    unique = list(dict.fromkeys(m for m in messages if m))
    text = "\n\n".join(f"⚠ {m}" for m in unique)
    return gr.update(value=text, visible=bool(unique))


def gold_choices(entry: CorpusEntry) -> list[tuple[str, str]]:
    queries = entry.corpus.queries[:MAX_GOLD_CHOICES]
    return [(q.question, q.question) for q in queries]


def corpus_markdown(entry: CorpusEntry, estimate: dict | None = None) -> str:
    c = entry.corpus
    text = f"**{entry.label}** — {len(c):,} documents, {len(c.queries):,} gold questions"
    if estimate:
        rows = {r["codec"]: r for r in estimate["codecs"]}
        chosen = rows[estimate["codec"]]
        others = ", ".join(f"{r['codec']} {human_bytes(r['bytes'])}" for r in estimate["codecs"]
                           if r["codec"] != estimate["codec"])
        text += (f"\n\n**Storage estimate:** {estimate['tokens']:,} document tokens × "
                 f"{chosen['bytes_per_token'] / 1024:.1f} KB/token = **{human_bytes(chosen['bytes'])}** "
                 f"with the {estimate['codec']} codec in `{estimate['store']}` (other codecs: {others}).")
    if entry.report is not None:
        r = entry.report
        text += (f"\n\n**KV caches:** {r.encoded} encoded, {r.skipped} already stored, {r.failed} failed; "
                 f"{human_bytes(r.bytes)} written in {r.seconds:.1f} s")
    return text


# --------------------------------------------------------------------------------------------
# callbacks (plain values in, plain values / updates out)
# --------------------------------------------------------------------------------------------
_WORKBENCH: Workbench | None = None
_WORKBENCH_LOCK = threading.Lock()


def get_workbench(settings: Settings | None = None, config: AppConfig | None = None) -> Workbench:
    """The process's workbench (created on first use; the engine itself loads once)."""
    global _WORKBENCH
    with _WORKBENCH_LOCK:
        if _WORKBENCH is None:
            settings = settings or Settings.from_env()
            _WORKBENCH = Workbench(settings, config or AppConfig.from_env(settings))
        return _WORKBENCH


def set_workbench(workbench: Workbench | None) -> None:
    global _WORKBENCH
    with _WORKBENCH_LOCK:
        _WORKBENCH = workbench


def _gr_progress(progress, desc: str):
    def report(done: int, total: int) -> None:
        if progress is not None:
            progress((done, max(total, 1)), desc=desc)
    return report


def resolve_entry(wb: Workbench, source: str, files: Sequence[str] | None, key: str | None,
                  progress: Callable[[int, int], None] | None = None) -> CorpusEntry:
    """The corpus a Corpus-tab action is about: the default one, the staged upload, or a new upload
    (documents read into passages with ``progress``; files that gave none are shown as warnings)."""
    if source != UPLOAD:
        return wb.entry(DEFAULT_KEY)
    files = [str(f) for f in files or [] if f]
    staged = wb.find(key) if key and key != DEFAULT_KEY else None
    if staged is not None and (not files or staged.sources == tuple(files)):
        return staged
    try:
        entry = wb.stage_upload(files, progress)
    except UploadError as err:
        raise UserError(str(err)) from None
    for error in entry.upload_errors:
        gr.Warning(error)
    return entry


def cb_select_corpus(source: str, files: Sequence[str] | None, key: str | None, codec: str | None = None,
                     progress=gr.Progress()):
    """Corpus choice or upload changed: validate it, estimate its storage, list its gold questions.

    Returns (corpus key, corpus markdown, gold dropdown update, banner update)."""
    wb = get_workbench()
    if source == UPLOAD and not files:
        return (key or DEFAULT_KEY, "Choose files to upload: `docs.jsonl` (+ `queries.jsonl`) or "
                "`.txt`/`.md`/`.pdf`/`.html`/`.docx`/`.zip` files "
                f"(at most {wb.config.upload_max_mb:g} MiB in all).", gr.update(), banner([]))
    entry = resolve_entry(wb, source, files, key, _gr_progress(progress, "reading uploaded files"))
    estimate = wb.estimate(entry)
    choices = gold_choices(entry)
    return (entry.key, corpus_markdown(entry, estimate),
            gr.update(choices=choices, value=None), banner(list(entry.upload_errors)))


def cb_files_changed(files: Sequence[str] | None, key: str | None, progress=gr.Progress()):
    """Files dropped in (or cleared): switch the corpus choice to match, then as cb_select_corpus."""
    source = UPLOAD if files else SHIPPED
    return (source, *cb_select_corpus(source, files, key, progress=progress))


def cb_prepare(source: str, files: Sequence[str] | None, key: str | None, progress=gr.Progress()):
    """The one button: embed and index the corpus, then precompute its document KV caches.

    Returns (corpus key, corpus markdown, gold dropdown update, banner update, status)."""
    wb = get_workbench()
    if progress is not None:
        progress(0, desc="loading models")
    wb.wait_ready()
    entry = resolve_entry(wb, source, files, key, _gr_progress(progress, "reading uploaded files"))
    estimate = wb.estimate(entry)
    with wb.gate.use():
        engine = wb.engine(entry, _gr_progress(progress, "embedding documents"))
        report = engine.precompute(_gr_progress(progress, "precomputing document KV caches"))
        warnings = report.warnings + engine.store.take_warnings()
    entry.report = report
    for w in warnings:
        gr.Warning(w)
    return (entry.key, corpus_markdown(entry, estimate), gr.update(choices=gold_choices(entry), value=None),
            banner(warnings), wb.status())


def cb_apply_settings(codec: str, store_url: str, batch_size: float, key: str | None):
    """Explicit settings change: re-open the store and/or rebuild the reranker (shared by all users)."""
    wb = get_workbench()
    notes = wb.reconfigure(codec, store_url, int(batch_size))
    warnings = [n for n in notes if "fail" in n.lower() or "unreachable" in n.lower() or "could not" in n.lower()]
    for w in warnings:
        gr.Warning(w)
    entry = wb.entry(key)
    text = corpus_markdown(entry, wb.estimate(entry))
    return wb.status(), "; ".join(notes), text, banner(warnings), redact_url(wb.settings.store_url)


def _gold(entry: CorpusEntry, question: str) -> Query | None:
    return entry.gold.get(question.strip())


def cb_pick_gold(gold: str | None):
    """A picked gold question goes into the question box; a reset list (page load, another
    corpus) leaves whatever the user typed there."""
    return gold if gold else gr.update()


def cb_random_gold(key: str | None, seed: float | None = None) -> tuple[str, dict]:
    entry = get_workbench().entry(key)
    if not entry.corpus.queries:
        raise UserError("this corpus has no gold questions (queries.jsonl)")
    q = random.Random(seed).choice(entry.corpus.queries) if seed is not None else random.choice(entry.corpus.queries)
    return q.question, gr.update(value=q.question if q.question in {c for c, _ in gold_choices(entry)} else None)


def _ask(wb: Workbench, entry: CorpusEntry, question: str, mode: str, top_k: int, top_n: int) -> RAGResult:
    if not 1 <= top_k <= MAX_TOP_K or not 1 <= top_n <= MAX_TOP_N:
        raise UserError(f"top-k must be between 1 and {MAX_TOP_K} and top-n between 1 and {MAX_TOP_N}")
    with wb.gate.use():
        if mode == ZERO_SHOT:
            engine, mode = wb.zero_shot_engine(entry), "reuse"
        else:
            engine = wb.engine(entry)
        try:
            return engine.ask(question, mode, int(top_k), int(top_n))
        except QuestionError as err:
            raise UserError(str(err)) from None


def cb_compare(question: str, top_k: float, top_n: float, key: str | None):
    """Ask one question in each of ``COMPARE_MODES``; yields after each mode.

    Yields (summary, banner, then answer/timings/docs for each mode)."""
    wb = get_workbench()
    entry = wb.entry(key)
    try:
        question, notes = clean_question(question)
    except QuestionError as err:
        raise UserError(f"{err} (or pick a gold question)") from None
    gold = _gold(entry, question)
    results: dict[str, RAGResult] = {}
    warnings: list[str] = list(notes)
    outputs: list[Any] = [gr.update()] * (2 + 3 * len(COMPARE_MODES))
    for i, mode in enumerate(COMPARE_MODES):
        result = _ask(wb, entry, question, mode, int(top_k), int(top_n))
        results[mode] = result
        warnings += [w for w in result.warnings if w not in notes]
        outputs[2 + 3 * i: 5 + 3 * i] = [answer_markdown(result, gold), timing_markdown(result),
                                         docs_frame(result, gold)]
        outputs[0] = summary_markdown(results) or f"Running… {MODE_TITLES[mode]} done."
        outputs[1] = banner(warnings)
        yield tuple(outputs)
    for w in dict.fromkeys(warnings):
        gr.Warning(w)


# -- batch of gold queries with live dashboards --------------------------------------------------
BATCH_COLUMNS = ["query", "mode", "question", "answer", "EM", "F1", "gold rank", "total ms"]
DASHBOARDS = (("Latency per stage", figures.latency_figure), ("Throughput", figures.throughput_figure),
              ("Quality", figures.quality_figure), ("Storage", figures.storage_figure),
              ("Quality vs throughput", figures.frontier_figure))
FIGURE_NAMES = [name for name, _ in DASHBOARDS]


def batch_results(wb: Workbench, entry: CorpusEntry, records: list[dict]) -> dict:
    """The bench's result dict for the records so far, with the storage part of this store."""
    result = report.summarize(records)
    estimate = wb.estimate(entry)
    chosen = next(r for r in estimate["codecs"] if r["codec"] == estimate["codec"])
    store = wb.wait_ready().store.describe()
    result["storage"] = {"codec": estimate["codec"], "docs": estimate["docs"], "tokens": estimate["tokens"],
                         "bytes": chosen["bytes"], "bytes_per_token": chosen["bytes_per_token"],
                         "load_gb_per_s": store.get("load_gb_per_s", 0.0), "store": store.get("url"),
                         "cpu_tier_gb": store.get("cpu_tier_gb", 0.0)}
    result["codecs"] = estimate["codecs"]
    planner = [{"label": f"estimate ({estimate['codec']})", "bytes": chosen["bytes"]}]
    if entry.report is not None and entry.report.encoded and not entry.report.skipped:
        result["storage"]["precompute_docs_per_s"] = entry.report.docs_per_s
        planner.append({"label": "written by precompute", "bytes": entry.report.bytes})
    result["planner"] = planner
    return result


def batch_row(record: dict) -> list:
    answers = record.get("answers") or []
    gold = set(record.get("gold_ids") or [])
    rank = next((i for i, d in enumerate(record["ranked_ids"], 1) if d in gold), None)
    return [record["query_id"], record["mode"], record["question"], record["answer"],
            exact_match(record["answer"], answers) if answers else None,
            round(f1_score(record["answer"], answers), 3) if answers else None,
            rank, round(record["timings"].get("total", 0.0) * 1e3, 1)]


def write_exports(folder: Path, result: dict, records: list[dict]) -> list[str]:
    """The batch as JSON (summary + every record) and CSV (one row per query and mode)."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / "hyperrag-batch.json", folder / "hyperrag-batch.csv"
    json_path.write_text(json.dumps({**result, "records": records}, indent=1, default=str), encoding="utf-8")
    buf = io.StringIO()
    writer = csv.writer(buf)
    stages = list(report.STAGES) + ["total"]
    writer.writerow([*BATCH_COLUMNS[:-1], *[f"{s}_ms" for s in stages], "ranked_ids", "gold_ids", "gold_answers"])
    for rec in records:
        row = batch_row(rec)[:-1]
        writer.writerow([*row, *[round(rec["timings"].get(s, 0.0) * 1e3, 2) for s in stages],
                         " ".join(rec["ranked_ids"]), " ".join(rec.get("gold_ids") or []),
                         " | ".join(rec.get("answers") or [])])
    csv_path.write_text(buf.getvalue(), encoding="utf-8")
    return [str(json_path), str(csv_path)]


def batch_modes(settings: Settings) -> tuple[str, ...]:
    """Modes a batch can run: the engine's, plus the zero-shot reference when an adapter is set
    (without one there is no reader either)."""
    if not settings.adapter:
        return tuple(m for m in MODES if MODE_SPECS[m].read is None)
    return (*MODES, ZERO_SHOT)


def cb_run_batch(n_queries: float, modes: Sequence[str], seed: float, top_k: float, top_n: float,
                 key: str | None):
    """Run gold queries in the chosen modes (interleaved per query); yield updated dashboards.

    Yields (status, banner, 5 figures, per-query table, export files)."""
    wb = get_workbench()
    entry = wb.entry(key)
    modes = [m for m in batch_modes(wb.settings) if m in (modes or [])]
    if not modes:
        raise UserError("choose at least one mode")
    if not entry.corpus.queries:
        raise UserError("this corpus has no gold questions (queries.jsonl): upload one with the documents")
    n = max(1, min(int(n_queries), MAX_BATCH_QUERIES, len(entry.corpus.queries)))
    queries = random.Random(int(seed or 0)).sample(entry.corpus.queries, n)
    records: list[dict] = []
    warnings: list[str] = []
    t0 = time.perf_counter()
    result: dict = {}
    if ZERO_SHOT in modes:  # its document KV first, so that its timings are query time only
        yield (f"Computing the zero-shot reranker's document KV for the candidates of {n} queries…",
               banner([]), *[gr.update()] * (len(DASHBOARDS) + 2))
        with wb.gate.use():
            zs = wb.zero_shot_engine(entry)
            texts = [entry.corpus.by_id[d].text for q in queries for d, _ in zs.retrieve(q.question, int(top_k))]
            precompute(zs.reranker, zs.store, list(dict.fromkeys(texts)))
    for i, query in enumerate(queries, 1):
        for mode in modes:
            res = _ask(wb, entry, query.question, mode, int(top_k), int(top_n))
            warnings += res.warnings
            records.append({**report.record_from_result(res, query), "mode": mode})
        result = batch_results(wb, entry, records)
        status = f"{i}/{n} queries × {len(modes)} modes in {time.perf_counter() - t0:.0f} s"
        if i < n:
            yield (status + " — running…", banner(warnings), *[fn(result) for _, fn in DASHBOARDS],
                   pd.DataFrame([batch_row(r) for r in records], columns=BATCH_COLUMNS), None)
    result["config"] = {"corpus": entry.corpus.name, "queries": n, "modes": modes, "seed": int(seed or 0),
                        "top_k": int(top_k), "top_n": int(top_n), "codec": wb.settings.codec,
                        "store": wb.store_label(), "model": wb.settings.model, "batch_size": wb.settings.batch_size}
    folder = wb.config.exports / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    files = write_exports(folder, result, records)
    prune_folders(wb.config.exports, wb.config.keep_exports, keep={folder})
    headline = [f"{n} queries × {len(modes)} modes in {time.perf_counter() - t0:.0f} s"]
    speed = (result.get("e2e") or {}).get("speedup_vs_baseline")
    if speed:
        headline.append(f"end to end, reuse is {speed:.1f}× the baseline's queries/s")
    agree = (result.get("quality") or {}).get("ranking_agreement")
    if agree is not None:
        headline.append(f"identical rankings reuse vs baseline: {agree:.0%}")
    yield ("**Done:** " + "; ".join(headline), banner(warnings), *[fn(result) for _, fn in DASHBOARDS],
           pd.DataFrame([batch_row(r) for r in records], columns=BATCH_COLUMNS), files)


def api_ask(question: str, mode: str = "reuse", top_k: int = 0, top_n: int = 0, corpus: str = "") -> dict:
    """Answer one question in one mode (retrieval | baseline | prefix | reuse) on a loaded corpus.

    ``corpus``: "" for the app's default corpus, or the id an upload was given. Returns the
    answer, the ranked documents, stage timings (seconds) and warnings."""
    wb = get_workbench()
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    entry = wb.entry(corpus or DEFAULT_KEY)
    result = _ask(wb, entry, question, mode, int(top_k) or wb.settings.top_k, int(top_n) or wb.settings.top_n)
    return {"question": result.question, "mode": result.mode, "answer": result.answer, "top_n": result.top_n,
            "docs": [{"id": d.id, "score": d.score, "rank": d.rank, "retrieval_rank": d.retrieval_rank}
                     for d in result.docs],
            "timings": result.timings, "warnings": result.warnings, "corpus": entry.key}


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------
def _logo_html() -> str:
    svg = (ASSETS / "logo.svg").read_text(encoding="utf-8") if (ASSETS / "logo.svg").exists() else ""
    return (f'<div class="hr-header">{svg}<div><h1>HyperRAG workbench</h1>'
            "<p>RAG whose decoder reranker reuses precomputed per-document KV caches: compare it side by side "
            "with full-prefill reranking and with retrieval-only RAG.</p></div></div>")


def css() -> str:
    path = ASSETS / "style.css"
    return path.read_text(encoding="utf-8") if path.exists() else ""


def build_app(workbench: Workbench | None = None) -> gr.Blocks:
    """The Blocks app (``app.py`` queues and launches it)."""
    wb = workbench or get_workbench()
    set_workbench(wb)
    s = wb.settings
    with gr.Blocks(title="HyperRAG workbench", delete_cache=(3600, 24 * 3600)) as demo:
        corpus_key = gr.State(DEFAULT_KEY)
        gr.HTML(_logo_html())
        status = gr.Markdown(wb.status(), elem_id="hr-status")
        warn = gr.Markdown("", visible=False, elem_id="hr-banner", elem_classes=["hr-banner"])

        with gr.Tabs():
            with gr.Tab("1 · Corpus & KV cache", id="corpus"):
                with gr.Row():
                    with gr.Column(scale=2):
                        source = gr.Radio([(f"Default: {Path(s.corpus).name}", SHIPPED), (UPLOAD, UPLOAD)],
                                          value=SHIPPED, label="Corpus")
                        files = gr.File(file_count="multiple", file_types=[".jsonl", *UPLOAD_DOC_SUFFIXES],
                                        label="Upload docs.jsonl (+ queries.jsonl) or .txt/.md/.pdf/.html/.docx/.zip files")
                        gr.Markdown(
                            f"jsonl lines: `{{\"id\", \"title\", \"text\"}}`; gold questions: `{{\"id\", \"question\", "
                            f"\"answers\": [...], \"doc_ids\": [...]}}`. Limits: {wb.config.upload_max_mb:g} MiB per "
                            f"upload, {wb.config.upload_max_docs:,} documents.", elem_classes=["hr-small"])
                    with gr.Column(scale=3):
                        corpus_info = gr.Markdown("Loading…", elem_id="hr-corpus")
                        prepare = gr.Button("Build index & precompute KV caches", variant="primary")
                        prepare_status = gr.Markdown("")
                with gr.Accordion("Store and reranker settings (shared by every user of this app)", open=False):
                    with gr.Row():
                        codec = gr.Dropdown(list(CODECS), value=s.codec, label="KV codec")
                        store_url = gr.Textbox(redact_url(s.store_url), label="Store URL",
                                               info="fs://DIR (embedded) · memory:// · lm://HOST:PORT · "
                                                    "redis://HOST:PORT")
                        batch = gr.Slider(1, MAX_BATCH_SIZE, value=min(s.batch_size, MAX_BATCH_SIZE), step=1,
                                          label="Reranker batch size")
                    apply = gr.Button("Apply (re-opens the store / rebuilds the reranker)")
                    apply_notes = gr.Markdown("")
                    gr.Markdown(f"Model `{s.model}`{', adapter `' + s.adapter + '`' if s.adapter else ''}, dtype "
                                f"`{s.dtype}`, documents cut to {s.max_doc_tokens} tokens: these need a model reload, "
                                "so they are set when the app starts (flags or `HYPERRAG_*` variables).",
                                elem_classes=["hr-small"])

            with gr.Tab("2 · Ask", id="ask"):
                with gr.Row():
                    question = gr.Textbox(label="Question", placeholder="Type a question, or pick a gold question",
                                          scale=4, lines=1, max_length=4000)
                    gold = gr.Dropdown([], label="Gold questions", scale=3, value=None, allow_custom_value=False)
                    rand = gr.Button("Random gold question", scale=1)
                with gr.Row():
                    top_k = gr.Slider(1, MAX_TOP_K, value=min(s.top_k, MAX_TOP_K), step=1,
                                      label="top-k (retrieved candidates)")
                    top_n = gr.Slider(1, MAX_TOP_N, value=min(s.top_n, MAX_TOP_N), step=1,
                                      label="top-n (documents given to the generator)")
                    ask = gr.Button("Ask in all four modes", variant="primary")
                summary = gr.Markdown("", elem_id="hr-summary")
                mode_outputs: list[gr.components.Component] = []
                with gr.Row(equal_height=False):
                    for mode in COMPARE_MODES:
                        with gr.Column(elem_classes=["hr-mode", f"hr-mode-{mode}"]):
                            gr.Markdown(f"### {MODE_TITLES[mode]}")
                            mode_outputs += [gr.Markdown("", elem_classes=["hr-answer"]),
                                             gr.Markdown("", elem_classes=["hr-timing"]),
                                             gr.Dataframe(headers=DOC_COLUMNS, max_height=360, interactive=False,
                                                          label="Documents (Δ: rank change vs retrieval; used: "
                                                                "given to the generator)",
                                                          column_widths=["7%", "14%", "18%", "33%", "14%", "14%"])]

            with gr.Tab("3 · Batch & dashboards", id="batch"):
                with gr.Row():
                    n_queries = gr.Slider(1, MAX_BATCH_QUERIES, value=10, step=1, label="Gold queries")
                    mode_box = gr.CheckboxGroup([(MODE_TITLES[m], m) for m in batch_modes(s)],
                                                value=list(COMPARE_MODES), label="Modes")
                    seed = gr.Number(s.seed, label="Seed", precision=0)
                with gr.Row():
                    run = gr.Button("Run batch", variant="primary")
                    stop = gr.Button("Stop")
                batch_status = gr.Markdown("Uses the Ask tab's top-k and top-n.")
                plots = []
                with gr.Row():
                    plots += [gr.Plot(label=FIGURE_NAMES[0]), gr.Plot(label=FIGURE_NAMES[1])]
                with gr.Row():
                    plots += [gr.Plot(label=FIGURE_NAMES[2]), gr.Plot(label=FIGURE_NAMES[3])]
                plots.append(gr.Plot(label=FIGURE_NAMES[4]))
                batch_table = gr.Dataframe(headers=BATCH_COLUMNS, label="Per query", wrap=True, max_height=320,
                                           interactive=False)
                exports = gr.File(label="Export (JSON, CSV)", file_count="multiple", interactive=False)

        # -- events -----------------------------------------------------------------------------
        corpus_outputs = [corpus_key, corpus_info, gold, warn]
        source.change(cb_select_corpus, [source, files, corpus_key, codec], corpus_outputs, api_name="select_corpus")
        files.change(cb_files_changed, [files, corpus_key], [source, *corpus_outputs], api_visibility="private")
        prepare.click(cb_prepare, [source, files, corpus_key], [*corpus_outputs, status], api_name="prepare",
                      concurrency_id="prepare", concurrency_limit=1).then(
            lambda: "Done.", None, prepare_status, api_visibility="private")
        apply.click(cb_apply_settings, [codec, store_url, batch, corpus_key],
                    [status, apply_notes, corpus_info, warn, store_url], api_name="apply_settings",
                    concurrency_id="prepare", concurrency_limit=1)
        gold.change(cb_pick_gold, gold, question, api_visibility="private")
        rand.click(cb_random_gold, corpus_key, [question, gold], api_visibility="private")
        ask_event = dict(fn=cb_compare, inputs=[question, top_k, top_n, corpus_key],
                         outputs=[summary, warn, *mode_outputs])
        ask.click(**ask_event, api_name="compare")
        question.submit(**ask_event, api_visibility="private")
        gr.api(api_ask, api_name="ask")
        batch_event = run.click(cb_run_batch, [n_queries, mode_box, seed, top_k, top_n, corpus_key],
                                [batch_status, warn, *plots, batch_table, exports], api_name="run_batch",
                                concurrency_id="batch", concurrency_limit=1)
        stop.click(None, None, None, cancels=[batch_event], api_visibility="private")

        def on_load():
            wb.wait_ready()
            key, info, gold_update, _ = cb_select_corpus(SHIPPED, None, DEFAULT_KEY)
            return wb.status(), info, gold_update

        demo.load(on_load, None, [status, corpus_info, gold], api_visibility="private")
    return demo


def launch_kwargs(workbench: Workbench | None = None) -> dict:
    """Arguments for ``demo.launch`` that the app needs (CSS, upload limit, the export folder)."""
    wb = workbench or get_workbench()
    wb.config.exports.mkdir(parents=True, exist_ok=True)
    return {"css": css(), "max_file_size": f"{int(wb.config.upload_max_mb * 1024)}kb",
            "allowed_paths": [str(wb.config.exports)], "favicon_path": str(ASSETS / "logo.svg"),
            "theme": gr.themes.Soft(primary_hue="indigo", secondary_hue="cyan")}
