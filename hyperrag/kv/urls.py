"""Store URLs: which backend a URL names, and how to show one without its password.

``fs://DIR`` (a folder; relative and ``~`` paths accepted), ``memory://`` (in-process),
``lm://HOST:PORT`` (an LMCache server), ``redis://[:PASSWORD@]HOST:PORT``.
"""
from __future__ import annotations

from pathlib import Path

SCHEMES = ("fs", "lm", "redis", "memory")


class StoreError(RuntimeError):
    """A store that cannot be used at all (bad URL, folder that cannot be created)."""


def parse_store_url(url: str) -> tuple[str, str | None]:
    """``(scheme, LMCache remote_url or None)``; ``fs://DIR`` accepts relative and ~ paths."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise StoreError(f"store URL {url!r}: expected one of {', '.join(s + '://' for s in SCHEMES)}")
    if scheme == "memory":
        return scheme, None
    if scheme == "fs":
        if not rest:
            raise StoreError(f"store URL {url!r}: fs:// needs a folder, e.g. fs://./kv")
        folder = Path(rest.removeprefix("host:0")).expanduser().resolve()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"store URL {url!r}: cannot create {folder}: {err}") from err
        return scheme, f"fs://host:0{folder}"
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise StoreError(f"store URL {url!r}: expected {scheme}://HOST:PORT")
    return scheme, f"{scheme}://{host}:{port}"


def redact_url(url: str) -> str:
    """``redis://:secret@host:port`` -> ``redis://:***@host:port`` (what messages may show)."""
    scheme, sep, rest = url.partition("://")
    creds, at, hostport = rest.rpartition("@")
    if not sep or not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostport}"
