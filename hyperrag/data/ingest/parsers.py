"""Text out of each format, with kept libraries: pypdf (page by page), BeautifulSoup, python-docx.

Each parser returns ``(title or None, [(page or None, text)])``; the text is what passage offsets
refer to. A file that cannot be read raises :class:`IngestError` naming it; a PDF page that
cannot be read is reported in ``problems`` and the other pages are kept.
"""
from __future__ import annotations

import io
import re
from pathlib import PurePosixPath

from hyperrag.data.ingest.sources import IngestError

Pages = list[tuple[int | None, str]]


def _tidy(text: str) -> str:
    """Fold blanks inside lines and runs of blank lines, so paragraphs end in exactly one blank line."""
    lines = (re.sub(r"[ \t\r\f\v\xa0]+", " ", line).strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def decode(label: str, data: bytes, notes: list[str] | None = None) -> str:
    """Text or a clear refusal: UTF-8 first, else the encoding charset-normalizer finds (named in ``notes``).

    NUL bytes mean binary (or UTF-16) data, not prose to index. Legacy single-byte files are common
    (Windows-1252, Latin-1) and short ones fit several code pages equally well, so a tie goes to
    Windows-1252, the most common of them (as browsers do for unlabelled Western text).
    """
    if (nul := data.find(b"\x00")) >= 0:
        raise IngestError(f"{label}: binary data, not text (NUL byte at offset {nul})")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line, byte = data[: err.start].count(b"\n") + 1, err.start
    import charset_normalizer

    best = charset_normalizer.from_bytes(data).best()
    western = charset_normalizer.from_bytes(data, cp_isolation=["cp1252"]).best()
    if western is not None and (best is None or western.chaos <= best.chaos):
        best = western
    if best is None:
        raise IngestError(f"{label}:{line}: not UTF-8 text (byte {byte}) and no other text encoding fits")
    if notes is not None:
        notes.append(f"{label}: not UTF-8; decoded as {best.encoding}")
    return str(best)


BLOCKS = ["p", "div", "section", "article", "main", "header", "footer", "aside", "nav", "li", "ul", "ol",
          "table", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "dl", "dt", "dd", "figure"]


def _html(label: str, data: bytes) -> tuple[str | None, Pages]:
    """Visible text with a blank line after each block element, so the splitter sees paragraphs."""
    from bs4 import BeautifulSoup, NavigableString

    decode(label, data)  # binary junk named .html is an error, not noise
    soup = BeautifulSoup(data, "lxml")  # BeautifulSoup finds the page's own encoding
    title = soup.title.get_text(" ", strip=True) if soup.title else None
    for tag in soup(["script", "style", "noscript", "template", "head", "svg"]):
        tag.decompose()
    for text in soup.find_all(string=True):
        if type(text) is NavigableString and text.find_parent("pre") is None:
            text.replace_with(re.sub(r"\s+", " ", text))
    for tag in soup.find_all("br"):
        tag.replace_with("\n")
    for tag in soup.find_all(BLOCKS):
        tag.insert_before("\n\n")
        tag.insert_after("\n\n")
    return title, [(None, _tidy(soup.get_text()))]


def _docx(label: str, data: bytes) -> tuple[str | None, Pages]:
    """Paragraphs and table rows in document order."""
    import docx
    from docx.table import Table

    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as err:  # python-docx raises zip, XML and its own errors alike
        raise IngestError(f"{label}: not a readable .docx ({type(err).__name__}: {err})") from None
    parts = []
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            parts.append("\n".join(" | ".join(c.text.strip() for c in row.cells) for row in block.rows))
        else:
            parts.append(block.text)
    return document.core_properties.title or None, [(None, _tidy("\n\n".join(parts)))]


def _pdf(label: str, data: bytes, problems: list[str]) -> tuple[str | None, Pages]:
    """One text per page, so that no passage spans two pages; a bad page does not lose the others."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise IngestError(f"{label}: encrypted PDF (needs a password): not read")
        pages = list(reader.pages)
    except IngestError:
        raise
    except Exception as err:  # pypdf raises PdfReadError, but also ValueError/KeyError on damaged files
        raise IngestError(f"{label}: not a readable PDF ({type(err).__name__}: {err})") from None
    try:
        title = reader.metadata.title if reader.metadata else None
    except Exception:
        title = None
    out: Pages = []
    for number, page in enumerate(pages, 1):
        try:
            out.append((number, _tidy(page.extract_text() or "")))
        except Exception as err:
            problems.append(f"{label}: page {number}: text not extracted ({type(err).__name__}: {err})")
    return title, out


def extract(label: str, data: bytes, problems: list[str], notes: list[str]) -> tuple[str | None, Pages]:
    """(title or None, [(page or None, text)]) for any supported file but .jsonl; ``problems`` gets
    what could not be read, ``notes`` what was read in an unusual way (a text file's encoding)."""
    suffix = PurePosixPath(label).suffix.lower()
    if suffix == ".pdf":
        return _pdf(label, data, problems)
    if suffix in (".html", ".htm"):
        return _html(label, data)
    if suffix == ".docx":
        return _docx(label, data)
    return None, [(None, decode(label, data, notes))]


