"""Launch the workbench in a subprocess and drive it with a real headless Chromium.

    ./run.sh python scripts/drive_app.py [--out assets/screenshot.png] [app.py flags...]

launches ``app.py`` on 127.0.0.1 (a free port), opens it in Debian's ``chromium`` (headless,
fresh profile, no network but the app), asks a gold question in the Ask tab (the reader over three rankings) by typing and
clicking like a user, and saves a screenshot (the README's ``assets/screenshot.png``).

The browser is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
messages separated by NUL bytes on fds 3 and 4), so nothing but the standard library is needed.
The tests import :func:`launch_app`, :class:`Chromium` and :func:`chromium_binary` from here.
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppProcess:
    """``app.py`` in a subprocess on 127.0.0.1; stopped by :meth:`stop` (or at exit)."""

    def __init__(self, args: list[str], data_dir: Path, log_path: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        environ = {**os.environ, "LMCACHE_TRACK_USAGE": "false", "HF_HUB_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
        environ.pop("GRADIO_SERVER_NAME", None)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--port", str(self.port), "--data-dir", str(data_dir), *args],
            cwd=REPO, env=environ, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_http(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"app not answering on {self.url} after {timeout_s} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def peak_rss_mb(self) -> float:
        """Peak resident memory of the app process (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def launch_app(args: list[str], data_dir: Path, log_path: Path | None = None, env: dict | None = None) -> AppProcess:
    app = AppProcess(args, Path(data_dir), Path(log_path or Path(data_dir) / "app.log"), env)
    try:
        app.wait_http()
    except BaseException:
        app.stop()
        raise
    return app


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (one page)."""

    def __init__(self, width: int = 1400, height: int = 1000, binary: str | None = None):
        self.binary = binary or chromium_binary()
        if not self.binary:
            raise FileNotFoundError("chromium is not installed")
        self.profile = tempfile.mkdtemp(prefix="hyperrag-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def child() -> None:  # the browser reads commands on fd 3 and writes replies on fd 4
            high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)  # out of the way of 3 and 4 first
            high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [self.binary, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=child, close_fds=False, start_new_session=True)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next = 0
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable", session=True)
        self.send("Runtime.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._replies[-1] = {"error": {"message": "browser closed the pipe"}}
                    self._cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, session: bool = False, timeout_s: float = 60.0) -> dict:
        with self._cond:
            self._next += 1
            ident = self._next
        msg = {"id": ident, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: ident in self._replies or -1 in self._replies, timeout_s):
                raise TimeoutError(f"chromium did not answer {method} in {timeout_s} s")
            reply = self._replies.pop(ident, None) or self._replies[-1]
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, session=True)

    def js(self, expression: str, timeout_s: float = 60.0):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=True, timeout_s=timeout_s)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('text')}: {expression[:200]}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float = 120.0, poll_s: float = 0.25):
        """Poll a JS expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value = self.js(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied: {expression[:200]}")
            time.sleep(poll_s)

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def click_button(self, label: str) -> None:
        found = self.js(f"""(() => {{
            const b = [...document.querySelectorAll('button')].find(
                b => b.innerText.trim() === {json.dumps(label)} && b.getClientRects().length > 0 && b.tabIndex !== -1);
            if (!b) return false; b.scrollIntoView(); b.click(); return true; }})()""")
        if not found:
            raise LookupError(f"no button labelled {label!r}")

    def fill(self, label: str, value: str) -> None:
        """Type into the textbox whose label is ``label`` as a user would: focus it, select what is
        there, insert the text through the browser's input pipeline (real input events), leave it."""
        found = self.js(f"""(() => {{
            const labels = [...document.querySelectorAll('label')].filter(
                l => l.innerText.trim().startsWith({json.dumps(label)}));
            for (const l of labels) {{
                const box = l.querySelector('textarea, input') || (l.htmlFor && document.getElementById(l.htmlFor));
                if (box) {{ box.scrollIntoView(); box.focus(); box.select(); return true; }}
            }}
            return false; }})()""")
        if not found:
            raise LookupError(f"no textbox labelled {label!r}")
        self.send("Input.insertText", {"text": value}, session=True)
        self.js("document.activeElement && document.activeElement.blur()")

    def screenshot(self, path: str | Path, full_page: bool = True) -> bytes:
        params: dict = {"format": "png"}
        if full_page:
            height = int(self.js("Math.ceil(document.documentElement.scrollHeight)") or 1000)
            width = int(self.js("document.documentElement.clientWidth") or 1400)
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": width, "height": height,
                                                            "scale": 1})
        data = base64.b64decode(self.send("Page.captureScreenshot", params, session=True)["data"])
        Path(path).write_bytes(data)
        return data

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout_s=5)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


def ask_in_browser(browser: Chromium, url: str, question: str, timeout_s: float = 300.0) -> str:
    """Open the app, go to the Ask tab, type a question, press Ask; return the page text when done."""
    browser.goto(url)
    browser.wait_for("document.body && document.body.innerText.includes('documents,')", timeout_s)
    browser.click_button("2 · Ask")
    browser.wait_for("[...document.querySelectorAll('label')].some(l => l.innerText.trim().startsWith('Question'))")
    browser.fill("Question", question)
    time.sleep(0.5)  # let the page take the typed value before the click reads it
    from hyperrag.ui import ASK_BUTTON, COMPARE_MODES

    browser.click_button(ASK_BUTTON)
    # The headline compares KV reuse with full prefill once the last column is in.
    done = ("document.body.innerText.includes('faster than full prefill')"
            f" && document.body.innerText.split('Answer:').length > {len(COMPARE_MODES)}")
    toasts = "[...document.querySelectorAll('[data-testid=\"toast-body\"]')].map(t => t.innerText).join(' | ')"
    try:
        browser.wait_for(f"({done}) || ({toasts}).includes('Error')", timeout_s)
        errors = browser.js(toasts)
        if "Error" in (errors or "") and not browser.js(done):
            raise RuntimeError(f"the app answered with an error: {errors}")
    except TimeoutError as err:
        text = browser.text()
        tail = f"\n[...]\n{text[-1500:]}" if len(text) > 3000 else ""  # error toasts sit at the end
        raise TimeoutError(f"{err}\npage text:\n{text[:3000]}{tail}") from None
    time.sleep(1.0)  # let the tables finish rendering
    return browser.text()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "assets" / "screenshot.png"))
    # A gold question the reader answers exactly in docs/eval/reader-dev-300.json (the generator does not).
    parser.add_argument("--question", default="From which countries did the Norse originate?")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    args, app_args = parser.parse_known_args(argv)
    work = Path(tempfile.mkdtemp(prefix="hyperrag-shot-"))
    app = launch_app(app_args, work / "data", work / "app.log")
    browser = Chromium(args.width, args.height)
    try:
        from gradio_client import Client

        # Ask once through the API first: the candidates' KV caches land in the store, so the
        # screenshot shows steady-state reuse rather than a first, cache-filling question.
        Client(app.url, verbose=False).predict(args.question, "reuse", 0, 0, "", api_name="/ask")
        ask_in_browser(browser, app.url + "?__theme=light", args.question)
        browser.js("window.scrollTo(0, 0)")
        data = browser.screenshot(args.out)
        print(f"{args.out}: {len(data) / 1024:.0f} KB")
    finally:
        browser.close()
        app.stop()


if __name__ == "__main__":
    main()
