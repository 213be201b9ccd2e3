"""A SIMULATED Ollama model server: no model runs here. For the demo and the tests.

It speaks the subset of Ollama's JSON API that this project relies on
(https://github.com/ollama/ollama/blob/main/docs/api.md):

* ``GET /api/tags``, ``GET /api/ps``, ``GET /api/version``
* ``POST /api/generate`` (NDJSON streaming when ``stream`` is missing or true, like Ollama)
* ``POST /api/embed`` (deterministic, L2-normalised, hash-seeded vectors)
* ``POST /api/pull`` (NDJSON status lines unless ``"stream": false``)

plus ``GET /health``, the health endpoint of this project's embedding and OCR services.

Generated text is deterministic and echoes its inputs (``"[server] model: prompt"``) so tests
and the demo can tell which server and model answered; embeddings are hashes of the text,
not semantic. Token timings are simulated without sleeping, and so is a model load's
``size / load_bps``; only ``load_delay_s`` (model load) and the injected ``delay_s`` take real
wall-clock time. Models never expire from memory on their own; with ``max_loaded``
(Ollama's ``OLLAMA_MAX_LOADED_MODELS``) loading one more evicts the least recently used,
the one whose ``expires_at`` in ``/api/ps`` is earliest.

Use it in-process::

    with SimulatedModelServer("gpu-a", ["llama3.2"]) as server:
        httpx.post(f"{server.url}/api/generate", json={...})

or as a process (for worker subprocesses)::

    python -m worker_tasks.simulated_ollama --name gpu-a --models llama3.2,llava --loaded llama3.2

which prints ``READY <url>`` once listening and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import json
import math
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from types import FrameType, TracebackType
from typing import Any, Final, Self, cast
from urllib.parse import urlsplit

OLLAMA_VERSION: Final = "0.5.0"
# Ollama's default keep_alive; only used to fill in /api/ps "expires_at".
DEFAULT_KEEP_ALIVE_S: Final = 300.0
# Simulated per-token costs, so clients computing tokens/s never divide by zero.
_PROMPT_NS_PER_TOKEN: Final = 100_000
_EVAL_NS_PER_TOKEN: Final = 1_000_000
_MAX_LINE: Final = 65_537

JSONObject = dict[str, Any]


class _HTTPError(Exception):
    """Turned into an Ollama-style ``{"error": message}`` response by the dispatcher."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _normalize(name: str) -> str:
    # Ollama treats "llama3.2" and "llama3.2:latest" as the same model; only a colon in the
    # last path segment is a tag ("host:5000/ns/model" has no tag).
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _now_iso(offset_s: float = 0.0) -> str:
    stamp = datetime.now(UTC) + timedelta(seconds=offset_s)
    return stamp.isoformat().replace("+00:00", "Z")


def _iso_us(unix_us: int) -> str:
    seconds, micros = divmod(unix_us, 1_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros)
    return stamp.isoformat().replace("+00:00", "Z")


def _model_entry(name: str) -> JSONObject:
    """Deterministic /api/tags-style metadata (without ``modified_at``) for ``name``."""
    full = _normalize(name)
    digest = hashlib.sha256(full.encode()).hexdigest()
    size = 1_000_000_000 + int(digest[:8], 16) % 4_000_000_000
    base = full.rsplit("/", 1)[-1].split(":", 1)[0]
    match = re.match(r"[a-z]+", base.lower())
    family = match.group(0) if match else "llama"
    # Q4_K_M is roughly 0.6 bytes per parameter.
    parameter_size = f"{size / 0.6e9:.1f}B"
    return {
        "name": full,
        "model": full,
        "size": size,
        "digest": digest,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": parameter_size,
            "quantization_level": "Q4_K_M",
        },
    }


def _embedding(text: str, dim: int) -> list[float]:
    values = []
    for i in range(dim):
        digest = hashlib.sha256(f"{i}\0{text}".encode()).digest()
        values.append(int.from_bytes(digest[:8], "big") / 2**63 - 1.0)
    norm = math.sqrt(sum(v * v for v in values))
    if norm == 0.0:
        return [1.0 / math.sqrt(dim)] * dim
    return [v / norm for v in values]


def _word_count(text: str) -> int:
    return len(text.split())


def _is_zero_keep_alive(value: object) -> bool:
    # keep_alive is a number of seconds or a Go duration string; zero means "unload now".
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == 0
    if isinstance(value, str):
        return re.fullmatch(r"0+(\.0*)?(ns|us|µs|ms|s|m|h)?", value.strip()) is not None
    return False


def _optional_bool(payload: JSONObject, key: str, default: bool) -> bool:
    value = payload.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _HTTPError(400, f'"{key}" must be a boolean')
    return value


def _required_model(payload: JSONObject) -> str:
    # "name" is the deprecated spelling that Ollama still accepts.
    model = payload.get("model") or payload.get("name")
    if not isinstance(model, str) or not model:
        raise _HTTPError(400, "model is required")
    return model


def _not_found(model: str) -> _HTTPError:
    return _HTTPError(404, f'model "{model}" not found, try pulling it first')


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], fake: SimulatedModelServer) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.fake = fake
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that can stall for
        # seconds in sandboxes; tests never need the name.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def track(self, conn: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(conn)

    def close_connections(self) -> None:
        # Keep-alive connections outlive shutdown(); cut them so that a stopped fake looks
        # like a dead server to pooled clients instead of silently answering.
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (timeouts, cancelled streams) are expected in failure tests.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOllama/" + OLLAMA_VERSION

    _body: bytes = b""
    _started_ns: int = 0

    @property
    def _fake(self) -> SimulatedModelServer:
        return cast(_Server, self.server).fake

    def setup(self) -> None:
        super().setup()
        cast(_Server, self.server).track(self.connection)

    def finish(self) -> None:
        try:
            cast(_Server, self.server).untrack(self.connection)
        finally:
            super().finish()

    def version_string(self) -> str:
        """The ``Server`` header, without the Python version http.server appends."""
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request stderr logging of ``http.server``."""

    def do_GET(self) -> None:
        """Dispatch a GET request."""
        self._dispatch()

    def do_POST(self) -> None:
        """Dispatch a POST request."""
        self._dispatch()

    def do_PUT(self) -> None:
        """Dispatch a PUT request (always 404)."""
        self._dispatch()

    def do_DELETE(self) -> None:
        """Dispatch a DELETE request (always 404)."""
        self._dispatch()

    def do_PATCH(self) -> None:
        """Dispatch a PATCH request (always 404)."""
        self._dispatch()

    def do_HEAD(self) -> None:
        """Dispatch a HEAD request (always 404)."""
        self._dispatch()

    def do_OPTIONS(self) -> None:
        """Dispatch an OPTIONS request (always 404)."""
        self._dispatch()

    def _dispatch(self) -> None:
        self._started_ns = time.perf_counter_ns()
        fake = self._fake
        method = self.command
        path = urlsplit(self.path).path
        try:
            # Read the body even when failing, or its bytes would be parsed as the next
            # request on this keep-alive connection.
            self._body = self._read_body()
        except _HTTPError as exc:
            self.close_connection = True
            self._send_json(exc.status, {"error": exc.message})
            return
        fake._record_request(method, path)
        fail_with, delay_s = fake._fault()
        if delay_s > 0 and fake._stopping.wait(delay_s):
            self.close_connection = True
            return
        if fail_with is not None:
            self._send_json(fail_with, {"error": "injected"})
            return
        garbled = fake._garbled(path)
        if garbled is not None:
            self._send_bytes(200, garbled)
            return
        route = _ROUTES.get((method, path))
        if route is None:
            self._send_json(404, {"error": f"{method} {path} not found"})
            return
        try:
            route(self)
        except _HTTPError as exc:
            self._send_json(exc.status, {"error": exc.message})

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            size = int(length)
        except ValueError:
            raise _HTTPError(400, "invalid Content-Length") from None
        if size < 0:
            raise _HTTPError(400, "invalid Content-Length")
        return self.rfile.read(size)

    def _read_chunked_body(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            line = self.rfile.readline(_MAX_LINE)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _HTTPError(400, "malformed chunked request body") from None
            if size == 0:
                while self.rfile.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline(_MAX_LINE)

    def _json_body(self) -> JSONObject:
        if not self._body.strip():
            raise _HTTPError(400, "missing request body")
        try:
            payload = json.loads(self._body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _HTTPError(400, f"invalid JSON body: {exc}") from None
        if not isinstance(payload, dict):
            raise _HTTPError(400, "request body must be a JSON object")
        return payload

    def _send_json(self, status: int, payload: JSONObject) -> None:
        self._send_bytes(status, json.dumps(payload, ensure_ascii=False, separators=(",", ":")))

    def _send_bytes(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_ndjson(self, lines: Sequence[JSONObject]) -> None:
        # HTTP/1.0 clients cannot read chunked encoding; for them the end of the stream is
        # marked by closing the connection instead.
        chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()
        for line in lines:
            data = json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
            if chunked:
                data = f"{len(data):X}\r\n".encode() + data + b"\r\n"
            # One write and flush per line, so clients really receive a stream of chunks.
            self.wfile.write(data)
            self.wfile.flush()
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def _elapsed_ns(self) -> int:
        return time.perf_counter_ns() - self._started_ns

    def _tags(self) -> None:
        self._send_json(200, {"models": self._fake._disk_entries()})

    def _ps(self) -> None:
        self._send_json(200, {"models": self._fake._memory_entries()})

    def _version(self) -> None:
        self._send_json(200, {"version": OLLAMA_VERSION})

    def _health(self) -> None:
        self._send_json(200, {"status": "ok", "models": self._fake._disk_names()})

    def _generate(self) -> None:
        fake = self._fake
        payload = self._json_body()
        model = _required_model(payload)
        fake._record_model("/api/generate", model)
        prompt = payload.get("prompt") or ""
        if not isinstance(prompt, str):
            raise _HTTPError(400, '"prompt" must be a string')
        images = self._images(payload)
        stream = _optional_bool(payload, "stream", default=True)
        raw = _optional_bool(payload, "raw", default=False)
        disk_name = fake._resolve(model)
        if disk_name is None:
            raise _not_found(model)

        # Like Ollama, an empty prompt only loads (or, with keep_alive 0, unloads) the model
        # and answers with a single plain JSON object even when streaming.
        if not prompt:
            if _is_zero_keep_alive(payload.get("keep_alive")):
                fake._unload(disk_name)
                reason = "unload"
            else:
                fake._load(disk_name)
                reason = "load"
            self._send_json(
                200,
                {
                    "model": model,
                    "created_at": _now_iso(),
                    "response": "",
                    "done": True,
                    "done_reason": reason,
                },
            )
            return

        load_ns, simulated_ns = fake._load(disk_name)
        text = f"[{fake.name}] {model}: {prompt}"
        if images:
            text += f" images={len(images)}"
        # Whitespace stays attached to the following token, as with real tokenizers, so
        # joining the streamed chunks reproduces the text exactly.
        tokens = re.findall(r"\s*\S+|\s+$", text)
        prompt_eval_count = max(1, _word_count(prompt) + len(images))
        eval_count = len(tokens)
        prompt_eval_ns = prompt_eval_count * _PROMPT_NS_PER_TOKEN
        eval_ns = eval_count * _EVAL_NS_PER_TOKEN
        if _is_zero_keep_alive(payload.get("keep_alive")):
            fake._unload(disk_name)
        # Built before the final object so that timestamps increase along the stream.
        chunks: list[JSONObject] = [
            {"model": model, "created_at": _now_iso(), "response": token, "done": False}
            for token in tokens
        ]
        final: JSONObject = {
            "model": model,
            "created_at": _now_iso(),
            "response": "" if stream else text,
            "done": True,
            "done_reason": "stop",
        }
        if not raw:
            final["context"] = list(range(1, prompt_eval_count + eval_count + 1))
        final.update(
            {
                # Wall-clock time plus the simulated token time, so the total is never less
                # than the sum of its parts.
                "total_duration": self._elapsed_ns() + simulated_ns + prompt_eval_ns + eval_ns,
                "load_duration": load_ns,
                "prompt_eval_count": prompt_eval_count,
                "prompt_eval_duration": prompt_eval_ns,
                "eval_count": eval_count,
                "eval_duration": eval_ns,
            }
        )
        if not stream:
            self._send_json(200, final)
            return
        self._send_ndjson([*chunks, final])

    @staticmethod
    def _images(payload: JSONObject) -> list[str]:
        images = payload.get("images") or []
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise _HTTPError(400, '"images" must be a list of base64 strings')
        for index, image in enumerate(images):
            # Ollama decodes images while parsing the request, so bad base64 is a 400.
            try:
                base64.b64decode(image, validate=True)
            except (binascii.Error, ValueError):
                raise _HTTPError(400, f"illegal base64 data in image {index}") from None
        return cast(list[str], images)

    def _embed(self) -> None:
        fake = self._fake
        payload = self._json_body()
        model = _required_model(payload)
        fake._record_model("/api/embed", model)
        raw_input = payload.get("input")
        if raw_input is None:
            texts: list[str] = []
        elif isinstance(raw_input, str):
            texts = [raw_input]
        elif isinstance(raw_input, list) and all(isinstance(t, str) for t in raw_input):
            texts = cast(list[str], raw_input)
        else:
            raise _HTTPError(400, "invalid input type")
        disk_name = fake._resolve(model)
        if disk_name is None:
            raise _not_found(model)
        load_ns, simulated_ns = fake._load(disk_name)
        self._send_json(
            200,
            {
                "model": model,
                "embeddings": [_embedding(text, fake.embedding_dim) for text in texts],
                "total_duration": self._elapsed_ns() + simulated_ns,
                "load_duration": load_ns,
                "prompt_eval_count": sum(_word_count(text) for text in texts),
            },
        )

    def _pull(self) -> None:
        fake = self._fake
        payload = self._json_body()
        model = _required_model(payload)
        stream = _optional_bool(payload, "stream", default=True)
        fake._add_to_disk(model)
        if not stream:
            self._send_json(200, {"status": "success"})
            return
        entry = _model_entry(model)
        digest = f"sha256:{entry['digest']}"
        total = entry["size"]
        self._send_ndjson(
            [
                {"status": "pulling manifest"},
                {"status": f"downloading {digest}", "digest": digest, "total": total},
                {
                    "status": f"downloading {digest}",
                    "digest": digest,
                    "total": total,
                    "completed": total,
                },
                {"status": "verifying sha256 digest"},
                {"status": "writing manifest"},
                {"status": "removing any unused layers"},
                {"status": "success"},
            ]
        )


_ROUTES: Final[dict[tuple[str, str], Callable[[_Handler], None]]] = {
    ("GET", "/api/tags"): _Handler._tags,
    ("GET", "/api/ps"): _Handler._ps,
    ("GET", "/api/version"): _Handler._version,
    ("GET", "/health"): _Handler._health,
    ("POST", "/api/generate"): _Handler._generate,
    ("POST", "/api/embed"): _Handler._embed,
    ("POST", "/api/pull"): _Handler._pull,
}


@dataclass(eq=False)
class SimulatedModelServer:
    """An in-process fake Ollama server with fault injection and request counters.

    ``models_on_disk`` are the pulled models (listed by ``/api/tags``); ``models_in_memory``
    are the loaded ones (listed by ``/api/ps``) and must also be on disk. Names without a tag
    match requests for ``name:latest`` and vice versa. The lists are copied; after ``start()``
    change them only through the HTTP API, and read them through :meth:`loaded_models`.

    A model that is on disk but not loaded is loaded by its first generate/embed request,
    which then takes ``load_delay_s`` extra seconds and reports it as ``load_duration``, plus
    ``size / load_bps`` simulated seconds when ``load_bps`` is set. With ``max_loaded``, a
    load that finds that many models in memory first evicts the least recently used one.
    """

    name: str
    models_on_disk: list[str]
    models_in_memory: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    load_delay_s: float = 0.0
    embedding_dim: int = 8
    max_loaded: int | None = None
    load_bps: float | None = None

    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _fail_with: int | None = field(default=None, init=False, repr=False)
    _delay_s: float = field(default=0.0, init=False, repr=False)
    _garbled_bodies: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _counts: Counter[tuple[str, str]] = field(default_factory=Counter, init=False, repr=False)
    _requested: list[tuple[str, str]] = field(default_factory=list, init=False, repr=False)
    _modified_at: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    # Unix microseconds, distinct and increasing with each use: they order /api/ps and
    # choose the victim of an eviction, so two uses never tie.
    _expires_us: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _last_expiry_us: int = field(default=0, init=False, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _httpd: _Server | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ValueError("embedding_dim must be at least 1")
        if self.load_delay_s < 0:
            raise ValueError("load_delay_s must not be negative")
        if self.max_loaded is not None and self.max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {self.max_loaded!r}")
        if self.load_bps is not None and not (math.isfinite(self.load_bps) and self.load_bps > 0):
            raise ValueError(f"load_bps must be a positive number, got {self.load_bps!r}")
        self.models_on_disk = list(dict.fromkeys(self.models_on_disk))
        self.models_in_memory = list(dict.fromkeys(self.models_in_memory))
        on_disk = {_normalize(m) for m in self.models_on_disk}
        missing = [m for m in self.models_in_memory if _normalize(m) not in on_disk]
        if missing:
            raise ValueError(f"models in memory but not on disk: {', '.join(missing)}")
        if self.max_loaded is not None and len(self.models_in_memory) > self.max_loaded:
            raise ValueError(f"more models in memory than max_loaded={self.max_loaded!r}")
        now = _now_iso()
        self._modified_at = {_normalize(m): now for m in self.models_on_disk}
        # In list order: the first is the least recently used.
        for m in self.models_in_memory:
            self._expires_us[_normalize(m)] = self._next_expiry_us()

    def start(self) -> Self:
        """Start serving in a daemon thread and return ``self``.

        With ``port=0`` a free port is picked and stored in ``self.port``, so a stopped
        server can be started again on the same port (to simulate a restart).
        """
        with self._lock:
            if self._httpd is not None:
                raise RuntimeError(f"fake model server {self.name!r} is already running")
            self._stopping = threading.Event()
            httpd = _Server((self.host, self.port), self)
            self.port = int(httpd.server_address[1])
            thread = threading.Thread(
                target=httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"fake-model-server-{self.name}",
                daemon=True,
            )
            self._httpd, self._thread = httpd, thread
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the listening socket and open connections; idempotent.

        Requests sleeping in an injected delay are abandoned without an answer.
        """
        with self._lock:
            httpd, thread = self._httpd, self._thread
            self._httpd = self._thread = None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def set_fault(self, fail_with: int | None = None, delay_s: float = 0.0) -> None:
        """Inject faults into every following request; ``set_fault()`` clears them.

        ``delay_s`` seconds are slept before answering; then, if ``fail_with`` is set, the
        request is answered with that HTTP status and ``{"error": "injected"}``.
        """
        if fail_with is not None and not 400 <= fail_with <= 599:
            raise ValueError("fail_with must be an HTTP error status (400-599)")
        if delay_s < 0:
            raise ValueError("delay_s must not be negative")
        with self._lock:
            self._fail_with = fail_with
            self._delay_s = delay_s

    def garble(self, path: str, body: str | None) -> None:
        """Answer requests for ``path`` with ``body`` (HTTP 200, as JSON) instead of the
        simulated answer, to test clients against a broken server; ``None`` restores it."""
        with self._lock:
            if body is None:
                self._garbled_bodies.pop(path, None)
            else:
                self._garbled_bodies[path] = body

    def request_count(self, method: str, path: str) -> int:
        """How many requests were received for ``method`` and ``path`` (without query)."""
        with self._lock:
            return self._counts[(method.upper(), path)]

    def requested_models(self, path: str | None = None) -> list[str]:
        """Models named by generate/embed requests, in arrival order (unknown ones too).

        ``path`` (``"/api/generate"`` or ``"/api/embed"``) restricts the list to one endpoint.
        """
        with self._lock:
            return [model for p, model in self._requested if path is None or p == path]

    def loaded_models(self) -> list[str]:
        """Models currently in memory, spelled as in ``models_on_disk``."""
        with self._lock:
            return list(self.models_in_memory)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # Below: state access for the request handler, always under the lock.

    def _record_request(self, method: str, path: str) -> None:
        with self._lock:
            self._counts[(method, path)] += 1

    def _record_model(self, path: str, model: str) -> None:
        with self._lock:
            self._requested.append((path, model))

    def _fault(self) -> tuple[int | None, float]:
        with self._lock:
            return self._fail_with, self._delay_s

    def _garbled(self, path: str) -> str | None:
        with self._lock:
            return self._garbled_bodies.get(path)

    def _resolve(self, model: str) -> str | None:
        wanted = _normalize(model)
        with self._lock:
            return next((m for m in self.models_on_disk if _normalize(m) == wanted), None)

    def _next_expiry_us(self) -> int:
        # Under the lock (or before start): each use expires after every earlier one.
        now_us = int((time.time() + DEFAULT_KEEP_ALIVE_S) * 1_000_000)
        self._last_expiry_us = max(now_us, self._last_expiry_us + 1)
        return self._last_expiry_us

    def _load(self, disk_name: str) -> tuple[int, int]:
        """Load ``disk_name`` if needed; return the load time in nanoseconds and the part of
        it that was simulated (``size / load_bps``), not slept."""
        started = time.perf_counter_ns()
        with self._lock:
            loaded = disk_name in self.models_in_memory
        if not loaded and self.load_delay_s > 0:
            # Sleep outside the lock so other models keep answering meanwhile.
            self._stopping.wait(self.load_delay_s)
        simulated_ns = 0
        if not loaded and self.load_bps is not None:
            simulated_ns = int(_model_entry(disk_name)["size"] / self.load_bps * 1e9)
        with self._lock:
            if disk_name not in self.models_in_memory:
                while self.max_loaded is not None and len(self.models_in_memory) >= self.max_loaded:
                    victim = min(
                        self.models_in_memory, key=lambda m: self._expires_us[_normalize(m)]
                    )
                    self.models_in_memory.remove(victim)
                    del self._expires_us[_normalize(victim)]
                self.models_in_memory.append(disk_name)
            self._expires_us[_normalize(disk_name)] = self._next_expiry_us()
        return time.perf_counter_ns() - started + simulated_ns, simulated_ns

    def _unload(self, disk_name: str) -> None:
        with self._lock:
            if disk_name in self.models_in_memory:
                self.models_in_memory.remove(disk_name)
            self._expires_us.pop(_normalize(disk_name), None)

    def _add_to_disk(self, model: str) -> None:
        wanted = _normalize(model)
        with self._lock:
            if all(_normalize(m) != wanted for m in self.models_on_disk):
                self.models_on_disk.append(model)
            self._modified_at[wanted] = _now_iso()

    def _disk_names(self) -> list[str]:
        with self._lock:
            return list(self.models_on_disk)

    def _disk_entries(self) -> list[JSONObject]:
        with self._lock:
            names = list(self.models_on_disk)
            modified = dict(self._modified_at)
        entries = []
        for name in names:
            entry = _model_entry(name)
            entries.append({**entry, "modified_at": modified.get(_normalize(name), _now_iso())})
        return entries

    def _memory_entries(self) -> list[JSONObject]:
        with self._lock:
            expires = {m: self._expires_us[_normalize(m)] for m in self.models_in_memory}
        entries = []
        # Ollama lists the longest time to expiry first: the most recently used.
        for name, expiry_us in sorted(expires.items(), key=lambda item: -item[1]):
            entry = _model_entry(name)
            entry["expires_at"] = _iso_us(expiry_us)
            entry["size_vram"] = entry["size"]
            entries.append(entry)
        return entries


def _split_names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Run a fake model server until SIGTERM/SIGINT; print ``READY <url>`` once listening."""
    parser = argparse.ArgumentParser(description="Fake Ollama model server for tests.")
    parser.add_argument("--name", required=True, help="server name echoed in responses")
    parser.add_argument("--models", default="", help="comma-separated models on disk")
    parser.add_argument("--loaded", default="", help="comma-separated models in memory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--load-delay", type=float, default=0.0, help="model load seconds")
    parser.add_argument(
        "--load-bps", type=float, default=None, help="simulated load bandwidth (bytes/s)"
    )
    parser.add_argument(
        "--max-loaded", type=int, default=None, help="models in memory at most (LRU evicted)"
    )
    parser.add_argument("--embedding-dim", type=int, default=8)
    parser.add_argument("--fail-with", type=int, default=None, help="inject this HTTP status")
    parser.add_argument("--delay", type=float, default=0.0, help="inject this delay (s)")
    args = parser.parse_args(argv)

    try:
        server = SimulatedModelServer(
            name=args.name,
            models_on_disk=_split_names(args.models),
            models_in_memory=_split_names(args.loaded),
            host=args.host,
            port=args.port,
            load_delay_s=args.load_delay,
            embedding_dim=args.embedding_dim,
            max_loaded=args.max_loaded,
            load_bps=args.load_bps,
        )
        server.set_fault(fail_with=args.fail_with, delay_s=args.delay)
    except ValueError as exc:
        parser.error(str(exc))

    stop_requested = threading.Event()

    def _request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    # Installed before READY is printed, so a parent may signal as soon as it reads it.
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    try:
        server.start()
    except OSError as exc:
        print(f"ERROR cannot listen on {server.url}: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        print(f"READY {server.url}", flush=True)
        stop_requested.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
