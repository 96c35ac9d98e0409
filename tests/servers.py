"""Real KV store servers for the tests: LMCache's ``lmcache_server`` and Debian's ``redis-server``,
started on free 127.0.0.1 ports and stopped afterwards (never left running).

Fixtures (import them into a test module: ``from tests.servers import lm_server, redis_server``):
``lm_server`` and ``redis_server`` are module-scoped :class:`Server` objects; a test that kills
or freezes one must leave it running again (``ensure_running``) for the next test. A missing
binary skips the test with the reason (``./run.sh test`` installs redis-server; lmcache_server
comes with the lmcache package).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def lmcache_server_binary() -> str | None:
    local = Path(sys.executable).with_name("lmcache_server")
    return str(local) if local.exists() else shutil.which("lmcache_server")


def _die_with_parent(command: list[str]) -> list[str]:
    """Make the server get SIGKILL when the test process dies, so no server outlives a crashed or
    killed test run (util-linux ``setpriv --pdeathsig``, which then execs the server under the
    same pid; without it, the fixtures' teardown is the only guard)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", *command] if setpriv else command


class Server:
    """One server process on a fixed port; kill / freeze / restart keep the port (and URL)."""

    def __init__(self, kind: str, port: int | None = None, password: str = ""):
        self.kind = kind
        self.port = port or free_port()
        self.password = password  # redis only: --requirepass
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{self.kind}://{auth}{HOST}:{self.port}"

    def command(self) -> list[str]:
        if self.kind == "lm":
            return [lmcache_server_binary() or "lmcache_server", HOST, str(self.port), "cpu"]
        return ["redis-server", "--bind", HOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--protected-mode", "yes", "--loglevel", "warning",
                *(["--requirepass", self.password] if self.password else [])]

    def start(self, timeout_s: float = 30.0) -> "Server":
        env = {**os.environ, "LMCACHE_TRACK_USAGE": "false", "LMCACHE_LOG_LEVEL": "WARNING"}
        deadline = time.monotonic() + timeout_s
        while True:
            self.proc = subprocess.Popen(_die_with_parent(self.command()), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, env=env, start_new_session=True)
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection((HOST, self.port), timeout=0.2).close()
                    return self
                except OSError:
                    time.sleep(0.05)
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(f"{self.kind} server did not start on port {self.port}")
            time.sleep(0.3)  # exited early (port still held by the previous instance): retry

    def kill(self) -> None:
        """SIGKILL: the crash a store must survive."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen process must still die
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its sockets open but answers nothing (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def ensure_running(self) -> None:
        self.thaw()
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _server(kind: str):
    if kind == "lm" and lmcache_server_binary() is None:
        pytest.skip("lmcache_server not found (it comes with `pip install lmcache`)")
    if kind == "redis" and shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (./run.sh test installs it with apt-get)")
    server = Server(kind).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def lm_server():
    yield from _server("lm")


@pytest.fixture(scope="module")
def redis_server():
    yield from _server("redis")


def wait_until(predicate, timeout_s: float = 15.0, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()
