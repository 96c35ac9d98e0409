"""Ingestion: every format in, passages that fit the reranker out, and each bad input named."""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hyperrag.data.corpus import CorpusError, load_corpus
from hyperrag.data.ingest import ingest, load_tokenizer
from hyperrag.common.settings import Settings
from tests.conftest import REPO, SHIPPED

MAX = Settings().max_doc_tokens
PAGE2 = "The lighthouse keeper counted exactly seventeen herons on the second page."


@pytest.fixture(scope="session")
def tok(cache_dir):
    return load_tokenizer("smollm2-135m", cache_dir)


def engine_tokens(tok, text: str) -> int:
    """As the engine counts a document: its template is "\\n{text}", no special tokens."""
    return len(tok.encode("\n" + text, add_special_tokens=False))


def write_pdf(path: Path, pages: list[str], password: str | None = None) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_title("Test PDF")
    for text in pages:
        pdf.add_page()
        pdf.set_font("helvetica", size=11)
        pdf.multi_cell(0, 6, text)
    if password:
        pdf.set_encryption(owner_password="owner", user_password=password)
    pdf.output(str(path))
    return path


def write_docx(path: Path) -> Path:
    import docx

    document = docx.Document()
    document.core_properties.title = "Word Title"
    document.add_heading("Quarterly notes", level=1)
    document.add_paragraph("The docx paragraph mentions a purple giraffe.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "Metric", "Value"
    table.cell(1, 0).text, table.cell(1, 1).text = "Tables", "kept"
    document.save(str(path))
    return path


def shipped_text(chars: int) -> str:
    """Real prose (the shipped SQuAD paragraphs) up to ``chars`` characters."""
    texts, total = [], 0
    for line in (SHIPPED / "docs.jsonl").read_text(encoding="utf-8").splitlines():
        texts.append(json.loads(line)["text"])
        total += len(texts[-1]) + 2
        if total >= chars:
            break
    return "\n\n".join(texts)[:chars]


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def by_file(report) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in report.passages:
        out.setdefault(p["source"]["file"], []).append(p)
    return out


def test_every_format_folder_and_zip(tmp_path, tok):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("Plain text about a red kite.\n\nA second paragraph.", encoding="utf-8")
    (src / "sub" / "b.md").write_text("# Heading\n\nMarkdown body with *emphasis*.\n", encoding="utf-8")
    (src / "c.html").write_text(
        "<html><head><title>Web Page</title><style>p{color:red}</style></head><body>"
        "<p>First   html\nparagraph.</p><script>var hidden = 1;</script><ul><li>item one</li><li>item two</li></ul>"
        "</body></html>", encoding="utf-8")
    write_docx(src / "d.docx")
    write_pdf(src / "e.pdf", ["Page one text.", PAGE2, "Page three text."])
    (src / "f.jsonl").write_text(json.dumps({"id": "kept-id", "title": "Kept", "text": "A passed-through doc."}) + "\n")
    with zipfile.ZipFile(tmp_path / "bundle.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("inner/g.txt", "Zipped text about a blue whale.")
        zf.writestr("h.md", "Zipped markdown.")
    report = ingest([src, tmp_path / "bundle.zip"], tmp_path / "out", tok)
    assert report.errors == [] and report.files == 8
    files = by_file(report)
    assert set(files) == {"a.txt", "sub/b.md", "c.html", "d.docx", "e.pdf", "f.jsonl", "bundle.zip/inner/g.txt", "bundle.zip/h.md"}
    html = files["c.html"][0]
    assert html["title"] == "Web Page" and "First html paragraph." in html["text"] and "hidden" not in html["text"]
    assert "item one" in html["text"] and "color" not in html["text"]
    word = files["d.docx"][0]
    assert word["title"] == "Word Title" and "purple giraffe" in word["text"] and "Tables | kept" in word["text"]
    assert sorted(p["source"]["page"] for p in files["e.pdf"]) == [1, 2, 3]
    assert files["f.jsonl"][0]["id"] == "kept-id" and files["f.jsonl"][0]["source"]["line"] == 1
    assert files["a.txt"][0]["id"] == "a-1" and files["e.pdf"][1]["id"] == "e-p2-1"
    corpus = load_corpus(tmp_path / "out")
    assert len(corpus) == len(report.passages) and all(d.source and d.source["file"] for d in corpus.docs)
    # Stable: the same inputs give the same ids and texts.
    again = ingest([src, tmp_path / "bundle.zip"], tmp_path / "out2", tok)
    assert [(p["id"], p["text"]) for p in again.passages] == [(p["id"], p["text"]) for p in report.passages]


def test_pdf_sentence_on_page_two_only(tmp_path, tok):
    pages = [shipped_text(1500), PAGE2 + " " + shipped_text(300), "Closing remarks on the third page."]
    report = ingest([write_pdf(tmp_path / "three.pdf", pages)], tmp_path / "out", tok)
    hits = [p for p in report.passages if "seventeen herons" in p["text"]]
    assert hits and all(p["source"]["page"] == 2 for p in hits)
    assert not any("seventeen herons" in p["text"] and "third page" in p["text"] for p in report.passages)


def test_long_text_fits_the_reranker_and_offsets_slice_back(tmp_path, tok):
    original = shipped_text(37_000)
    (tmp_path / "long.txt").write_text(original, encoding="utf-8")
    report = ingest([tmp_path / "long.txt"], tmp_path / "out", tok)
    assert report.errors == [] and len(report.passages) >= 10
    counts = [engine_tokens(tok, p["text"]) for p in report.passages]
    assert max(counts) <= MAX, counts
    assert min(counts[:-1]) > MAX // 3, "passages should be filled, not cut at every paragraph"
    for p in report.passages:
        s = p["source"]
        assert original[s["start"]:s["end"]] == p["text"] and s["page"] is None
    starts = [p["source"]["start"] for p in report.passages]
    ends = [p["source"]["end"] for p in report.passages]
    assert starts == sorted(starts) and ends[-1] == len(original.rstrip())


def test_overlap_inside_long_paragraphs(tmp_path, tok):
    """semantic-text-splitter overlaps whole sentences where a cut falls inside a paragraph; it never
    cuts a paragraph just to overlap, so at a paragraph break the overlap may be none."""
    original = shipped_text(8000).replace("\n\n", " ")
    (tmp_path / "one.txt").write_text(original, encoding="utf-8")
    report = ingest([tmp_path / "one.txt"], tmp_path / "out", tok)
    spans = [(p["source"]["start"], p["source"]["end"]) for p in report.passages]
    shared = [original[b_start:a_end] for (_, a_end), (b_start, _) in zip(spans, spans[1:]) if b_start < a_end]
    assert len(shared) >= len(spans) // 2, spans
    assert all(0 < len(tok.encode(s, add_special_tokens=False)) <= MAX // 10 + 1 for s in shared)


def test_small_max_tokens_and_overlap(tmp_path, tok):
    (tmp_path / "t.md").write_text("# Title\n\n" + shipped_text(6000), encoding="utf-8")
    report = ingest([tmp_path / "t.md"], tmp_path / "out", tok, max_tokens=64, overlap=0)
    assert len(report.passages) > 20 and max(engine_tokens(tok, p["text"]) for p in report.passages) <= 64


def _zip(path: Path, members: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _lying_zip(path: Path) -> Path:
    """A stored member whose headers declare 100 bytes while 5000 follow."""
    _zip(path, {"lie.txt": b"word " * 1000}, zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, 100)
    struct.pack_into("<I", data, central + 24, 100)
    path.write_bytes(bytes(data))
    return path


def _symlink(src: Path) -> None:
    secret = src.parent / "secret.txt"
    secret.write_text("A secret outside the input folder.")
    (src / "link.txt").symlink_to(secret)


NOISE = random.Random(0).randbytes(4000).replace(b"\x00", b"\x01")  # no NUL byte, no text encoding fits
BAD = [  # name, make(src folder), expected message, ingest kwargs
    ("encrypted pdf", lambda s: write_pdf(s / "locked.pdf", ["Secret."], password="pw"), "locked.pdf: encrypted PDF", {}),
    ("corrupt pdf", lambda s: (s / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj garbage\n%%EOF"), "broken.pdf: not a readable PDF", {}),
    ("truncated pdf", lambda s: (s / "cut.pdf").write_bytes(write_pdf(s / "cut.pdf", ["x" * 50]).read_bytes()[:200]),
     "cut.pdf: ", {}),
    ("binary named .txt", lambda s: (s / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), "photo.txt: binary data", {}),
    ("binary without NUL", lambda s: (s / "noise.txt").write_bytes(b"fine\n" + NOISE), "noise.txt:2: not UTF-8 text", {}),
    ("empty file", lambda s: (s / "empty.md").write_bytes(b""), "empty.md: empty file", {}),
    ("blank file", lambda s: (s / "blank.txt").write_text(" \n\n "), "blank.txt: empty file", {}),
    ("over size limit", lambda s: (s / "huge.txt").write_text("word " * 1000), "huge.txt: ", {"max_file_bytes": 2000}),
    ("docx that is not", lambda s: (s / "fake.docx").write_text("not a zip"), "fake.docx: not a readable .docx", {}),
    ("zip slip", lambda s: _zip(s / "slip.zip", {"../evil.txt": b"escape", "/abs.txt": b"abs", "ok.txt": b"Fine zipped text."}),
     "slip.zip/../evil.txt: unsafe path in zip (zip slip)", {}),
    ("symlink", _symlink, "link.txt: a symbolic link: refused", {}),
    ("zip bomb ratio", lambda s: _zip(s / "bomb.zip", {"zeros.txt": b"0" * (20 * 2**20)}), "bomb.zip/zeros.txt: compressed", {}),
    ("zip bomb total", lambda s: _zip(s / "big.zip", {f"m{i}.txt": os.urandom(4000).hex().encode() for i in range(3)}),
     "big.zip: declares", {"max_zip_bytes": 20_000}),
    ("zip header lies", lambda s: _lying_zip(s / "lie.zip"), "lie.zip/lie.txt: ", {}),
    ("bad jsonl line", lambda s: (s / "docs.jsonl").write_text('{"id": "j1", "text": "ok"}\n{"id": \n'), "docs.jsonl:2: bad JSON", {}),
    ("pdf without text", lambda s: write_pdf(s / "blank.pdf", [""]), "blank.pdf: no text found", {}),
]


@pytest.mark.parametrize("name,make,message,kwargs", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_named_and_the_rest_still_ingested(tmp_path, tok, name, make, message, kwargs):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.txt").write_text("A good file about kestrels.")
    make(src)
    before = all_files(tmp_path)
    report = ingest([src], tmp_path / "out", tok, **kwargs)
    assert any(message in e for e in report.errors), report.errors
    assert "good.txt" in by_file(report)
    assert all_files(tmp_path) - before == {tmp_path / "out", tmp_path / "out" / "docs.jsonl"}, "nothing outside --out"
    assert not any("secret" in p["text"] or "escape" in p["text"] for p in report.passages)
    load_corpus(tmp_path / "out")


def test_legacy_encoding_decoded_and_named(tmp_path, tok):
    """A Windows-1252 .txt (common from older editors) keeps its accented words; the note names the encoding."""
    text = "café, naïve, Zürich — “quotes”\n\nThe café in Zürich served a naïve crème brûlée."
    (tmp_path / "legacy.txt").write_bytes(text.encode("cp1252"))
    report = ingest([tmp_path / "legacy.txt"], tmp_path / "out", tok)
    assert report.errors == []
    assert any("legacy.txt: not UTF-8; decoded as cp1252" in n for n in report.notes), report.notes
    joined = " ".join(p["text"] for p in report.passages)
    for word in ("café", "naïve", "Zürich", "—", "“quotes”", "crème brûlée"):
        assert word in joined, (word, joined)


def test_unknown_extension_skipped_with_a_note(tmp_path, tok):
    (tmp_path / "good.txt").write_text("Good.")
    (tmp_path / "sheet.xlsx").write_bytes(b"PK..")
    report = ingest([tmp_path], tmp_path / "out", tok)
    assert report.errors == [] and any("sheet.xlsx: skipped" in n for n in report.notes)
    again = ingest([tmp_path], tmp_path / "out", tok)  # the output folder inside the input is not read back
    assert [p["id"] for p in again.passages] == ["good-1"]


def test_zip_slip_keeps_safe_members(tmp_path, tok):
    _zip(tmp_path / "slip.zip", {"../evil.txt": b"escape", "ok.txt": b"Fine zipped text."})
    report = ingest([tmp_path / "slip.zip"], tmp_path / "out", tok)
    assert [p["source"]["file"] for p in report.passages] == ["slip.zip/ok.txt"]
    assert not (tmp_path / "evil.txt").exists()


def test_nothing_usable_keeps_the_old_corpus(tmp_path, tok):
    out = tmp_path / "out"
    out.mkdir()
    (out / "docs.jsonl").write_text('{"id": "old", "text": "old corpus"}\n')
    (tmp_path / "empty.txt").write_bytes(b"")
    report = ingest([tmp_path / "empty.txt"], out, tok)
    assert report.passages == [] and report.out is None and "empty.txt: empty file" in report.errors[0]
    assert (out / "docs.jsonl").read_text() == '{"id": "old", "text": "old corpus"}\n'
    # A later good run replaces it whole, leaving no temporary file behind.
    (tmp_path / "new.txt").write_text("New text.")
    assert ingest([tmp_path / "new.txt"], out, tok).out == out / "docs.jsonl"
    assert [d.id for d in load_corpus(out).docs] == ["new-1"] and sorted(os.listdir(out)) == ["docs.jsonl"]


def test_corpus_reads_and_checks_source(tmp_path):
    line = {"id": "d1", "title": "T", "text": "x", "source": {"file": "a.pdf", "page": 2, "start": 0, "end": 1}}
    (tmp_path / "docs.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({"id": "d2", "text": "y"}) + "\n")
    docs = load_corpus(tmp_path).docs
    assert docs[0].source["page"] == 2 and docs[1].source is None
    assert docs[0] == type(docs[0])("d1", "T", "x"), "source does not change equality"
    line["source"]["page"] = "two"
    (tmp_path / "docs.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(CorpusError, match=r"docs.jsonl:1: source.page must be int"):
        load_corpus(tmp_path)


def test_cli_end_to_end(tmp_path, tok, cache_dir, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    (src / "notes.md").write_text("# Notes\n\n" + shipped_text(3000), encoding="utf-8")
    write_pdf(src / "paper.pdf", ["Abstract on page one.", PAGE2])
    (src / "empty.txt").write_bytes(b"")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMCACHE_TRACK_USAGE": "false", "TOKENIZERS_PARALLELISM": "false",
           "HYPERRAG_CACHE_DIR": cache_dir}
    run = subprocess.run([sys.executable, "-m", "hyperrag.ingest", str(src), "--out", str(tmp_path / "out")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "passages from 2 files" in run.stdout and "error: empty.txt: empty file" in run.stderr
    corpus = load_corpus(tmp_path / "out")
    assert {d.source["file"] for d in corpus.docs} == {"notes.md", "paper.pdf"}
    assert any(d.source["page"] == 2 and "seventeen herons" in d.text for d in corpus.docs)
    # No passage at all: exit code 2 and nothing written.
    from hyperrag.ingest import main

    assert main([str(src / "empty.txt"), "--out", str(tmp_path / "none"), "--cache-dir", cache_dir]) == 2
    assert not (tmp_path / "none").exists()
    # Without --out the corpus goes to corpora/<first path's name> under the current folder.
    monkeypatch.chdir(tmp_path)
    assert main([str(src / "notes.md"), "--cache-dir", cache_dir]) == 0
    assert load_corpus(Path("corpora/notes")).docs[0].source["file"] == "notes.md"
