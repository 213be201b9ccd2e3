"""Run a simulated model server's ASGI app with uvicorn in a background thread.

Around the app, :class:`Harness` gives tests a handle on the server: request counters,
injected faults (a delay, an error status) and garbled answers, all applied by an ASGI
middleware before the app sees a request. :func:`json_response` and :func:`ndjson_response`
shape answers as every simulated server sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import http.server
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import urlsplit

import uvicorn
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

JSONObject = dict[str, Any]
JSON_TYPE: Final = "application/json; charset=utf-8"
NDJSON_TYPE: Final = "application/x-ndjson"

_STARTUP_TIMEOUT_S: Final = 10.0
_JOIN_TIMEOUT_S: Final = 5.0
# http.server, which these servers replaced, never closed idle keep-alive connections;
# uvicorn's default of 5 s would race the pooled clients that reuse them after a pause.
_KEEP_ALIVE_S: Final = 3600
# The methods http.server dispatched; it answered others with 501 before counting them.
_METHODS: Final = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
_STARTED_NS: Final = "sim_started_ns"


def _dumps(payload: object) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def json_response(status: int, payload: JSONObject | list[Any]) -> Response:
    """``payload`` as compact JSON."""
    return Response(_dumps(payload).encode(), status, media_type=JSON_TYPE)


def ndjson_response(lines: Sequence[JSONObject]) -> StreamingResponse:
    """``lines`` as newline-delimited JSON, one HTTP chunk per line, so that clients really
    receive a stream (on HTTP/1.0 the closed connection ends it instead of a last chunk)."""

    async def chunks() -> AsyncIterator[bytes]:
        for line in lines:
            yield (_dumps(line) + "\n").encode()

    return StreamingResponse(chunks(), media_type=NDJSON_TYPE)


def elapsed_ns(request: Request) -> int:
    """Nanoseconds since ``request`` arrived, an injected delay included."""
    started: int = request.scope["state"][_STARTED_NS]
    return time.perf_counter_ns() - started


def _unsupported_method(method: str) -> Response:
    # Byte for byte what http.server's send_error(501) answered.
    message = html.escape(f"Unsupported method ({method!r})", quote=False)
    explain = html.escape(HTTPStatus.NOT_IMPLEMENTED.description, quote=False)
    page = http.server.BaseHTTPRequestHandler.error_message_format % {
        "code": 501,
        "message": message,
        "explain": explain,
    }
    return Response(
        page.encode("UTF-8", "replace"),
        501,
        headers={"Connection": "close"},
        media_type=http.server.BaseHTTPRequestHandler.error_content_type,
    )


def _target_path(scope: Scope) -> str:
    # The path as the client spelled it, not percent-decoded, as http.server gave it: the
    # counters, the garbled paths and the routes all match it byte for byte.
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    return urlsplit(raw.decode("latin-1")).path


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client hung up first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app ``body`` again, then whatever comes next."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def _listening_socket(host: str, port: int) -> socket.socket:
    # Bound here rather than by uvicorn so that a busy port raises OSError from start(),
    # and port 0 is resolved before start() returns.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose protocol says
    # TCP, and with Nagle on, every answer's body on a kept-alive connection waited for the
    # client's delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # Like http.server: a restarted server gets its port back despite TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _Uvicorn(uvicorn.Server):
    """A uvicorn server that can be awaited from another thread and halted at once."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None

    def serve_socket(self, sock: socket.socket) -> None:
        try:
            self.run(sockets=[sock])
        finally:
            # Also when startup failed, so that start() does not wait out its timeout.
            self.ready.set()
            sock.close()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        await super().startup(sockets=sockets)
        self.ready.set()

    async def main_loop(self) -> None:
        # uvicorn's own loop looks at should_exit every 0.1 s; this one also wakes up as
        # soon as halt() sets the stopping event, to make stop() that much quicker.
        assert self.stopping is not None  # set by startup()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864_000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 0.1)

    def halt(self) -> None:
        """In the server's loop: stop listening, cut every connection, wake sleepers."""
        for server in self.servers:
            server.close()
        # uvicorn's own shutdown lets busy connections finish; a stopped simulated server
        # must look dead instead, also to pooled clients and requests sleeping in a delay.
        for connection in list(self.server_state.connections):
            connection.transport.close()
        self.should_exit = True
        if self.stopping is not None:
            self.stopping.set()


@dataclass(frozen=True)
class Fault:
    """What to do to every request: sleep ``delay_s``, then fail with ``fail_with``."""

    fail_with: int | None = None
    delay_s: float = 0.0


class Harness:
    """Serves one app at a time in a daemon thread, and keeps what tests inspect or inject.

    ``error_body`` shapes the body of an injected failure from its message, in the API's
    own error format (Ollama's ``{"error": message}`` by default).
    """

    def __init__(
        self,
        name: str,
        *,
        server_header: str,
        error_body: Callable[[str], JSONObject] = lambda message: {"error": message},
    ) -> None:
        self.name = name
        self.server_header = server_header
        self.error_body = error_body
        self._lock = threading.Lock()
        self._server: _Uvicorn | None = None
        self._thread: threading.Thread | None = None
        self._fault = Fault()
        self._garbled: dict[str, str] = {}
        self._counts: Counter[tuple[str, str]] = Counter()
        self._models: list[tuple[str, str]] = []

    def start(self, app: ASGIApp, host: str, port: int) -> int:
        """Serve ``app`` on ``host:port`` (0 picks a free port); return the port once the
        server accepts connections."""
        with self._lock:
            if self._server is not None:
                raise RuntimeError(f"fake model server {self.name!r} is already running")
            sock = _listening_socket(host, port)
            port = int(sock.getsockname()[1])
            server = _Uvicorn(self._config(_Intercept(app, self), host, port))
            thread = threading.Thread(
                target=server.serve_socket,
                args=(sock,),
                name=f"fake-model-server-{self.name}",
                daemon=True,
            )
            self._server, self._thread = server, thread
        thread.start()
        if not (server.ready.wait(_STARTUP_TIMEOUT_S) and server.started):
            self.stop()
            raise RuntimeError(f"fake model server {self.name!r} did not start")
        return port

    def _config(self, app: ASGIApp, host: str, port: int) -> uvicorn.Config:
        return uvicorn.Config(
            app,
            host=host,
            port=port,
            # h11 ends a stream to an HTTP/1.0 client by closing the connection, as
            # http.server did; httptools would send chunks such a client cannot read.
            http="h11",
            # Not uvloop, even where installed: the same event loop on every machine.
            loop="asyncio",
            lifespan="off",
            # Below warning, so no access log. No log_config: uvicorn would configure the host
            # process's logging; its warnings go to the root logger instead.
            log_level="warning",
            log_config=None,
            server_header=False,
            headers=[("server", self.server_header)],
            timeout_keep_alive=_KEEP_ALIVE_S,
            timeout_graceful_shutdown=1,
        )

    def stop(self) -> None:
        """Stop serving, close the listening socket and open connections; idempotent.

        Requests sleeping in an injected delay are abandoned without an answer.
        """
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None or thread is None:
            return
        server.should_exit = True
        if server.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                server.loop.call_soon_threadsafe(server.halt)
        thread.join(timeout=_JOIN_TIMEOUT_S)

    async def pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` in the server's loop; True, early, if the server is stopping."""
        server = self._server
        # Another loop's server, or none: this request's server was stopped.
        if server is None or server.loop is not asyncio.get_running_loop():
            return True
        assert server.stopping is not None  # set before the loop ran any request
        try:
            await asyncio.wait_for(server.stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def set_fault(self, fault: Fault) -> None:
        """Apply ``fault`` to every following request."""
        with self._lock:
            self._fault = fault

    def fault(self) -> Fault:
        """The fault applied to requests now."""
        with self._lock:
            return self._fault

    def garble(self, path: str, body: str | None) -> None:
        """Answer ``path`` with ``body`` from now on; ``None`` stops it."""
        with self._lock:
            if body is None:
                self._garbled.pop(path, None)
            else:
                self._garbled[path] = body

    def garbled(self, path: str) -> str | None:
        """The body that answers ``path`` instead of the app, if any."""
        with self._lock:
            return self._garbled.get(path)

    def record_request(self, method: str, path: str) -> None:
        """Count a request for ``method`` and ``path``."""
        with self._lock:
            self._counts[(method, path)] += 1

    def request_count(self, method: str, path: str) -> int:
        """How many requests were received for ``method`` and ``path``."""
        with self._lock:
            return self._counts[(method.upper(), path)]

    def record_model(self, path: str, model: str) -> None:
        """Note that a request to ``path`` named ``model``."""
        with self._lock:
            self._models.append((path, model))

    def requested_models(self, path: str | None = None) -> list[str]:
        """The models requests named, in arrival order, for ``path`` or every path."""
        with self._lock:
            return [model for p, model in self._models if path is None or p == path]


class _Intercept:
    """ASGI middleware: counts, delays, fails or garbles a request before the app sees it."""

    def __init__(self, app: ASGIApp, harness: Harness) -> None:
        self.app = app
        self.harness = harness

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        if method not in _METHODS:
            await _unsupported_method(method)(scope, receive, send)
            return
        started_ns = time.perf_counter_ns()
        # Counted once the body is in, as http.server did: a request whose body never
        # arrives, or fails to parse, was never received.
        body = await _read_body(receive)
        if body is None:
            return
        receive = _replay(body, receive)
        path = _target_path(scope)
        state = {**scope.get("state", {}), _STARTED_NS: started_ns}
        scope = {**scope, "path": path, "state": state}
        harness = self.harness
        harness.record_request(method, path)
        fault = harness.fault()
        if fault.delay_s > 0 and await harness.pause(fault.delay_s):
            # Stopped meanwhile: the connection is being cut, leave without an answer.
            await _until_disconnected(receive)
            return
        if fault.fail_with is not None:
            failure = json_response(fault.fail_with, harness.error_body("injected"))
            await failure(scope, receive, send)
            return
        garbled = harness.garbled(path)
        if garbled is not None:
            await Response(garbled.encode(), 200, media_type=JSON_TYPE)(scope, receive, send)
            return
        await self.app(scope, receive, send)
