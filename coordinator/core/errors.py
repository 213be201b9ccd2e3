"""One error hierarchy for the whole project; every message shows the offending value."""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(CoordinatorError):
    """An environment variable or setting has a value the project cannot use."""


class HeartbeatError(CoordinatorError):
    """A heartbeat payload could not be parsed or failed validation."""

    def __init__(self, worker_id: str | None, reason: str) -> None:
        self.worker_id = worker_id
        self.reason = reason
        # args are the constructor's, so Celery can rebuild the error from its JSON form.
        super().__init__(worker_id, reason)

    def __str__(self) -> str:
        return f"malformed heartbeat from worker {self.worker_id!r}: {self.reason}"


class ServiceError(CoordinatorError):
    """A model service (Ollama, embeddings, OCR) or the ChromaDB failed or did not answer."""

    def __init__(self, url: str, reason: str, *, what: str = "model service") -> None:
        self.url = url
        self.reason = reason
        self.what = what
        super().__init__(url, reason)

    def __str__(self) -> str:
        return f"{self.what} at {self.url!r} failed: {self.reason}"


class ServiceUnavailableError(ServiceError):
    """The failure may pass: connection refused, timeout, or a 5xx answer. Tasks retry it."""


class ServiceUnreachableError(ServiceUnavailableError):
    """Nobody took the connection (refused, connect timeout): the service is down, not busy, so
    the worker leaves routing for it at once rather than at its next heartbeat."""


class ModelNotFoundError(ServiceError):
    """The service answered 404 for the model: this worker does not have it."""


class TaskInputError(CoordinatorError):
    """A task was called with arguments it cannot use."""


class JobError(CoordinatorError):
    """A broadcast job that cannot be sent: unknown type, invalid data, no recipient."""
