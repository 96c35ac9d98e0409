"""Uploaded files for the workbench: checked, copied under the app's data folder, ingested.

Uploads are size-limited and copied into ``<data dir>/uploads/<id>/`` under sanitized names, so
nothing is written outside the data folder; documents go through :mod:`hyperrag.data.ingest` (passages
with their source file and page), jsonl corpora through :func:`hyperrag.data.corpus.load_corpus`.
No gradio here: errors are :class:`UploadError`, whose message the UI shows as is.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Sequence

from hyperrag.data.corpus import TEXT_SUFFIXES
from hyperrag.workbench.config import AppConfig


class UploadError(ValueError):
    """An upload that cannot be used; the message is shown to the user as is."""


def safe_name(name: str) -> str:
    """A file name that cannot escape its folder: basename only, [A-Za-z0-9._-], no leading dot."""
    base = re.split(r"[\\/]", name)[-1]
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip("._-")[:100]
    return clean or "file"


UPLOAD_DOC_SUFFIXES = (*TEXT_SUFFIXES, ".pdf", ".html", ".htm", ".docx", ".zip")  # read by hyperrag.data.ingest
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
    from hyperrag.data.ingest import ingest

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings name no file; the errors returned do
    files = sorted(p for p in folder.iterdir() if p.is_file())
    report = ingest(files, folder, tokenizer, max_tokens, max_file_bytes=config.upload_max_bytes,
                    progress=(lambda done, total, _file: progress(done, total)) if progress else None)
    errors = [relative_message(e, folder) for e in report.errors]
    if not report.passages:
        raise UploadError("no text could be read from the upload: " + "; ".join(errors or ["no passages"]))
    return errors


def relative_message(message: str, folder: Path) -> str:
    """``message`` with the upload folder's path cut out (the user never sees the server's folders)."""
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
