"""The API's gate, before anything reads a request body: the token first, then a size cap.

A pure ASGI middleware, because FastAPI reads a route's body before it runs the route's
dependencies: a token checked there comes after a chunked body of any size was read into
memory. Here an unauthenticated request is refused from its headers alone, and a body is
counted as it streams in and cut off at ``max_body_bytes``, whether or not it declared a
``content-length``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, status

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def guarded(path: str) -> bool:
    """Whether ``path`` needs the token: the fleet's data, not ``/healthz`` or the docs."""
    return path.startswith("/api/") or path == "/metrics"


@dataclass
class RequestGate:
    """Refuses, from the headers, a guarded request without ``Authorization: Bearer
    <token>`` (401) and a body declared too large (413); cuts off one that streams past the
    limit (413). ``token`` ``None``: no token is asked for."""

    app: ASGIApp
    token: str | None
    max_body_bytes: int

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        needs_token = self.token is not None and guarded(scope.get("path", ""))
        if needs_token and not self._authorized(headers.get(b"authorization", b"")):
            await _answer(send, 401, "missing or invalid bearer token", bearer=True)
            return
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            declared = length.decode("latin-1")[:40]
            reason = f"request body over {self.max_body_bytes} bytes (content-length {declared!r})"
            await _answer(send, 413, reason)
            return
        await self.app(scope, self._capped(receive), send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, given = header.partition(b" ")
        expected = (self.token or "").encode()
        # compare_digest on bytes: it refuses non-ASCII str, and a header may hold any byte.
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), expected)

    def _capped(self, receive: Receive) -> Receive:
        received = 0

        async def capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # HTTPException: FastAPI passes it through its body reading as is.
                    raise HTTPException(
                        status.HTTP_413_CONTENT_TOO_LARGE,
                        detail=f"request body over {self.max_body_bytes} bytes",
                    )
            return message

        return capped


async def _answer(send: Send, code: int, detail: str, *, bearer: bool = False) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if bearer:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
