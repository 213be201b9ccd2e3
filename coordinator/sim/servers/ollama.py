"""A SIMULATED Ollama model server: no model runs here. For the demo and the tests.

It speaks the subset of Ollama's JSON API that this project relies on
(https://github.com/ollama/ollama/blob/main/docs/api.md):

* ``GET /api/tags``, ``GET /api/ps``, ``GET /api/version``
* ``POST /api/generate`` (NDJSON streaming when ``stream`` is missing or true, like Ollama)
* ``POST /api/embed`` (L2-normalised vectors: WordLlama's, real ones, see :mod:`.embeddings`)
* ``POST /api/pull`` (NDJSON status lines unless ``"stream": false``)

plus ``GET /health``, the health endpoint of this project's embedding and OCR services.

Generated text is deterministic and echoes its inputs (``"[server] model: prompt"``) so tests
and the demo can tell which server and model answered; embeddings are WordLlama's whatever
the model, so close texts are near (with ``embedding_dim``, hashes of the text of that size
instead). Token timings are simulated without sleeping, and so is a model load's
``size / load_bps``; only ``load_delay_s`` (model load) and the injected ``delay_s`` take real
wall-clock time. Models never expire from memory on their own; with ``max_loaded``
(Ollama's ``OLLAMA_MAX_LOADED_MODELS``) loading one more evicts the least recently used,
the one whose ``expires_at`` in ``/api/ps`` is earliest.

Use it in-process::

    with SimulatedModelServer("gpu-a", ["llama3.2"]) as server:
        httpx.post(f"{server.url}/api/generate", json={...})

or as a process (for worker subprocesses)::

    python -m coordinator.sim.servers.ollama --name gpu-a --models llama3.2,llava --loaded llama3.2

which prints ``READY <url>`` once listening and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import cast

from fastapi import APIRouter, FastAPI, Request, Response
from starlette.exceptions import HTTPException

from coordinator.sim.servers.base import SimulatedServer
from coordinator.sim.servers.embeddings import vectors
from coordinator.sim.servers.harness import (
    Harness,
    JSONObject,
    elapsed_ns,
    json_response,
    ndjson_response,
)
from coordinator.sim.servers.model_memory import (
    ModelMemory,
    canonical_name,
    model_digest,
    model_size,
)
from coordinator.sim.servers.ollama_payloads import (
    OLLAMA_VERSION,
    OllamaError,
    embed_inputs,
    generate_timings,
    images,
    is_zero_keep_alive,
    iso,
    iso_us,
    json_body,
    not_found,
    optional_bool,
    pull_progress,
    required_model,
    tokens,
    word_count,
)

__all__ = ["OLLAMA_VERSION", "SimulatedModelServer", "main"]


def _model_entry(name: str) -> JSONObject:
    """Deterministic /api/tags-style metadata (without ``modified_at``) for ``name``."""
    full = canonical_name(name)
    size = model_size(name)
    base = full.rsplit("/", 1)[-1].split(":", 1)[0]
    match = re.match(r"[a-z]+", base.lower())
    family = match.group(0) if match else "llama"
    # Q4_K_M is roughly 0.6 bytes per parameter.
    parameter_size = f"{size / 0.6e9:.1f}B"
    return {
        "name": full,
        "model": full,
        "size": size,
        "digest": model_digest(name),
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": parameter_size,
            "quantization_level": "Q4_K_M",
        },
    }


def _server(request: Request) -> SimulatedModelServer:
    return cast(SimulatedModelServer, request.app.state.server)


_router = APIRouter()


@_router.get("/api/tags")
async def _tags(request: Request) -> Response:
    models = [
        {**_model_entry(m.name), "modified_at": iso(m.modified_s)}
        for m in _server(request)._memory.on_disk()
    ]
    return json_response(200, {"models": models})


@_router.get("/api/ps")
async def _ps(request: Request) -> Response:
    models = []
    for loaded in _server(request)._memory.loaded():
        entry = _model_entry(loaded.name)
        entry["expires_at"] = iso_us(loaded.expires_us)
        entry["size_vram"] = entry["size"]
        models.append(entry)
    return json_response(200, {"models": models})


@_router.get("/api/version")
async def _version() -> Response:
    return json_response(200, {"version": OLLAMA_VERSION})


@_router.get("/health")
async def _health(request: Request) -> Response:
    names = _server(request)._memory.disk_names()
    return json_response(200, {"status": "ok", "models": names})


@_router.post("/api/generate")
async def _generate(request: Request) -> Response:
    server = _server(request)
    payload = await json_body(request)
    model = required_model(payload)
    server._harness.record_model("/api/generate", model)
    prompt = payload.get("prompt") or ""
    if not isinstance(prompt, str):
        raise OllamaError(400, '"prompt" must be a string')
    server.prompts[prompt] += 1
    attached = images(payload)
    stream = optional_bool(payload, "stream", default=True)
    raw = optional_bool(payload, "raw", default=False)
    disk_name = server._memory.resolve(model)
    if disk_name is None:
        raise not_found(model)
    unload = is_zero_keep_alive(payload.get("keep_alive"))

    # Like Ollama, an empty prompt only loads (or, with keep_alive 0, unloads) the model
    # and answers with a single plain JSON object even when streaming.
    if not prompt:
        if unload:
            server._memory.unload(disk_name)
        else:
            await server._load(disk_name)
        done = {"model": model, "created_at": iso(time.time()), "response": "", "done": True}
        return json_response(200, {**done, "done_reason": "unload" if unload else "load"})

    load_ns, simulated_ns = await server._load(disk_name)
    if unload:
        server._memory.unload(disk_name)
    text = f"[{server.name}] {model}: {prompt}"
    if attached:
        text += f" images={len(attached)}"
    chunks = tokens(text)
    # Built before the final object so that timestamps increase along the stream.
    lines: list[JSONObject] = [
        {"model": model, "created_at": iso(time.time()), "response": chunk, "done": False}
        for chunk in chunks
    ]
    final: JSONObject = {
        "model": model,
        "created_at": iso(time.time()),
        "response": "" if stream else text,
        "done": True,
        "done_reason": "stop",
    }
    prompt_tokens = max(1, word_count(prompt) + len(attached))
    if not raw:
        final["context"] = list(range(1, prompt_tokens + len(chunks) + 1))
    times = generate_timings(elapsed_ns(request), load_ns, simulated_ns, prompt_tokens, len(chunks))
    final.update(times)
    return ndjson_response([*lines, final]) if stream else json_response(200, final)


@_router.post("/api/embed")
async def _embed(request: Request) -> Response:
    server = _server(request)
    payload = await json_body(request)
    model = required_model(payload)
    server._harness.record_model("/api/embed", model)
    texts = embed_inputs(payload)
    disk_name = server._memory.resolve(model)
    if disk_name is None:
        raise not_found(model)
    load_ns, simulated_ns = await server._load(disk_name)
    return json_response(
        200,
        {
            "model": model,
            "embeddings": vectors(texts, server.embedding_dim),
            "total_duration": elapsed_ns(request) + simulated_ns,
            "load_duration": load_ns,
            "prompt_eval_count": sum(word_count(text) for text in texts),
        },
    )


@_router.post("/api/pull")
async def _pull(request: Request) -> Response:
    payload = await json_body(request)
    model = required_model(payload)
    stream = optional_bool(payload, "stream", default=True)
    library = _server(request).library
    if library is not None and model not in library:
        # Ollama's answer: in-band after HTTP 200 when streaming, else a 500.
        missing = {"error": "pull model manifest: file does not exist"}
        if stream:
            return ndjson_response([{"status": "pulling manifest"}, missing])
        return json_response(500, missing)
    _server(request)._memory.add_to_disk(model)
    if not stream:
        return json_response(200, {"status": "success"})
    return ndjson_response(pull_progress(model))


async def _on_error(request: Request, exc: Exception) -> Response:
    error = cast(OllamaError, exc)
    return json_response(error.status, {"error": error.message})


async def _on_unknown_route(request: Request, exc: Exception) -> Response:
    # The router's 405 (a known path, another method) too: the routes are keyed by method
    # and path together, and the old http.server answered both with this 404.
    return json_response(404, {"error": f"{request.method} {request.scope['path']} not found"})


@dataclass(eq=False)
class SimulatedModelServer(SimulatedServer):
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
    embedding_dim: int | None = None
    """None: WordLlama's vectors; a size: hash vectors of that size."""
    max_loaded: int | None = None
    load_bps: float | None = None
    library: frozenset[str] | None = None
    """The models a pull finds (Ollama's library); ``None``: any name."""
    prompts: Counter[str] = field(default_factory=Counter, init=False, repr=False)
    """How often each prompt was generated for (a benchmark counts tasks run twice)."""

    _memory: ModelMemory = field(init=False, repr=False)
    _harness: Harness = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.embedding_dim is not None and self.embedding_dim < 1:
            raise ValueError("embedding_dim must be at least 1")
        if self.load_delay_s < 0:
            raise ValueError("load_delay_s must not be negative")
        # Copied, then kept current by the memory: the attributes show the live state.
        self.models_on_disk = list(self.models_on_disk)
        self.models_in_memory = list(self.models_in_memory)
        self._memory = ModelMemory(
            self.models_on_disk,
            self.models_in_memory,
            max_loaded=self.max_loaded,
            load_bps=self.load_bps,
        )
        self._harness = Harness(self.name, server_header=f"FakeOllama/{OLLAMA_VERSION}")

    def loaded_models(self) -> list[str]:
        """Models currently in memory, spelled as in ``models_on_disk``."""
        return self._memory.loaded_names()

    def _build_app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=False)
        app.state.server = self
        app.include_router(_router)
        app.add_exception_handler(OllamaError, _on_error)
        app.add_exception_handler(HTTPException, _on_unknown_route)
        return app

    async def _load(self, disk_name: str) -> tuple[int, int]:
        """Load ``disk_name`` if needed; return the load time in nanoseconds and the part of
        it that was simulated (``size / load_bps``), not slept."""
        started = time.perf_counter_ns()
        loaded = self._memory.is_loaded(disk_name)
        if not loaded and self.load_delay_s > 0:
            # Awaited, so that requests for other models keep being answered meanwhile.
            await self._harness.pause(self.load_delay_s)
        simulated_ns = 0 if loaded else self._memory.load_time_ns(disk_name)
        self._memory.use(disk_name)
        return time.perf_counter_ns() - started + simulated_ns, simulated_ns


def _split_names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _parser() -> argparse.ArgumentParser:
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
    parser.add_argument(
        "--embedding-dim", type=int, default=None, help="hash vectors of this size, not WordLlama's"
    )
    parser.add_argument("--fail-with", type=int, default=None, help="inject this HTTP status")
    parser.add_argument("--delay", type=float, default=0.0, help="inject this delay (s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a fake model server until SIGTERM/SIGINT; print ``READY <url>`` once listening."""
    parser = _parser()
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
