"""Corpora and gold queries: load and validate, with errors that name the file and line.

A corpus is a folder holding ``docs.jsonl`` (``{"id","title","text"}`` per line) and optionally
``queries.jsonl`` (``{"id","question","answers":[...],"doc_ids":[...]}``), or a folder of plain
``.txt``/``.md`` files (one document each, no gold queries). A docs.jsonl line may also carry
``"source": {"file","page","start","end"}`` (written by :mod:`hyperrag.data.ingest`) so a passage can be
traced back to where it was cut from; corpora without it load as before.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_DOCS = 100_000
TEXT_SUFFIXES = (".txt", ".md")


class CorpusError(ValueError):
    """A corpus that cannot be used; the message says which file and line, and why."""


@dataclass(frozen=True)
class Doc:
    id: str
    title: str
    text: str
    # Where the passage came from; left out of ==/hash so Docs compare as they did before.
    source: dict | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Query:
    id: str
    question: str
    answers: tuple[str, ...] = ()
    doc_ids: tuple[str, ...] = ()


@dataclass
class Corpus:
    root: Path
    docs: list[Doc]
    queries: list[Query] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.by_id = {d.id: d for d in self.docs}

    @property
    def name(self) -> str:
        return self.root.name

    def __len__(self) -> int:
        return len(self.docs)

    def sample_queries(self, n: int, seed: int) -> list[Query]:
        """A fixed random sample of the gold queries that name their gold documents: the same
        questions for every system, mode and run with the same seed (bench, evaluate, app)."""
        queries = [q for q in self.queries if q.doc_ids]
        return random.Random(seed).sample(queries, min(n, len(queries)))


def load_corpus(path: str | Path, max_file_bytes: int = MAX_FILE_BYTES) -> Corpus:
    """Load a corpus folder in either format; raise :class:`CorpusError` on anything wrong."""
    root = Path(path)
    if not root.exists():
        raise CorpusError(f"{root}: no such corpus folder")
    if not root.is_dir():
        raise CorpusError(f"{root}: a corpus is a folder (docs.jsonl or .txt/.md files), not a file")
    docs_file = root / "docs.jsonl"
    if docs_file.exists():
        docs = _load_docs_jsonl(docs_file, max_file_bytes)
        queries_file = root / "queries.jsonl"
        queries = _load_queries_jsonl(queries_file, {d.id for d in docs}, max_file_bytes) if queries_file.exists() else []
        return Corpus(root, docs, queries)
    text_files = sorted(p for p in root.iterdir() if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
    if not text_files:
        raise CorpusError(f"{root}: no docs.jsonl and no .txt/.md files: nothing to load")
    return Corpus(root, [_load_text_file(p, max_file_bytes) for p in text_files])


def _read_text(path: Path, max_file_bytes: int) -> str:
    size = path.stat().st_size
    if size > max_file_bytes:
        raise CorpusError(f"{path}: {size / 2**20:.1f} MiB is over the {max_file_bytes / 2**20:.0f} MiB limit")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CorpusError(f"{path}:{line}: not UTF-8 text (byte {err.start})") from None


def _jsonl_records(path: Path, max_file_bytes: int):
    text = _read_text(path, max_file_bytes)
    seen_any = False
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{lineno}: bad JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise CorpusError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        seen_any = True
        yield lineno, record
    if not seen_any:
        raise CorpusError(f"{path}: empty file: no records")


def _field(path: Path, lineno: int, record: dict, name: str, kind: type, required: bool = True):
    if name not in record:
        if required:
            raise CorpusError(f"{path}:{lineno}: missing field {name!r}")
        return kind()
    value = record[name]
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool) and name == "id":
        value = str(value)
    if not isinstance(value, kind):
        raise CorpusError(f"{path}:{lineno}: field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _load_docs_jsonl(path: Path, max_file_bytes: int) -> list[Doc]:
    docs: list[Doc] = []
    first_line: dict[str, int] = {}
    for lineno, rec in _jsonl_records(path, max_file_bytes):
        doc_id = _field(path, lineno, rec, "id", str).strip()
        text = _field(path, lineno, rec, "text", str)
        title = _field(path, lineno, rec, "title", str, required=False)
        if not doc_id:
            raise CorpusError(f"{path}:{lineno}: empty 'id'")
        if not text.strip():
            raise CorpusError(f"{path}:{lineno}: document {doc_id!r} has empty 'text'")
        if doc_id in first_line:
            raise CorpusError(f"{path}:{lineno}: duplicate id {doc_id!r} (first on line {first_line[doc_id]})")
        first_line[doc_id] = lineno
        docs.append(Doc(doc_id, title, text.strip(), doc_source(path, lineno, rec)))
        if len(docs) > MAX_DOCS:
            raise CorpusError(f"{path}:{lineno}: more than {MAX_DOCS} documents")
    return docs


SOURCE_FIELDS = {"file": (str,), "page": (int,), "start": (int,), "end": (int,), "line": (int,)}


def doc_source(path: Path, lineno: int, record: dict) -> dict | None:
    """The optional ``source`` object, checked lightly: known keys must have the right type or be null."""
    source = record.get("source")
    if source is None:
        return None
    if not isinstance(source, dict):
        raise CorpusError(f"{path}:{lineno}: field 'source' must be an object, got {type(source).__name__}")
    for key, kinds in SOURCE_FIELDS.items():
        value = source.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise CorpusError(f"{path}:{lineno}: source.{key} must be {kinds[0].__name__} or null, "
                              f"got {type(value).__name__}")
    return source


def _load_queries_jsonl(path: Path, doc_ids: set[str], max_file_bytes: int) -> list[Query]:
    queries: list[Query] = []
    first_line: dict[str, int] = {}
    for lineno, rec in _jsonl_records(path, max_file_bytes):
        qid = _field(path, lineno, rec, "id", str).strip()
        question = _field(path, lineno, rec, "question", str).strip()
        answers = _field(path, lineno, rec, "answers", list, required=False)
        gold = _field(path, lineno, rec, "doc_ids", list, required=False)
        if not qid or not question:
            raise CorpusError(f"{path}:{lineno}: empty 'id' or 'question'")
        if qid in first_line:
            raise CorpusError(f"{path}:{lineno}: duplicate id {qid!r} (first on line {first_line[qid]})")
        unknown = [d for d in gold if str(d) not in doc_ids]
        if unknown:
            raise CorpusError(f"{path}:{lineno}: doc_ids {unknown} are not in docs.jsonl")
        first_line[qid] = lineno
        queries.append(Query(qid, question, tuple(map(str, answers)), tuple(map(str, gold))))
    return queries


def _load_text_file(path: Path, max_file_bytes: int) -> Doc:
    text = _read_text(path, max_file_bytes).strip()
    if not text:
        raise CorpusError(f"{path}: empty file")
    return Doc(path.stem, path.stem.replace("_", " "), text)
