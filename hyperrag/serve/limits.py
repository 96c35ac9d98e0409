"""What the service refuses before any model work: oversized bodies (413) and requests without
the bearer token (401). Both are plain ASGI middleware so they hold for every route, FastAPI's
own (``/docs``) and Ray Serve's replicas alike."""
from __future__ import annotations

import hmac
import json
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/docs/oauth2-redirect")  # liveness and the API's own description


async def _refuse(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for a body over ``max_bytes``: at once when Content-Length says so, else as soon as
    the streamed body passes the limit (nothing beyond it is read)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than {self.max_bytes / 2**20:g} MB (setting serve_max_body_mb)"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _refuse(send, 413, message)
        seen, started = 0, False

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return msg

        async def tracking(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited, tracking)
        except _TooLarge:
            if not started:
                await _refuse(send, 413, message)


class BearerToken:
    """401 unless ``Authorization: Bearer <token>`` matches (constant-time compare); the paths in
    :data:`OPEN_PATHS` stay open. No token configured: everything is open."""

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                why = "a wrong bearer token" if given else "no bearer token"
                return await _refuse(send, 401, f"{why}: send the header 'Authorization: Bearer <token>'",
                                     {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


def read_token(path: str | None) -> str:
    """The bearer token from ``path`` (its first line; '' without a path). An empty file is an
    error rather than a silently open service."""
    if not path:
        return ""
    token = Path(path).read_text(encoding="utf-8").strip().splitlines()
    if not token or not token[0].strip():
        raise ValueError(f"token file {path} is empty: put the bearer token on its first line")
    return token[0].strip()
