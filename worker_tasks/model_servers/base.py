"""What every model-server backend offers the worker: a probe, generation, embeddings."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from coordinator.core.errors import (
    ServiceError,
    ServiceUnavailableError,
    ServiceUnreachableError,
)
from coordinator.core.heartbeat import MAX_MODELS, ServerLoad
from coordinator.core.settings import Endpoint
from coordinator.core.task_spec import normalize_model

MAX_NAME = 128
"""The heartbeat's limit on a model name: a longer one could not be reported."""


@dataclass(frozen=True, slots=True)
class ServerState:
    """What one probe of a model server found."""

    healthy: bool
    api: str = ""
    on_disk: tuple[str, ...] = ()
    in_memory: tuple[str, ...] = ()
    """Least recently used first where the server says (Ollama)."""
    sizes: dict[str, int] = field(default_factory=dict)
    load: ServerLoad | None = None
    error: str | None = None
    transient: bool = False
    """Down for now (an HTTP 5xx or 429, a read timeout): still the server detected."""


def down(error: BaseException | str) -> ServerState:
    """A server that did not answer as its API should."""
    if isinstance(error, ServiceError):
        transient = isinstance(error, ServiceUnavailableError) and not isinstance(
            error, ServiceUnreachableError
        )
        return ServerState(healthy=False, error=error.reason, transient=transient)
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return ServerState(healthy=False, error=text)


def model_name(value: object) -> str | None:
    """A model name a heartbeat can carry, or ``None``."""
    name = normalize_model(value) if isinstance(value, str) else ""
    return name if name and len(name) <= MAX_NAME else None


def names(values: list[object]) -> tuple[str, ...]:
    """The well-formed, distinct model names, at most what a heartbeat carries."""
    return tuple(dict.fromkeys(n for v in values if (n := model_name(v)) is not None))[:MAX_MODELS]


class Backend(ABC):
    """One model-server API, stateless: every call gets the worker's client and endpoint."""

    api: ClassVar[str]

    @abstractmethod
    def detect(self, client: httpx.Client, url: str) -> bool:
        """Whether the server at ``url`` speaks this API (for ``*_API=auto``)."""

    @abstractmethod
    def probe(self, client: httpx.Client, endpoint: Endpoint) -> ServerState:
        """Models and load; never raises."""

    def generate(
        self,
        client: httpx.Client,
        endpoint: Endpoint,
        *,
        model: str,
        prompt: str,
        images: list[str] | None = None,
        options: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Text for ``prompt`` (and base64 ``images``): ``{"response": text, ...}``, with
        Ollama's duration fields where the server reports them."""
        raise ServiceError(endpoint.url, f"the {self.api} API generates no text")

    def embed(
        self, client: httpx.Client, endpoint: Endpoint, *, model: str, texts: list[str]
    ) -> dict[str, Any]:
        """``{"embeddings": [[float, ...], ...]}``, one per text, in order."""
        raise ServiceError(endpoint.url, f"the {self.api} API serves no embeddings")

    can_pull: ClassVar[bool] = False
    """Whether the server downloads a model it is asked to (Ollama); the others serve what
    they were started with."""

    def pull(
        self, client: httpx.Client, endpoint: Endpoint, model: str, deadline_s: float | None = None
    ) -> None:
        """Download ``model`` onto the server, logging its progress; give up (a
        :class:`ServiceUnavailableError`) after ``deadline_s``."""
        raise ServiceError(endpoint.url, f"the {self.api} API cannot download {model!r}")
