"""The workbench's process-wide state, without any UI: one runtime, a registry of corpora, settings.

- :class:`Workbench`: the models, reranker, reader, generator and KV store are loaded once per
  process (a :class:`~hyperrag.rag.runtime.Runtime`) and shared by every session; each corpus (the
  shipped one, uploads) gets its own index and a light :class:`~hyperrag.rag.pipeline.Engine` view
  over the shared runtime, so one user's upload never changes another user's answers. Store and
  reranker settings (codec, store URL, batch size) are process-wide and change only through
  :meth:`Workbench.reconfigure`, which waits for running requests; the model and its adapter
  through :meth:`Workbench.switch_model`, which loads the new runtime while the live one still
  answers and only then puts it in its place.
- errors meant for the user are :class:`UserError` (and :class:`~hyperrag.workbench.uploads.UploadError`);
  the UI turns them into messages. Nothing here imports gradio.
"""
from __future__ import annotations

import gc
import logging
import re
import shutil
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from hyperrag.common.memory import return_freed_memory
from hyperrag.common.settings import SHIPPED, Settings, shipped_adapter
from hyperrag.data.corpus import Corpus, CorpusError, Query, load_corpus
from hyperrag.kv import planner
from hyperrag.kv.codec import CODECS, get_codec
from hyperrag.kv.urls import StoreError, parse_store_url, redact_url
from hyperrag.model.geometry import KVGeometry
from hyperrag.model.loading import MODELS, ModelError
from hyperrag.rag.modes import ENGINE_MODES, MODES
from hyperrag.rag.pipeline import Engine, QuestionError, RAGResult
from hyperrag.rag.precompute import PrecomputeReport, precompute
from hyperrag.rag.runtime import Runtime
from hyperrag.workbench.batcher import Batcher, Busy
from hyperrag.workbench.config import AppConfig
from hyperrag.workbench.uploads import UploadError, copy_upload, ingest_upload, prune_folders, relative_message

log = logging.getLogger("hyperrag.workbench.operations")
DEFAULT_KEY = "default"
MAX_BATCH_SIZE = 32  # the reranker's buffers grow linearly with it (~55 MB per row for SmolLM2)
MAX_TOP_K, MAX_TOP_N = 50, 10  # per request: bounds the work (and memory) one request can ask for
MAX_BATCH_QUERIES = 200
ZERO_SHOT = "zero_shot"  # batch-only mode: what the trained adapter is measured against
# What Workbench.switch_model reports through its progress(done, total), in order.
SWITCH_STAGES = ("loading the model", "waiting for running requests", "switching over")


def runnable_modes(reader: bool, zero_shot: bool) -> tuple[str, ...]:
    """The modes that can run: every engine mode, the reader's only with a reader (an adapter),
    then the zero-shot reference when there is one (the app's batch tab and the bench)."""
    engine = tuple(m for m in ENGINE_MODES if MODES[m].read is None or reader)
    return (*engine, ZERO_SHOT) if zero_shot else engine


def route(mode: str, engine: Callable[[], Engine], zero_shot: Callable[[], Engine]) -> tuple[Engine, str]:
    """The engine a mode runs on and the engine mode it runs there: ``zero_shot`` is the
    reference engine (the base model without the adapter) in reuse mode; any other mode is the
    engine's own. The engines are made only when chosen."""
    return (zero_shot(), "reuse") if mode == ZERO_SHOT else (engine(), mode)


class UserError(ValueError):
    """A message for the user (bad input, busy, ...): the UI shows it, with no traceback."""


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
        self.batcher = Batcher.from_settings(settings)  # questions asked at once share model calls
        self._lock = threading.Lock()  # loading, corpus registry
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._base: Engine | None = None
        self._zero_shot: Runtime | None = None
        self._corpora: OrderedDict[str, CorpusEntry] = OrderedDict()
        self._loader: threading.Thread | None = None
        # Held by a settings change or a model switch: one at a time, and never one over the other
        # (a switch loads from the settings it started with).
        self._changing = threading.Lock()

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
        self.batcher.close()
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
        (.txt/.md/.pdf/.html/.docx/.zip) go through :func:`hyperrag.data.ingest.ingest` into passages
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
            raise UploadError(relative_message(str(err), folder)) from None
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
        """What the document KV of this corpus will take in the store, per codec (the planner);
        ``codecs`` are names, as the UI gives them (default: every codec)."""
        geometry = KVGeometry.of(self.wait_ready().reranker)
        tokens = self.doc_tokens(entry)
        plans = planner.codec_table(len(tokens), tokens, geometry, [get_codec(name) for name in codecs or ()])
        rows = [{"codec": p.codec, "bytes": p.total_bytes, "bytes_per_token": p.bytes_per_token,
                 "tokens": p.tokens, "docs": p.docs} for p in plans]
        return {"docs": len(tokens), "tokens": sum(tokens), "codecs": rows, "precompute_s": plans[0].precompute_s,
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
        if not self._changing.acquire(blocking=False):
            raise UserError("settings not changed: a model is being loaded; try again when it is live")
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
        finally:
            self._changing.release()
        return notes or ["nothing changed"]

    def switch_model(self, model: str, adapter: str = "", progress: Callable[[int, int], None] | None = None,
                     timeout_s: float = 60.0) -> list[str]:
        """Make ``model`` (with ``adapter``) the live model of the whole app; returns notes.

        ``model``: a packaged id (:data:`~hyperrag.model.loading.MODELS`), a Hugging Face folder
        or a ``.gguf`` file on this machine (:func:`check_model`). ``adapter``: a LoRA adapter
        folder; '' gives a packaged model its shipped adapter and any other model none (it runs
        zero-shot: reranker and generator, no reader). The new runtime is loaded while the live
        one keeps answering (``progress(done, total)`` over :data:`SWITCH_STAGES`), and replaces
        it only once complete, after the running requests; a model that cannot be loaded (the
        loader's :class:`~hyperrag.model.loading.ModelError`: unknown id, no weights or
        tokenizer, unsupported architecture, an adapter made for another model) is a
        :class:`UserError` and leaves the live model as it was. Corpora keep their indexes (the
        embedder stays); their document KV is the new model's to precompute. The store keys every
        entry by the model's weights hash, so no entry of the old model is served to the new
        one, and none is deleted: switching back finds them. A start-up load that failed (a bad
        ``--model``) is recovered from by switching to a good one."""
        model, adapter = (model or "").strip(), (adapter or "").strip()
        check_model(model)
        adapter = str(Path(adapter).expanduser()) if adapter else shipped_adapter(model)
        if adapter and not Path(adapter).is_dir():
            raise UserError(f"adapter folder {adapter!r} does not exist: give a LoRA adapter folder trained for "
                            "this model, or leave the field empty")
        report = progress or (lambda done, total: None)
        if not self._changing.acquire(blocking=False):
            raise UserError("another model is being loaded, or the store settings are being changed: try again "
                            "when it is done")
        try:
            live = self._live()
            if live is not None and (model, adapter) == (self.settings.model, self.settings.adapter):
                return [f"{model} is already the live model"]
            new = self.settings.replace(model=model, adapter=adapter)
            report(0, len(SWITCH_STAGES))
            engine = self._load_engine(new, live)
            del live  # the old engine is freed once it is replaced (_put_live), not held here
            report(1, len(SWITCH_STAGES))
            try:
                with self.gate.exclusive(timeout_s):
                    report(2, len(SWITCH_STAGES))
                    notes = self._put_live(engine)
            except TimeoutError as err:
                engine.close()
                raise UserError(f"model not changed: {err}; try again when it ends") from None
            report(3, len(SWITCH_STAGES))
        finally:
            self._changing.release()
        llm, dtype = engine.reranker.llm, str(engine.reranker.decoder.dtype).replace("torch.", "")
        what = f"adapter {Path(adapter).name}" if adapter else "no adapter: zero-shot reranker and generator, no reader"
        return [f"{model} is live ({llm.fingerprint}, {dtype} on {llm.device}; {what})", *notes]

    def _live(self) -> Engine | None:
        """The live engine once the start-up load is over; None if that load failed, or if nothing
        was loaded yet (``--no-preload``: the start-up model is not loaded just to be replaced)."""
        if self._base is None and self._loader is None:
            return None
        try:
            return self.wait_ready()
        except UserError:
            if self._load_error is None:  # still loading
                raise
            return None

    def _load_engine(self, new: Settings, live: Engine | None) -> Engine:
        """An engine for ``new`` over the default corpus, loaded beside the live one (whose embedder
        and index it shares); the loader's errors as :class:`UserError`."""
        try:
            if live is None:
                return Engine.load(new)
            default = self._corpora[DEFAULT_KEY]
            runtime = Runtime.load(new, corpus_texts=[d.text for d in default.corpus.docs],
                                   embedder=live.runtime.embedder)
            return Engine(runtime, default.corpus, default.index)
        except (ModelError, FileNotFoundError, CorpusError) as err:  # what the loader says is wrong, as it says it
            raise UserError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - anything else a foreign model may raise: the app stays up
            log.exception("loading model %s failed", new.model)
            raise UserError(f"model {new.model!r} could not be loaded: {type(err).__name__}: {err}") from None

    def _put_live(self, engine: Engine) -> list[str]:
        """Make ``engine`` the live one (no request running); the previous one and the zero-shot
        reference are closed (their stores flushed, nothing deleted) and freed, then the new
        store's CPU tier is sized without them."""
        with self._lock:
            previous, zero_shot, self._zero_shot = self._base, self._zero_shot, None
            self._base, self.settings = engine, engine.settings
            if previous is None:
                self._corpora[DEFAULT_KEY] = CorpusEntry(DEFAULT_KEY, default_label(engine.corpus), engine.corpus,
                                                         engine.index)
            for entry in self._corpora.values():  # counted in the old tokenizer, stored under the old model
                entry.doc_tokens, entry.report = None, None
            self._load_error = None
            self._ready.set()
        for old in (zero_shot, previous):
            if old is not None:
                old.close()
        del zero_shot, previous, old  # the last references: the models' memory goes back
        gc.collect()
        return_freed_memory()
        resized = engine.runtime.resize_tier([d.text for d in engine.corpus.docs])
        return [resized] if resized else []

    def status(self) -> dict:
        """Where the engine stands, as data (the UI words it): ``state`` is loading, failed or
        ready; when ready, the model, device, store, codec, batch size and store problems."""
        if self._load_error is not None:
            return {"state": "failed", "error": str(self._load_error)}
        if not self.ready:
            return {"state": "loading"}
        s, store, reranker = self.settings, self._base.store, self._base.reranker
        problem = ("fallback" if store.url != s.store_url else "unreachable" if not store.available else None)
        return {"state": "ready", "model": s.model, "adapter": Path(s.adapter).name if s.adapter else "",
                "weights": reranker.llm.fingerprint.split("+")[0], "reader": self._base.reader is not None,
                "device": str(reranker.decoder.device), "dtype": str(reranker.decoder.dtype).replace("torch.", ""),
                "store": redact_url(store.url),
                "codec": store.codec.name, "batch_size": s.batch_size, "store_problem": problem,
                "configured_store": redact_url(s.store_url)}

    # -- operations ---------------------------------------------------------------------------
    def modes(self) -> tuple[str, ...]:
        """The modes a request can run here: the reader and the zero-shot reference need an adapter."""
        return runnable_modes(reader=bool(self.settings.adapter), zero_shot=bool(self.settings.adapter))

    def ask(self, entry: CorpusEntry, question: str, mode: str, top_k: int, top_n: int) -> RAGResult:
        """One question in one mode (``zero_shot`` included) on this corpus, through the batcher:
        users asking at once share model calls."""
        if not 1 <= top_k <= MAX_TOP_K or not 1 <= top_n <= MAX_TOP_N:
            raise UserError(f"top-k must be between 1 and {MAX_TOP_K} and top-n between 1 and {MAX_TOP_N}")
        if mode in MODES and mode not in self.modes():
            raise UserError(f"mode {mode!r} needs an adapter (the reader), and the live model {self.settings.model} "
                            f"runs without one: choose one of {', '.join(self.modes())}")
        with self.gate.use():
            engine, engine_mode = route(mode, lambda: self.engine(entry), lambda: self.zero_shot_engine(entry))
            try:
                return self.batcher.ask(engine, question, engine_mode, int(top_k), int(top_n))
            except (QuestionError, Busy) as err:
                raise UserError(str(err)) from None

    def prepare(self, entry: CorpusEntry, index_progress: Callable[[int, int], None] | None = None,
                kv_progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Embed and index the corpus, then precompute its document KV; returns the warnings."""
        with self.gate.use():
            engine = self.engine(entry, index_progress)
            report = engine.precompute(kv_progress)
            warnings = report.warnings + engine.store.take_warnings()
        entry.report = report
        return warnings

    def run_batch(self, entry: CorpusEntry, n_queries: int, modes: Sequence[str], seed: int, top_k: int,
                  top_n: int) -> Iterator[BatchStep]:
        """Gold queries of this corpus in the chosen modes, interleaved per query. Yields a
        :class:`BatchStep` before the zero-shot reference's document KV is computed (so that its
        timings are query time only) and after each query."""
        modes = [m for m in self.modes() if m in (modes or [])]
        if not modes:
            raise UserError("choose at least one mode")
        if not entry.corpus.queries:
            raise UserError("this corpus has no gold questions (queries.jsonl): upload one with the documents")
        n = max(1, min(int(n_queries), MAX_BATCH_QUERIES, len(entry.corpus.queries)))
        queries = entry.corpus.sample_queries(n, int(seed or 0))
        step = BatchStep(n, modes)
        if ZERO_SHOT in modes:
            yield step
            with self.gate.use():
                zs = self.zero_shot_engine(entry)
                texts = [entry.corpus.by_id[d].text for q in queries for d, _ in zs.retrieve(q.question, int(top_k))]
                precompute(zs.reranker, zs.store, list(dict.fromkeys(texts)))
        for query in queries:
            step.answers = [(query, mode, self.ask(entry, query.question, mode, top_k, top_n)) for mode in modes]
            step.done += 1
            yield step


@dataclass
class BatchStep:
    """Where a gold batch stands: ``done`` of ``queries`` asked in ``modes``; ``answers`` are
    the last query's (query, mode, result), one per mode."""

    queries: int
    modes: list[str]
    done: int = 0
    answers: list[tuple[Query, str, RAGResult]] = field(default_factory=list)


def check_model(model: str) -> None:
    """What the app's model picker loads: a packaged id, a folder or a ``.gguf`` file on this
    machine. A Hugging Face Hub id (``org/name``) is refused here, before any download: a web user
    must not make the app fetch gigabytes; the command line takes one (``--model org/name``). The
    loader names everything else that is wrong with a model."""
    if not model:
        raise UserError(f"no model given: choose a packaged model ({', '.join(MODELS)}), or give a Hugging Face "
                        "folder or a .gguf file on this machine")
    if model in MODELS or Path(model).expanduser().exists() or model.endswith(".gguf"):
        return
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith("."):
        raise UserError(f"model {model!r} is not a packaged id ({', '.join(MODELS)}) nor a folder or .gguf file on "
                        "this machine; the app does not download Hub models: fetch it with `hf download "
                        f"{model} --local-dir DIR` and give DIR, or start the app with --model {model}")


def default_label(corpus: Corpus) -> str:
    shipped = corpus.root.resolve().is_relative_to(SHIPPED)
    return f"{corpus.name} ({'shipped' if shipped else 'default'})"
