"""Hugging Face text-embeddings-inference: ``GET /info`` (``model_id``), ``POST /embed``,
``GET /health``, ``GET /metrics`` (``te_queue_size``).

A TEI server serves the one model it was started with; a request for another is refused
here as the model not found, so the task is routed to a worker that has it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx

from coordinator.core.catalog import normalize_model
from coordinator.core.errors import ModelNotFoundError, ServiceError
from coordinator.core.settings import Endpoint
from worker_tasks.model_servers.base import Backend, ServerState, down, names
from worker_tasks.model_servers.http import request_json, request_object, vectors
from worker_tasks.model_servers.server_metrics import fetch_load


class TEIBackend(Backend):
    """One embedding model, always in memory; its queue from ``/metrics``."""

    api: ClassVar[str] = "tei"

    def __init__(self) -> None:
        self._served: dict[str, str] = {}
        """URL -> the model it served at the last look: a task need not ask again."""

    def detect(self, client: httpx.Client, url: str) -> bool:
        answer = client.get(f"{url}/info")
        body = answer.json() if answer.status_code == 200 else None
        return isinstance(body, dict) and "model_id" in body

    def served_model(self, client: httpx.Client, endpoint: Endpoint) -> str:
        """The ``model_id`` in ``/info``."""
        url = f"{endpoint.url}/info"
        info = request_object(client, "GET", url, api_key=endpoint.api_key)
        model = names([info.get("model_id")])
        if not model:
            raise ServiceError(url, "no model_id in /info")
        self._served[endpoint.url] = model[0]
        return model[0]

    def probe(self, client: httpx.Client, endpoint: Endpoint) -> ServerState:
        try:
            model = self.served_model(client, endpoint)
        except ServiceError as exc:
            return down(exc)
        load = fetch_load(client, endpoint.url, endpoint.api_key)
        return ServerState(True, self.api, (model,), (model,), load=load)

    def embed(
        self, client: httpx.Client, endpoint: Endpoint, *, model: str, texts: list[str]
    ) -> dict[str, Any]:
        served = self._served.get(endpoint.url)
        if served != normalize_model(model):  # not looked yet, or restarted with another
            served = self.served_model(client, endpoint)
        if normalize_model(model) != served:
            raise ModelNotFoundError(
                endpoint.url, f"model {model!r} not found: TEI serves {served!r}"
            )
        url = f"{endpoint.url}/embed"
        answer = request_json(client, "POST", url, {"inputs": texts}, api_key=endpoint.api_key)
        return {"embeddings": vectors(url, answer, len(texts))}
