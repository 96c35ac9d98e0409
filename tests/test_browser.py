"""A real browser: headless Debian chromium loads the app, renders it, and a user asks a question.

Skipped with the reason when chromium is not installed (``./run.sh test`` installs it)."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from hyperrag import ui
from hyperrag.workbench.uploads import UPLOAD_KINDS
from scripts.drive_app import CHROMIUM_FLAGS, Chromium, ask_in_browser, chromium_binary
from tests.test_app_server import shared_app

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(chromium_binary() is None,
                       reason="chromium not installed (apt-get install chromium; ./run.sh test installs it)"),
]
MAIN_LABELS = ["HyperRAG workbench", "1 · Corpus &amp; KV cache", "2 · Ask", "3 · Batch &amp; dashboards",
               "Build index &amp; precompute KV caches", f"Upload {UPLOAD_KINDS}", "Storage estimate",
               "Store and reranker settings"]


@pytest.fixture(scope="module")
def app(tiny_corpus_dir, tmp_path_factory):
    return shared_app(tiny_corpus_dir, tmp_path_factory.getbasetemp() / "app-server")


def run_chromium(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="hyperrag-chromium-")
    try:
        return subprocess.run([chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout_s)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def distinct_colors(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as img:
        return len(img.convert("RGB").getcolors(maxcolors=1 << 20) or [])


def test_page_loads_with_main_components(app, tmp_path):
    """The page as the command-line browser renders it: DOM labels, then a screenshot."""
    dom = run_chromium("--virtual-time-budget=20000", "--dump-dom", app.url).stdout
    missing = [label for label in MAIN_LABELS if label not in dom]
    assert not missing, f"not in the rendered page: {missing}"
    assert "24 documents" in dom  # the corpus panel was filled by the page-load event
    shot = tmp_path / "page.png"
    run_chromium("--virtual-time-budget=20000", "--window-size=1400,1000", f"--screenshot={shot}", app.url)
    data = shot.read_bytes()
    assert png_size(data) == (1400, 1000) and len(data) > 20_000
    assert distinct_colors(shot) > 200  # text, logo, buttons: not a blank or error page


def test_user_asks_a_question_in_the_browser(app, tmp_path):
    """Type a question, press the button, read every column, save a screenshot."""
    browser = Chromium(1400, 1000)
    try:
        text = ask_in_browser(browser, app.url, "What is the original meaning of the word Norman?")
        for mode in ui.COMPARE_MODES:
            assert ui.MODE_TITLES[mode] in text
        assert text.count("Answer:") == len(ui.COMPARE_MODES) and "faster than full prefill" in text
        assert "KV load" in text and "Read from" in text
        assert "normans-002" in text  # the reranked documents tables are filled
        shot = tmp_path / "asked.png"
        browser.js("window.scrollTo(0, 0)")
        data = browser.screenshot(shot)
        width, height = png_size(data)
        assert width == 1400 and height >= 1000 and distinct_colors(shot) > 200
    finally:
        browser.close()
