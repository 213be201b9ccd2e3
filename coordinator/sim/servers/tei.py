"""A SIMULATED Hugging Face text-embeddings-inference server: one model, hash embeddings.
For the demo and the tests.

Routes (https://huggingface.github.io/text-embeddings-inference/):

* ``GET /info``: ``{"model_id", "model_sha", "model_dtype", "model_type": {"embedding":
  {"pooling": "mean"}}, "max_concurrent_requests", "max_input_length", "max_batch_tokens",
  "max_client_batch_size", "tokenization_workers", "version"}``
* ``POST /embed``: ``{"inputs": str | [str], "normalize": bool, "truncate": bool}`` ->
  ``[[float, ...], ...]``; a bad body is TEI's 422 ``{"error", "error_type": "Validation"}``
* ``GET /health`` (200, empty) and ``GET /metrics`` (``te_queue_size``, ``te_request_count``)

``queue_size`` is what a test sets: requests of other clients waiting in TEI's queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from fastapi import APIRouter, FastAPI, Request, Response

from coordinator.sim.servers.base import SimulatedServer
from coordinator.sim.servers.harness import Harness, json_response
from coordinator.sim.servers.ollama_payloads import embedding

TEI_VERSION = "1.8.0"
MAX_CLIENT_BATCH = 32
_router = APIRouter()


def _server(request: Request) -> SimulatedTEIServer:
    return cast(SimulatedTEIServer, request.app.state.server)


def _invalid(message: str) -> Response:
    return json_response(422, {"error": message, "error_type": "Validation"})


@_router.get("/info")
async def _info(request: Request) -> Response:
    server = _server(request)
    return json_response(
        200,
        {
            "model_id": server.model_id,
            "model_sha": None,
            "model_dtype": "float32",
            "model_type": {"embedding": {"pooling": "mean"}},
            "max_concurrent_requests": 512,
            "max_input_length": 512,
            "max_batch_tokens": 16384,
            "max_batch_requests": None,
            "max_client_batch_size": MAX_CLIENT_BATCH,
            "auto_truncate": False,
            "tokenization_workers": 2,
            "version": TEI_VERSION,
            "sha": None,
            "docker_label": None,
        },
    )


@_router.post("/embed")
async def _embed(request: Request) -> Response:
    server = _server(request)
    try:
        body = await request.json()
    except ValueError:
        return _invalid("Failed to parse the request body as JSON")
    inputs = body.get("inputs") if isinstance(body, dict) else None
    texts = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return _invalid("`inputs` must be a string or a non-empty list of strings")
    if len(texts) > MAX_CLIENT_BATCH:
        message = f"batch size {len(texts)} > maximum allowed batch size {MAX_CLIENT_BATCH}"
        return _invalid(message)
    server._harness.record_model("/embed", server.model_id)
    server.requests += 1
    return json_response(200, [server.embed(text) for text in texts])


@_router.get("/health")
async def _health() -> Response:
    return Response(status_code=200)


@_router.get("/metrics")
async def _metrics(request: Request) -> Response:
    server = _server(request)
    text = (
        "# TYPE te_queue_size gauge\n"
        f"te_queue_size {float(server.queue_size)}\n"
        "# TYPE te_request_count counter\n"
        f'te_request_count{{method="single"}} {float(server.requests)}\n'
    )
    return Response(text, media_type="text/plain; version=0.0.4")


@dataclass
class SimulatedTEIServer(SimulatedServer):
    """An in-process fake TEI serving ``model_id``."""

    name: str
    model_id: str
    host: str = "127.0.0.1"
    port: int = 0
    embedding_dim: int = 8
    queue_size: int = 0
    requests: int = 0
    _harness: Harness = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._harness = Harness(
            self.name,
            server_header=f"text-embeddings-inference/{TEI_VERSION}",
            error_body=lambda message: {"error": message, "error_type": "Backend"},
        )

    def embed(self, text: str) -> list[float]:
        """The vector for ``text``: a hash, stable and unit length, not semantic."""
        return embedding(text, self.embedding_dim)

    def _build_app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=False)
        app.state.server = self
        app.include_router(_router)
        return app
