"""The model servers a worker talks to, one backend per API (see ``docs/model-servers.md``).

:func:`backend` resolves a service's configured API, detecting it by probing when it is
``auto``; :func:`shared_client` is the process's one pooled HTTP client, reused by every
probe and task (creating one costs tens of milliseconds of CPU: its TLS context), and
:func:`close_clients` closes it as the process ends.
"""

from __future__ import annotations

import os
import threading
from typing import Final

import httpx

from coordinator.core.errors import ServiceUnreachableError
from coordinator.core.heartbeat import ServerLoad
from coordinator.core.settings import Endpoint, WorkerSettings
from worker_tasks.model_servers.base import Backend, ServerState
from worker_tasks.model_servers.ollama import OllamaBackend
from worker_tasks.model_servers.openai_api import OpenAIBackend
from worker_tasks.model_servers.tei import TEIBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "ServerLoad",
    "ServerState",
    "backend",
    "close_clients",
    "connect",
    "shared_client",
]

BACKENDS: Final[dict[str, Backend]] = {
    b.api: b for b in (OllamaBackend(), OpenAIBackend(), TEIBackend())
}
DETECTION_ORDER: Final = ("ollama", "tei", "openai")
"""Ollama first (the default deployment); TEI before OpenAI, since TEI also serves
OpenAI-style ``/v1/embeddings`` and ``/info`` tells it apart."""

_detected: dict[str, str] = {}
_lock = threading.Lock()
_clients: dict[tuple[int, float], httpx.Client] = {}


def backend(client: httpx.Client, endpoint: Endpoint) -> Backend:
    """The backend for ``endpoint``: its ``api``, or for ``auto`` the first API the server
    answers to (remembered per URL until :func:`forget`).

    Raises:
        ServiceUnreachableError: ``auto`` and nothing answered at the URL.
    """
    if endpoint.api != "auto":
        return BACKENDS[endpoint.api]
    with _lock:
        known = _detected.get(endpoint.url)
    if known is not None:
        return BACKENDS[known]
    errors = []
    for api in DETECTION_ORDER:
        try:
            if BACKENDS[api].detect(client, endpoint.url):
                with _lock:
                    _detected[endpoint.url] = api
                return BACKENDS[api]
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nobody there at all
            raise ServiceUnreachableError(endpoint.url, f"{type(exc).__name__}: {exc}") from None
        except (httpx.HTTPError, ValueError) as exc:
            errors.append(f"{api}: {type(exc).__name__}: {exc}")
    reason = "; ".join(errors) or "answers none of Ollama's, TEI's or the OpenAI API"
    raise ServiceUnreachableError(endpoint.url, reason[:300])


def connect(settings: WorkerSettings, service: str) -> tuple[httpx.Client, Endpoint, Backend]:
    """The process's pooled client (model-call timeout), ``service``'s endpoint, and the
    backend for its API (errors as for :func:`backend`)."""
    client = shared_client(settings.model_timeout_s)
    endpoint = settings.endpoint(service)
    return client, endpoint, backend(client, endpoint)


def forget(url: str) -> None:
    """Detect the API at ``url`` again next time (the server may have been replaced)."""
    with _lock:
        _detected.pop(url.rstrip("/"), None)


def shared_client(timeout_s: float) -> httpx.Client:
    """This process's pooled client with ``timeout_s``; a forked pool child makes its own."""
    key = (os.getpid(), timeout_s)
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = httpx.Client(timeout=timeout_s)
        return client


def close_clients() -> None:
    """Close this process's pooled clients (their kept-alive connections); a later
    :func:`shared_client` makes a new one."""
    with _lock:
        mine = [key for key in _clients if key[0] == os.getpid()]
        closing = [_clients.pop(key) for key in mine]
    for client in closing:
        client.close()


def _after_fork_in_child() -> None:
    # A prefork pool forks while the main process's probe thread may hold the lock: the
    # child gets a fresh one, or its first task could wait forever. The parent's clients
    # stay the parent's: dropped here, never closed or used (their sockets are shared).
    global _lock
    _lock = threading.Lock()
    _clients.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def probe(client: httpx.Client, endpoint: Endpoint) -> ServerState:
    """Probe ``endpoint`` through its backend; never raises."""
    try:
        found = backend(client, endpoint)
    except ServiceUnreachableError as exc:
        return ServerState(healthy=False, error=exc.reason)
    state = found.probe(client, endpoint)
    if not state.healthy and not state.transient:
        forget(endpoint.url)  # gone, or answering another API now: detect it again
    return state
