"""A SIMULATED OpenAI-compatible server, as vLLM serves the API (or llama.cpp's
``llama-server`` with ``--metrics``): no language model runs here; embeddings are real
ones, WordLlama's (:mod:`.embeddings`). For the demo and the tests.

Routes (https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html):

* ``GET /v1/models``: ``{"object": "list", "data": [{"id", "object": "model", ...}]}``
* ``POST /v1/chat/completions``: text and ``image_url`` content parts, not streamed
* ``POST /v1/embeddings``: ``{"object": "list", "data": [{"object": "embedding",
  "index", "embedding"}], "model", "usage"}``
* ``GET /health`` (200, empty) and ``GET /metrics`` (Prometheus text: vLLM's
  ``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``;
  with ``flavour="llamacpp"`` llama-server's ``llamacpp:requests_processing``,
  ``llamacpp:requests_deferred``, ``llamacpp:kv_cache_usage_ratio``)

An unknown model is vLLM's 404 ``{"object": "error", "message": "The model `x` does not
exist.", "type": "NotFoundError", "param": null, "code": 404}``; with ``api_key`` a request
without ``Authorization: Bearer <key>`` is vLLM's 401 ``{"error": "Unauthorized"}``. The
load the metrics show is what a test sets (``waiting``, ``running``, ``kv_cache_usage``):
other clients' requests, which this fleet did not send.
"""

from __future__ import annotations

import hmac
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from fastapi import APIRouter, FastAPI, Request, Response
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from coordinator.sim.servers.base import SimulatedServer
from coordinator.sim.servers.embeddings import vectors
from coordinator.sim.servers.harness import Harness, JSONObject, json_response
from coordinator.sim.servers.ollama_payloads import word_count

_router = APIRouter()


def _error(status: int, message: str, kind: str) -> Response:
    body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return json_response(status, body)


def _server(request: Request) -> SimulatedOpenAIServer:
    return cast(SimulatedOpenAIServer, request.app.state.server)


async def _payload(request: Request) -> JSONObject | Response:
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "invalid JSON body", "BadRequestError")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object", "BadRequestError")
    server = _server(request)
    model = body.get("model")
    server._harness.record_model(request.url.path, str(model))
    if model not in server.models:
        return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
    return cast(JSONObject, body)


@_router.get("/v1/models")
async def _models(request: Request) -> Response:
    created = int(time.time())
    data = [
        {"id": m, "object": "model", "created": created, "owned_by": "vllm", "root": m}
        for m in _server(request).models
    ]
    return json_response(200, {"object": "list", "data": data})


def _text_of(content: Any) -> tuple[str, int]:
    """A message's text and how many images it carries."""
    if isinstance(content, str):
        return content, 0
    parts = content if isinstance(content, list) else []
    text = " ".join(
        p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text"
    )
    images = sum(1 for p in parts if isinstance(p, dict) and p.get("type") == "image_url")
    return text, images


@_router.post("/v1/chat/completions")
async def _chat(request: Request) -> Response:
    body = await _payload(request)
    if isinstance(body, Response):
        return body
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return _error(400, "messages must be a non-empty list", "BadRequestError")
    prompt, images = _text_of(messages[-1].get("content"))
    text = f"[{_server(request).name}] {body['model']}: {prompt}"
    if images:
        text += f" images={images}"
    prompt_tokens = word_count(prompt) + images
    return json_response(
        200,
        {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": word_count(text),
                "total_tokens": prompt_tokens + word_count(text),
            },
        },
    )


@_router.post("/v1/embeddings")
async def _embeddings(request: Request) -> Response:
    body = await _payload(request)
    if isinstance(body, Response):
        return body
    given = body.get("input")
    texts = [given] if isinstance(given, str) else given
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return _error(400, "input must be a string or a list of strings", "BadRequestError")
    found = vectors(texts, _server(request).embedding_dim)
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(found)]
    tokens = sum(word_count(t) for t in texts)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return json_response(
        200, {"object": "list", "data": data, "model": body["model"], "usage": usage}
    )


@_router.get("/health")
async def _health() -> Response:
    return Response(status_code=200)


@_router.get("/metrics")
async def _metrics(request: Request) -> Response:
    return Response(_server(request).metrics_text(), media_type="text/plain; version=0.0.4")


class _ApiKey(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        key = _server(request).api_key
        if key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {key}".encode()):
                return json_response(401, {"error": "Unauthorized"})
        return await call_next(request)


@dataclass
class SimulatedOpenAIServer(SimulatedServer):
    """An in-process fake OpenAI-compatible server serving ``models`` (all in memory)."""

    name: str
    models: list[str]
    host: str = "127.0.0.1"
    port: int = 0
    embedding_dim: int | None = None
    """None: WordLlama's vectors (:mod:`.embeddings`); a size: hash vectors of that size."""
    api_key: str | None = None
    flavour: Literal["vllm", "llamacpp"] = "vllm"
    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0
    _harness: Harness = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.models = list(self.models)
        self._harness = Harness(
            self.name,
            server_header="uvicorn",
            error_body=lambda message: {
                "object": "error",
                "message": message,
                "type": "InternalServerError",
                "param": None,
                "code": 500,
            },
        )

    def metrics_text(self) -> str:
        """``/metrics`` as the flavour's server writes it, one series per model."""
        if self.flavour == "llamacpp":
            gauges = [
                ("llamacpp:requests_processing", self.running),
                ("llamacpp:requests_deferred", self.waiting),
                ("llamacpp:kv_cache_usage_ratio", self.kv_cache_usage),
            ]
            lines = [f"# TYPE {n} gauge\n{n} {float(v)}" for n, v in gauges]
            return "\n".join(lines) + "\n"
        gauges = [
            ("vllm:num_requests_running", self.running),
            ("vllm:num_requests_waiting", self.waiting),
            ("vllm:kv_cache_usage_perc", self.kv_cache_usage),
        ]
        out = []
        for metric, value in gauges:
            out.append(f"# HELP {metric} {metric}.\n# TYPE {metric} gauge")
            out += [
                f'{metric}{{engine="0",model_name="{m}"}} {float(value)}' for m in self.models[:1]
            ]
        return "\n".join(out) + "\n"

    def _build_app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=False)
        app.state.server = self
        app.include_router(_router)
        app.add_middleware(_ApiKey)
        return app
