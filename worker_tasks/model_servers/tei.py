"""Hugging Face text-embeddings-inference: ``GET /info`` (``model_id``), ``POST /embed``,
``GET /health``, ``GET /metrics`` (``te_queue_size``).

A TEI server serves the one model it was started with; a request for another is refused
here as the model not found, so the task is routed to a worker that has it. Texts go in
batches of the server's ``max_client_batch_size`` (TEI refuses more with 413), truncated to
the model's length as Ollama's ``/api/embed`` does by default.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

import httpx

from coordinator.core.errors import ModelNotFoundError, ServiceError
from coordinator.core.settings import Endpoint
from coordinator.core.task_spec import normalize_model
from worker_tasks.model_servers.base import Backend, ServerState, down, names
from worker_tasks.model_servers.http import request_json, request_object, vectors
from worker_tasks.model_servers.server_metrics import fetch_load

DEFAULT_BATCH: Final = 32
"""TEI's default ``--max-client-batch-size``, for a server whose ``/info`` omits it."""


class TEIBackend(Backend):
    """One embedding model, always in memory; its queue from ``/metrics``."""

    api: ClassVar[str] = "tei"

    def __init__(self) -> None:
        self._served: dict[str, tuple[str, int]] = {}
        """URL -> the model it served at the last look and its batch limit: a task need not
        ask again."""

    def detect(self, client: httpx.Client, url: str) -> bool:
        answer = client.get(f"{url}/info")
        body = answer.json() if answer.status_code == 200 else None
        return isinstance(body, dict) and "model_id" in body

    def served_model(self, client: httpx.Client, endpoint: Endpoint) -> tuple[str, int]:
        """The ``model_id`` in ``/info``, and its ``max_client_batch_size``."""
        url = f"{endpoint.url}/info"
        info = request_object(client, "GET", url, api_key=endpoint.api_key)
        model = names([info.get("model_id")])
        if not model:
            raise ServiceError(url, "no model_id in /info")
        batch = info.get("max_client_batch_size")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            batch = DEFAULT_BATCH
        self._served[endpoint.url] = served = (model[0], batch)
        return served

    def probe(self, client: httpx.Client, endpoint: Endpoint) -> ServerState:
        try:
            model, _ = self.served_model(client, endpoint)
        except ServiceError as exc:
            return down(exc)
        load = fetch_load(client, endpoint.url, endpoint.api_key)
        return ServerState(True, self.api, (model,), (model,), load=load)

    def embed(
        self, client: httpx.Client, endpoint: Endpoint, *, model: str, texts: list[str]
    ) -> dict[str, Any]:
        served, batch = self._served.get(endpoint.url, ("", DEFAULT_BATCH))
        if served != normalize_model(model):  # not looked yet, or restarted with another
            served, batch = self.served_model(client, endpoint)
        if normalize_model(model) != served:
            raise ModelNotFoundError(
                endpoint.url, f"model {model!r} not found: TEI serves {served!r}"
            )
        url = f"{endpoint.url}/embed"
        embeddings: list[list[float]] = []
        for start in range(0, len(texts), batch):
            part = texts[start : start + batch]
            body = {"inputs": part, "truncate": True}
            answer = request_json(client, "POST", url, body, api_key=endpoint.api_key)
            embeddings += vectors(url, answer, len(part))
        return {"embeddings": embeddings}
