"""Real files in, a passage corpus out: ``python -m hyperrag.ingest PATH... --out DIR``.

Inputs are files, folders or .zip archives of .txt, .md, .pdf, .html/.htm, .docx, and .jsonl
(an existing ``docs.jsonl``, passed through). :mod:`.sources` finds them safely, :mod:`.parsers`
extracts text, :mod:`.split` cuts it into passages that the reranker reads whole. Each line of
``DIR/docs.jsonl`` is ``{"id","title","text","source":{"file","page","start","end"}}``: ``file``
relative to its input root (a zip member as ``<zip>/<member>``), ``page`` 1-based for PDFs (null
otherwise), and ``extracted[start:end] == text`` in the page's (or file's) extracted text: for
.txt/.md the decoded file (UTF-8 with any BOM dropped, or the
encoding charset-normalizer finds, named in the report's notes); for HTML/DOCX/PDF the extracted text with runs of
blanks folded. Passed-through .jsonl records keep their id and source (or get ``line`` and the
record's own text as the span). Ids are ``<file-path-slug>-<n>`` (``-p<page>-<n>`` for PDFs).

Bad inputs never stop the run: each gives one error naming the file (and page or line), the
other files are still read, and ``DIR/docs.jsonl`` is replaced atomically, only when at least one
passage was made. Nothing else is written anywhere.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from hyperrag.data.corpus import MAX_DOCS, MAX_FILE_BYTES, CorpusError, doc_source
from hyperrag.data.ingest.parsers import decode, extract
from hyperrag.data.ingest.sources import MAX_ZIP_BYTES, SUFFIXES, IngestError, Item, collect
from hyperrag.data.ingest.split import Splitter

__all__ = ["ingest", "IngestReport", "IngestError", "Splitter", "load_tokenizer", "SUFFIXES"]

Progress = Callable[[int, int, str], None]  # (files done, files in all, current file)


@dataclass
class IngestReport:
    """What a run did: the passages written (docs.jsonl records), per-file errors, notes."""

    out: Path | None  # the docs.jsonl written; None when no passage was made (nothing written)
    passages: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: int = 0  # inputs that gave at least one passage


def _slug(label: str) -> str:
    stem = label[: -len(PurePosixPath(label).suffix) or None]
    return re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-").lower() or "doc"


def _unique(base: str, used: set[str]) -> str:
    doc_id, n = base, 1
    while doc_id in used:
        n += 1
        doc_id = f"{base}~{n}"
    used.add(doc_id)
    return doc_id


def _jsonl(label: str, data: bytes, splitter: Splitter, used: set[str], report: IngestReport) -> list[dict]:
    """An existing docs.jsonl, kept as it is (ids too, so gold queries still match); bad lines are errors."""
    out = []
    for lineno, line in enumerate(decode(label, data, report.notes).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            report.errors.append(f"{label}:{lineno}: bad JSON ({err.msg} at column {err.colno})")
            continue
        doc_id = rec.get("id") if isinstance(rec, dict) else None
        doc_id = str(doc_id).strip() if isinstance(doc_id, (str, int)) and not isinstance(doc_id, bool) else ""
        text, title = (rec.get("text"), rec.get("title", "")) if isinstance(rec, dict) else (None, None)
        if not doc_id or not isinstance(text, str) or not text.strip() or not isinstance(title, str):
            report.errors.append(f"{label}:{lineno}: expected an object with a non-empty 'id' and 'text' (and a string 'title')")
            continue
        if doc_id in used:
            report.errors.append(f"{label}:{lineno}: duplicate id {doc_id!r}: line skipped")
            continue
        used.add(doc_id)
        text = text.strip()
        try:  # a source from an earlier ingest is kept when the engine would accept it
            source = doc_source(Path(label), lineno, rec)
        except CorpusError:
            source = None
        source = source or {"file": label, "page": None, "start": 0, "end": len(text), "line": lineno}
        if (n := splitter.count(text)) > splitter.max_tokens:
            report.notes.append(f"{label}:{lineno}: {doc_id!r} has {n} tokens: the engine reads its first {splitter.max_tokens}")
        out.append({"id": doc_id, "title": title, "text": text, "source": source})
    return out


def ingest(paths: Sequence[str | Path], out_dir: str | Path, tokenizer, max_tokens: int | None = None,
           overlap: int | None = None, progress: Progress | None = None, max_file_bytes: int = MAX_FILE_BYTES,
           max_zip_bytes: int = MAX_ZIP_BYTES) -> IngestReport:
    """Read ``paths`` into passages and write ``out_dir/docs.jsonl``; never raises for a bad input.

    ``tokenizer`` is the reranker's (a transformers tokenizer or a ``tokenizers.Tokenizer``);
    ``max_tokens`` defaults to ``Settings().max_doc_tokens``, ``overlap`` to a tenth of it.
    ``progress(done, total, file)`` is called after each file.
    """
    from hyperrag.common.settings import Settings

    max_tokens = max_tokens or Settings().max_doc_tokens
    out_dir = Path(out_dir)
    splitter = Splitter(tokenizer, max_tokens, max_tokens // 10 if overlap is None else overlap)
    report = IngestReport(out=None)
    used: set[str] = set()
    with ExitStack() as stack:
        items = collect(paths, out_dir, max_file_bytes, max_zip_bytes, stack, report.errors, report.notes)
        for done, item in enumerate(items, 1):
            try:
                passages = _passages(item, splitter, used, report)
                report.passages += passages
                report.files += bool(passages)
            except IngestError as err:
                report.errors.append(str(err))
            except Exception as err:  # a parser's own failure on odd input still only costs that file
                report.errors.append(f"{item.label}: not read ({type(err).__name__}: {err})")
            if progress:
                progress(done, len(items), item.label)
            if len(report.passages) > MAX_DOCS:
                report.errors.append(f"more than {MAX_DOCS} passages, the most a corpus may hold: stopped after {item.label}")
                report.passages = report.passages[:MAX_DOCS]
                break
    if report.passages:
        report.out = _write_atomic(out_dir, report.passages)
    return report


def _passages(item: Item, splitter: Splitter, used: set[str], report: IngestReport) -> list[dict]:
    data = item.read()
    if not data.strip():
        raise IngestError(f"{item.label}: empty file")
    if item.label.lower().endswith(".jsonl"):
        return _jsonl(item.label, data, splitter, used, report)
    title, pages = extract(item.label, data, report.errors, report.notes)
    title = title or PurePosixPath(item.label).stem.replace("_", " ")
    slug, out = _slug(item.label), []
    for page, text in pages:
        for n, (start, end, chunk) in enumerate(splitter.split(text, markdown=item.label.lower().endswith(".md")), 1):
            doc_id = _unique(f"{slug}-p{page}-{n}" if page else f"{slug}-{n}", used)
            out.append({"id": doc_id, "title": title, "text": chunk,
                        "source": {"file": item.label, "page": page, "start": start, "end": end}})
    if not out:
        kind = " (a scanned PDF needs OCR, which is not done here)" if pages and pages[0][0] else ""
        raise IngestError(f"{item.label}: no text found{kind}")
    return out


def _write_atomic(out_dir: Path, passages: list[dict]) -> Path:
    """Write next to the target and rename over it, so a reader never sees half a file."""
    if out_dir.is_symlink():
        raise IngestError(f"{out_dir}: the output folder is a symbolic link: refused")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "docs.jsonl"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".docs.jsonl.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in passages)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_tokenizer(model: str, cache_dir: str | Path):
    """The reranker's tokenizer, loaded offline from the model's safetensors copy."""
    from transformers import AutoTokenizer

    from hyperrag.model.loading import model_folder

    return AutoTokenizer.from_pretrained(model_folder(model, cache_dir))


