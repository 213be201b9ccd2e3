"""Probe the host's model services: what answers, which models it has, how loaded it is."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Final

import httpx

from coordinator.core.heartbeat import MAX_MODELS
from coordinator.core.settings import Endpoint, WorkerSettings, redact_url
from worker_tasks import model_servers
from worker_tasks.model_servers import ServerLoad, ServerState

log = logging.getLogger(__name__)

MODEL_SERVICES: Final = ("vllm", "embeddings", "ocr")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Everything the probes found, per service of the catalogue."""

    services_status: dict[str, bool] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    """Why each service that did not answer is down: ``<setting> <url>: <error>``."""
    models_on_disk: tuple[str, ...] = ()
    models_in_memory: tuple[str, ...] = ()
    """Least recently used first where the server says (Ollama)."""
    model_bytes: dict[str, int] = field(default_factory=dict)
    server_load: dict[str, ServerLoad] = field(default_factory=dict)
    """Per service, the load its server publishes (other clients' requests included)."""


def probe_chromadb(client: httpx.Client, url: str) -> ServerState:
    """Whether the ChromaDB server at ``url`` answers its heartbeat."""
    try:
        client.get(f"{url}/api/v2/heartbeat").raise_for_status()
    except httpx.HTTPError as exc:
        return ServerState(healthy=False, error=f"{type(exc).__name__}: {exc}")
    return ServerState(healthy=True)


def probe_services(client: httpx.Client, settings: WorkerSettings) -> ProbeResult:
    """Probe each service's server once (services sharing a URL share the probe), and
    ChromaDB when this worker serves it."""
    states: dict[tuple[str, str], ServerState] = {}
    endpoints = [settings.endpoint(service) for service in MODEL_SERVICES]
    for endpoint in endpoints:
        key = (endpoint.url, endpoint.api)
        if key not in states:
            states[key] = model_servers.probe(client, endpoint)
    result = _merge([(e, states[(e.url, e.api)]) for e in endpoints])
    if settings.served_chromadb_url is not None:
        chroma = probe_chromadb(client, settings.served_chromadb_url)
        result.services_status["chromadb"] = chroma.healthy
        if chroma.error is not None:
            url = redact_url(settings.served_chromadb_url)
            result.errors["chromadb"] = f"CHROMADB_URL {url}: {chroma.error}"
    return result


def _merge(found: list[tuple[Endpoint, ServerState]]) -> ProbeResult:
    result = ProbeResult()
    on_disk: list[str] = []
    in_memory: list[str] = []
    for endpoint, state in found:
        service = endpoint.service
        result.services_status[service] = state.healthy
        if state.error is not None:
            where = f"{endpoint.setting} {redact_url(endpoint.url)}"
            result.errors[service] = f"{where}: {state.error}"
            continue
        on_disk += state.on_disk
        in_memory += state.in_memory
        result.model_bytes.update(state.sizes)
        if state.load is not None:
            result.server_load[service] = state.load
    return replace(
        result,
        models_on_disk=tuple(dict.fromkeys((*in_memory, *on_disk)))[:MAX_MODELS],
        models_in_memory=tuple(dict.fromkeys(in_memory))[:MAX_MODELS],
    )
