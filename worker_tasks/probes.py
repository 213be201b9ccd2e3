"""Probe the host's model services: what answers, and which models it has."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import httpx

from coordinator.catalog import normalize_model

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OllamaState:
    """What Ollama's ``/api/tags`` (on disk) and ``/api/ps`` (in memory) reported."""

    healthy: bool
    on_disk: tuple[str, ...] = ()
    in_memory: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class HealthState:
    """What a service's ``GET /health`` reported."""

    healthy: bool
    models: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Everything the probes found, per service of the catalogue."""

    services_status: dict[str, bool] = field(default_factory=dict)
    loaded_models: tuple[str, ...] = ()
    models_in_memory: tuple[str, ...] = ()


def _model_names(payload: object) -> tuple[str, ...]:
    if not isinstance(payload, dict):
        return ()
    models = payload.get("models", [])
    if not isinstance(models, list):
        return ()
    names = (m.get("name") or m.get("model") for m in models if isinstance(m, dict))
    return tuple(normalize_model(n) for n in names if isinstance(n, str) and n)


def probe_ollama(client: httpx.Client, url: str) -> OllamaState:
    """Ask Ollama which models are on disk and which are loaded; never raises."""
    try:
        tags = client.get(f"{url}/api/tags")
        tags.raise_for_status()
        ps = client.get(f"{url}/api/ps")
        ps.raise_for_status()
        on_disk, in_memory = _model_names(tags.json()), _model_names(ps.json())
    except (httpx.HTTPError, ValueError) as exc:
        return OllamaState(healthy=False, error=f"{type(exc).__name__}: {exc}")
    # A model in memory is on disk too, whatever /api/tags said a moment earlier.
    return OllamaState(True, tuple(dict.fromkeys(on_disk + in_memory)), in_memory)


def probe_health(client: httpx.Client, url: str) -> HealthState:
    """``GET /health``: 2xx means healthy; ``model`` or ``models`` in a JSON body are read."""
    try:
        response = client.get(f"{url}/health")
        response.raise_for_status()
    except httpx.HTTPError as exc:
        return HealthState(healthy=False, error=f"{type(exc).__name__}: {exc}")
    try:
        body = response.json()
    except ValueError:
        return HealthState(healthy=True)
    models: list[str] = []
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):
            models.append(body["model"])
        if isinstance(body.get("models"), list):
            models.extend(m for m in body["models"] if isinstance(m, str))
    return HealthState(True, tuple(normalize_model(m) for m in models if m))


def probe_chromadb(client: httpx.Client, url: str) -> bool:
    """Whether the ChromaDB server at ``url`` answers its heartbeat."""
    try:
        client.get(f"{url}/api/v2/heartbeat").raise_for_status()
    except httpx.HTTPError:
        return False
    return True


def probe_services(
    client: httpx.Client,
    *,
    ollama_url: str,
    embeddings_url: str,
    ocr_url: str,
    chromadb_url: str | None = None,
) -> ProbeResult:
    """Probe every service; a URL equal to Ollama's is served by that same Ollama.

    ``services_status`` maps each service of the catalogue (and ``chromadb`` when this
    worker serves it) to whether it answered.
    """
    ollama = probe_ollama(client, ollama_url)
    if not ollama.healthy:
        log.debug("ollama at %s: %s", ollama_url, ollama.error)
    found = {"vllm": ollama.healthy}
    models = list(ollama.on_disk)
    for service, url in (("embeddings", embeddings_url), ("ocr", ocr_url)):
        if url.rstrip("/") == ollama_url.rstrip("/"):
            found[service] = ollama.healthy
            continue
        state = probe_health(client, url)
        if not state.healthy:
            log.debug("%s at %s: %s", service, url, state.error)
        found[service] = state.healthy
        models.extend(state.models)
    if chromadb_url is not None:
        found["chromadb"] = probe_chromadb(client, chromadb_url)
    return ProbeResult(found, tuple(dict.fromkeys(models)), ollama.in_memory)
