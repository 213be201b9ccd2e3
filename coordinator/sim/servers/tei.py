"""A SIMULATED Hugging Face text-embeddings-inference server: one model, whose vectors are
real ones, WordLlama's (:mod:`.embeddings`), whatever ``model_id`` it is given. For the
demo and the tests.

Routes (https://huggingface.github.io/text-embeddings-inference/, and TEI's router source
for what the OpenAPI page leaves out):

* ``GET /info``: ``{"model_id", "model_sha", "model_dtype", "model_type": {"embedding":
  {"pooling": "mean"}}, "max_concurrent_requests", "max_input_length", "max_batch_tokens",
  "max_client_batch_size", "auto_truncate", "tokenization_workers", "version", ...}``
* ``POST /embed``: ``{"inputs": str | [str], "normalize": bool = true, "truncate": bool |
  null = auto_truncate, "truncation_direction": "Right" | "Left", "prompt_name": str |
  null}`` -> ``[[float, ...], ...]``
* ``GET /health`` (200, empty) and ``GET /metrics`` (``te_queue_size``, ``te_request_count``)

Errors are TEI's ``{"error": str, "error_type": str}``, the type spelled as TEI's serde
writes its enum: an empty batch is 400 ``Empty``; too many inputs, an empty input, an
input over ``max_input_length`` tokens without ``truncate``, or a ``prompt_name`` (this
model has no prompts) are 413 ``Validation``. A body that is not such an object is 422.

``queue_size`` is what a test sets: requests of other clients waiting in TEI's queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Self, cast

from fastapi import APIRouter, FastAPI, Request, Response

from coordinator.sim.servers import embeddings
from coordinator.sim.servers.base import SimulatedServer
from coordinator.sim.servers.harness import Harness, JSONObject, json_response

TEI_VERSION: Final = "1.8.0"
MAX_CLIENT_BATCH: Final = 32
MAX_INPUT_LENGTH: Final = 512
_router = APIRouter()


def _server(request: Request) -> SimulatedTEIServer:
    return cast(SimulatedTEIServer, request.app.state.server)


class _TEIError(Exception):
    """Answered with TEI's error body."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def _validation(message: str) -> _TEIError:
    return _TEIError(413, "Validation", message)


@dataclass(frozen=True)
class _EmbedRequest:
    texts: list[str]
    normalize: bool
    truncate: bool
    from_left: bool
    """Truncation drops the first tokens rather than the last."""


def _parse(body: object, auto_truncate: bool) -> _EmbedRequest:
    """An ``/embed`` body, checked as TEI's deserializer and batch checks do."""
    if not isinstance(body, dict):
        raise _TEIError(422, "Validation", "the body must be a JSON object")
    inputs = body.get("inputs")
    texts = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise _TEIError(422, "Validation", "`inputs` must be a string or a list of strings")
    normalize = body.get("normalize", True)
    truncate = body.get("truncate")
    direction = body.get("truncation_direction", "Right")
    prompt_name = body.get("prompt_name")
    if not isinstance(normalize, bool) or not isinstance(truncate, bool | None):
        raise _TEIError(422, "Validation", "`normalize` and `truncate` must be booleans")
    if direction not in ("Left", "Right"):
        raise _TEIError(422, "Validation", "`truncation_direction` must be Left or Right")
    if not texts:
        raise _TEIError(400, "Empty", "`inputs` cannot be empty")
    if len(texts) > MAX_CLIENT_BATCH:
        size = len(texts)
        raise _validation(f"batch size {size} > maximum allowed batch size {MAX_CLIENT_BATCH}")
    if prompt_name is not None:
        raise _validation(
            f"`default-prompt-name` is set to `{prompt_name}` but no prompts were found in "
            "the Sentence Transformers configuration"
        )
    chosen = auto_truncate if truncate is None else truncate
    return _EmbedRequest(cast(list[str], texts), normalize, chosen, direction == "Left")


def _embed_one(text: str, request: _EmbedRequest) -> list[float]:
    if not text:
        raise _validation("`inputs` cannot be empty")
    ids = embeddings.tokens(text)
    if len(ids) > MAX_INPUT_LENGTH:
        if not request.truncate:
            given = len(ids)
            raise _validation(
                f"`inputs` must have less than {MAX_INPUT_LENGTH} tokens. Given: {given}"
            )
        ids = ids[-MAX_INPUT_LENGTH:] if request.from_left else ids[:MAX_INPUT_LENGTH]
    return embeddings.vector(ids, normalize=request.normalize)


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
            "max_input_length": MAX_INPUT_LENGTH,
            "max_batch_tokens": 16384,
            "max_batch_requests": None,
            "max_client_batch_size": MAX_CLIENT_BATCH,
            "auto_truncate": server.auto_truncate,
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
        return _error(_TEIError(422, "Validation", "Failed to parse the request body as JSON"))
    try:
        parsed = _parse(body, server.auto_truncate)
        vectors = [_embed_one(text, parsed) for text in parsed.texts]
    except _TEIError as error:
        return _error(error)
    server._harness.record_model("/embed", server.model_id)
    server.requests += 1
    return json_response(200, vectors)


def _error(error: _TEIError) -> Response:
    body: JSONObject = {"error": error.message, "error_type": error.error_type}
    return json_response(error.status, body)


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
    """An in-process fake TEI serving ``model_id``, with WordLlama's vectors."""

    name: str
    model_id: str
    host: str = "127.0.0.1"
    port: int = 0
    queue_size: int = 0
    auto_truncate: bool = False
    requests: int = 0
    _harness: Harness = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._harness = Harness(
            self.name,
            server_header=f"text-embeddings-inference/{TEI_VERSION}",
            error_body=lambda message: {"error": message, "error_type": "Backend"},
        )

    def start(self) -> Self:
        # TEI reads its model before it listens; so does this one, so that its first
        # request is not the one that waits for it.
        embeddings.load()
        return super().start()

    def embed(self, text: str) -> list[float]:
        """The vector ``/embed`` answers for ``text`` by default: WordLlama's, unit length."""
        return embeddings.embed([text])[0]

    def _build_app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=False)
        app.state.server = self
        app.include_router(_router)
        return app
