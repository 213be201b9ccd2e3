"""Probe the host's model services: what answers, and which models it has."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, NamedTuple

import httpx

from coordinator.core.catalog import normalize_model
from coordinator.core.heartbeat import MAX_MODELS
from coordinator.fleet.registry import redact_url

log = logging.getLogger(__name__)

MAX_NAME: Final = 128
"""The heartbeat's limit on a model name: a longer one could not be reported."""
MAX_BYTES: Final = 2**50
"""The heartbeat's limit on a model size."""


@dataclass(frozen=True, slots=True)
class OllamaState:
    """What Ollama's ``/api/tags`` (on disk) and ``/api/ps`` (in memory) reported.

    ``in_memory`` is ordered by ``expires_at``, earliest first. Ollama moves a model's
    expiry to now + keep_alive each time a request on it finishes, so with one keep_alive
    for every model that is least recently used first. ``sizes`` are bytes per model:
    ``/api/tags``'s file size where it lists the model (what a download or a load moves),
    else ``/api/ps``'s (which also counts the context cache).
    """

    healthy: bool
    on_disk: tuple[str, ...] = ()
    in_memory: tuple[str, ...] = ()
    sizes: dict[str, int] = field(default_factory=dict)
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
    errors: dict[str, str] = field(default_factory=dict)
    """Why each service that did not answer is down: ``<url>: <error>``."""
    models_on_disk: tuple[str, ...] = ()
    models_in_memory: tuple[str, ...] = ()
    """Least recently used first (see :class:`OllamaState`)."""
    model_bytes: dict[str, int] = field(default_factory=dict)


class _Entry(NamedTuple):
    name: str
    size: int | None
    expires: float


def _name(value: object) -> str | None:
    name = normalize_model(value) if isinstance(value, str) else ""
    return name if name and len(name) <= MAX_NAME else None


def _size(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if math.isfinite(value) and 0 < value <= MAX_BYTES else None


def _expires(value: object) -> float:
    """Unix time of an ``expires_at``; unknown ones sort last, as the least likely victims."""
    if not isinstance(value, str):
        return math.inf
    try:
        stamp = datetime.fromisoformat(value)
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()
    except (ValueError, OverflowError):
        return math.inf


def _entries(payload: object) -> list[_Entry]:
    """The well-formed entries of an ``/api/tags`` or ``/api/ps`` answer; others skipped."""
    models = payload.get("models") if isinstance(payload, dict) else None
    if not isinstance(models, list):
        return []
    entries = []
    for m in models:
        if not isinstance(m, dict):
            continue
        name = _name(m.get("name")) or _name(m.get("model"))
        if name is not None:
            entries.append(_Entry(name, _size(m.get("size")), _expires(m.get("expires_at"))))
    return entries


def probe_ollama(client: httpx.Client, url: str) -> OllamaState:
    """Ask Ollama which models are on disk and which are loaded; never raises."""
    try:
        tags = client.get(f"{url}/api/tags")
        tags.raise_for_status()
        ps = client.get(f"{url}/api/ps")
        ps.raise_for_status()
        on_disk, loaded = _entries(tags.json()), _entries(ps.json())
    except (httpx.HTTPError, ValueError, RecursionError) as exc:  # JSON nested too deep
        return OllamaState(healthy=False, error=f"{type(exc).__name__}: {exc}")
    in_memory = tuple(dict.fromkeys(e.name for e in sorted(loaded, key=lambda e: e.expires)))
    sizes = {e.name: e.size for e in (*loaded, *on_disk) if e.size is not None}
    # A model in memory is on disk too, whatever /api/tags said a moment earlier; listed
    # first, so that a cap on the count keeps what routing needs most.
    names = dict.fromkeys((*in_memory, *(e.name for e in on_disk)))
    return OllamaState(True, tuple(names)[:MAX_MODELS], in_memory[:MAX_MODELS], sizes)


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
    models: list[object] = []
    if isinstance(body, dict):
        models.append(body.get("model"))
        if isinstance(body.get("models"), list):
            models.extend(body["models"])
    return HealthState(True, tuple(n for m in models if (n := _name(m)) is not None))


def probe_chromadb(client: httpx.Client, url: str) -> HealthState:
    """Whether the ChromaDB server at ``url`` answers its heartbeat."""
    try:
        client.get(f"{url}/api/v2/heartbeat").raise_for_status()
    except httpx.HTTPError as exc:
        return HealthState(healthy=False, error=f"{type(exc).__name__}: {exc}")
    return HealthState(healthy=True)


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
    worker serves it) to whether it answered; ``model_bytes`` has the sizes Ollama reported
    for the models on this host.
    """
    ollama = probe_ollama(client, ollama_url)
    found = {"vllm": ollama.healthy}
    errors = _error({}, "vllm", "OLLAMA_URL", ollama_url, ollama.error)
    models = list(ollama.on_disk)
    for service, setting, url in (
        ("embeddings", "EMBEDDINGS_URL", embeddings_url),
        ("ocr", "OCR_URL", ocr_url),
    ):
        if url.rstrip("/") == ollama_url.rstrip("/"):
            found[service] = ollama.healthy
            _error(errors, service, setting, url, ollama.error)
            continue
        state = probe_health(client, url)
        found[service] = state.healthy
        _error(errors, service, setting, url, state.error)
        models.extend(state.models)
    if chromadb_url is not None:
        chroma = probe_chromadb(client, chromadb_url)
        found["chromadb"] = chroma.healthy
        _error(errors, "chromadb", "CHROMADB_URL", chromadb_url, chroma.error)
    on_host = tuple(dict.fromkeys(models))[:MAX_MODELS]
    sizes = {m: b for m, b in ollama.sizes.items() if m in on_host}
    return ProbeResult(found, errors, on_host, ollama.in_memory, sizes)


def _error(
    errors: dict[str, str], service: str, setting: str, url: str, error: str | None
) -> dict[str, str]:
    """Record why ``service``, at ``url`` from ``setting``, is down, if it is."""
    if error is not None:
        errors[service] = f"{setting} {redact_url(url)}: {error}"
    return errors
