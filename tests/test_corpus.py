"""Corpus loading: both formats, and a clear error naming file and line for each bad input."""
from __future__ import annotations

import json

import pytest

from hyperrag.data.corpus import CorpusError, load_corpus
from tests.conftest import SHIPPED, write_jsonl

DOC = {"id": "d1", "title": "T", "text": "Some text."}


def test_shipped_corpus_loads_with_gold():
    corpus = load_corpus(SHIPPED)
    assert len(corpus.docs) == 309 and len(corpus.queries) == 1607
    assert all(q.doc_ids and q.answers for q in corpus.queries)
    assert (SHIPPED / "README.md").exists(), "the SQuAD subset needs its CC BY-SA attribution"


def test_text_folder_loads(tmp_path):
    (tmp_path / "alpha_note.txt").write_text("Alpha document.\n")
    (tmp_path / "beta.md").write_text("# Beta\nMarkdown body.")
    (tmp_path / "ignored.csv").write_text("a,b")
    corpus = load_corpus(tmp_path)
    assert [d.id for d in corpus.docs] == ["alpha_note", "beta"]
    assert corpus.docs[0].title == "alpha note" and corpus.queries == []


def _docs(tmp_path, lines: list[str]):
    (tmp_path / "docs.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return tmp_path


QUERY = {"id": "q1", "question": "Q?", "answers": ["a"], "doc_ids": ["d1"]}


def _with_queries(folder, records: list[dict]):
    write_jsonl(folder / "queries.jsonl", records)
    return folder


CASES = [
    ("missing folder", lambda p: p / "nope", "no such corpus folder"),
    ("a file, not a folder", lambda p: (write_jsonl(p / "x.jsonl", [DOC]), p / "x.jsonl")[1], "is a folder"),
    ("empty folder", lambda p: p, "nothing to load"),
    ("empty docs.jsonl", lambda p: _docs(p, []), "docs.jsonl: empty file"),
    ("bad JSON on line 2", lambda p: _docs(p, [json.dumps(DOC), '{"id": "d2", "text": ']), "docs.jsonl:2: bad JSON"),
    ("not an object", lambda p: _docs(p, ["[1, 2]"]), "docs.jsonl:1: expected a JSON object"),
    ("missing text", lambda p: _docs(p, ['{"id": "d1"}']), "docs.jsonl:1: missing field 'text'"),
    ("empty text", lambda p: _docs(p, ['{"id": "d1", "text": "  "}']), "docs.jsonl:1: document 'd1' has empty 'text'"),
    ("text not a string", lambda p: _docs(p, ['{"id": "d1", "text": 5}']), "field 'text' must be str"),
    ("duplicate id", lambda p: _docs(p, [json.dumps(DOC), json.dumps(DOC)]), "docs.jsonl:2: duplicate id 'd1' (first on line 1)"),
    ("empty text file", lambda p: ((p / "a.txt").write_text("  \n"), p)[1], "a.txt: empty file"),
    ("text file not UTF-8", lambda p: ((p / "a.txt").write_bytes(b"fine\ncaf\xe9\n"), p)[1], "a.txt:2: not UTF-8"),
    ("empty id", lambda p: _docs(p, ['{"id": " ", "text": "x"}']), "docs.jsonl:1: empty 'id'"),
    ("duplicate query id", lambda p: _with_queries(_docs(p, [json.dumps(DOC)]), [QUERY, QUERY]),
     "queries.jsonl:2: duplicate id 'q1' (first on line 1)"),
    ("query without question", lambda p: _with_queries(_docs(p, [json.dumps(DOC)]), [{"id": "q1", "question": ""}]),
     "queries.jsonl:1: empty 'id' or 'question'"),
]


@pytest.mark.parametrize("name,make,message", CASES, ids=[c[0] for c in CASES])
def test_bad_corpus_errors(tmp_path, name, make, message):
    with pytest.raises(CorpusError, match=".*".join(map(__import__("re").escape, message.split("*")))):
        load_corpus(make(tmp_path))


def test_not_utf8_names_line(tmp_path):
    (tmp_path / "docs.jsonl").write_bytes(json.dumps(DOC).encode() + b"\n" + b'{"id": "d2", "text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"docs.jsonl:2: not UTF-8"):
        load_corpus(tmp_path)


def test_size_limit(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", [DOC] * 50)
    with pytest.raises(CorpusError, match="over the 0 MiB limit"):
        load_corpus(tmp_path, max_file_bytes=100)


def test_text_file_size_limit_names_the_file(tmp_path):
    (tmp_path / "big.md").write_text("word " * 100)
    with pytest.raises(CorpusError, match=r"big.md: .* over the 0 MiB limit"):
        load_corpus(tmp_path, max_file_bytes=100)


def test_queries_validated(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", [DOC])
    write_jsonl(tmp_path / "queries.jsonl", [{"id": "q1", "question": "Q?", "answers": ["a"], "doc_ids": ["d9"]}])
    with pytest.raises(CorpusError, match=r"queries.jsonl:1: doc_ids \['d9'\] are not in docs.jsonl"):
        load_corpus(tmp_path)
    write_jsonl(tmp_path / "queries.jsonl", [{"id": "q1", "answers": []}])
    with pytest.raises(CorpusError, match=r"queries.jsonl:1: missing field 'question'"):
        load_corpus(tmp_path)
