"""Ollama's API: ``/api/tags`` (on disk), ``/api/ps`` (in memory), ``/api/generate``,
``/api/embed`` (https://github.com/ollama/ollama/blob/main/docs/api.md)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, NamedTuple

import httpx

from coordinator.core.errors import ModelNotFoundError, ServiceError, ServiceUnavailableError
from coordinator.core.heartbeat import MAX_MODELS
from coordinator.core.settings import Endpoint
from worker_tasks.model_servers.base import Backend, ServerState, down, model_name
from worker_tasks.model_servers.http import request_json, request_object, stream_lines, vectors

log = logging.getLogger(__name__)

MAX_BYTES = 2**50
"""The heartbeat's limit on a model size."""


class _Entry(NamedTuple):
    name: str
    size: int | None
    expires: float


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
        name = model_name(m.get("name")) or model_name(m.get("model"))
        if name is not None:
            entries.append(_Entry(name, _size(m.get("size")), _expires(m.get("expires_at"))))
    return entries


class OllamaBackend(Backend):
    """Ollama: models on disk and in memory, with sizes; the load it reports per answer."""

    api: ClassVar[str] = "ollama"

    def detect(self, client: httpx.Client, url: str) -> bool:
        answer = client.get(f"{url}/api/version")
        return answer.status_code == 200 and "version" in answer.json()

    def probe(self, client: httpx.Client, endpoint: Endpoint) -> ServerState:
        """``in_memory`` is ordered by ``expires_at``, earliest first: Ollama moves a model's
        expiry to now + keep_alive each time a request on it finishes, so with one keep_alive
        for every model that is least recently used first. ``sizes`` are ``/api/tags``'s file
        sizes (what a download or a load moves), else ``/api/ps``'s."""
        try:
            tags = request_json(client, "GET", f"{endpoint.url}/api/tags")
            ps = request_json(client, "GET", f"{endpoint.url}/api/ps")
            on_disk, loaded = _entries(tags), _entries(ps)
        except (ServiceError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            return down(exc)
        in_memory = tuple(dict.fromkeys(e.name for e in sorted(loaded, key=lambda e: e.expires)))
        sizes = {e.name: e.size for e in (*loaded, *on_disk) if e.size is not None}
        # A model in memory is on disk too, whatever /api/tags said a moment earlier; listed
        # first, so that a cap on the count keeps what routing needs most.
        disk = tuple(dict.fromkeys((*in_memory, *(e.name for e in on_disk))))
        return ServerState(True, self.api, disk[:MAX_MODELS], in_memory[:MAX_MODELS], sizes=sizes)

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
        body: dict[str, Any] = {"model": model, "prompt": prompt, "stream": False}
        if images:
            body["images"] = images
        if options:
            body["options"] = options
        url = f"{endpoint.url}/api/generate"
        answer = request_object(client, "POST", url, body)
        if not isinstance(answer.get("response"), str):
            raise ServiceError(url, f"no 'response' text in {sorted(answer)!r}")
        return answer

    def embed(
        self, client: httpx.Client, endpoint: Endpoint, *, model: str, texts: list[str]
    ) -> dict[str, Any]:
        url = f"{endpoint.url}/api/embed"
        answer = request_object(client, "POST", url, {"model": model, "input": texts})
        answer["embeddings"] = vectors(url, answer.get("embeddings"), len(texts))
        return answer

    def load(
        self, client: httpx.Client, endpoint: Endpoint, model: str, keep_alive: Any = None
    ) -> None:
        """Load ``model`` into memory: a generate request with an empty prompt."""
        body: dict[str, Any] = {"model": model, "prompt": "", "stream": False}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        request_json(client, "POST", f"{endpoint.url}/api/generate", body)

    can_pull = True

    def pull(
        self, client: httpx.Client, endpoint: Endpoint, model: str, deadline_s: float | None = None
    ) -> None:
        """Download ``model`` (``POST /api/pull``), its progress in the worker's log.

        Raises:
            ModelNotFoundError: no registry Ollama pulls from has the model.
            ServiceUnavailableError: the pull failed, or was not done after ``deadline_s``
                (Ollama keeps what it downloaded: the next pull resumes).
        """
        url = f"{endpoint.url}/api/pull"
        progress = _PullProgress(model)
        body = {"model": model, "stream": True}
        for line in stream_lines(client, "POST", url, body, api_key=endpoint.api_key):
            if "error" in line:  # a stream reports its failure in-band, after HTTP 200
                raise _pull_error(url, model, str(line["error"]))
            progress.update(line)
            if deadline_s is not None and progress.elapsed_s > deadline_s:
                raise ServiceUnavailableError(
                    url, f"pulling {model!r}: not done after {deadline_s:g} s"
                )
        log.info("pulled %s in %.1f s", model, progress.elapsed_s)


def _pull_error(url: str, model: str, error: str) -> ServiceError:
    if "file does not exist" in error or "not found" in error:  # Ollama's words for it
        return ModelNotFoundError(url, f"{model!r} cannot be pulled: {error[:300]}")
    return ServiceUnavailableError(url, f"pulling {model!r} failed: {error[:300]}")


@dataclass
class _PullProgress:
    """Logs a pull's steps, and its download at most every ``every_s``."""

    model: str
    every_s: float = 5.0
    started: float = field(default_factory=time.monotonic)
    _status: str = ""
    _logged_at: float = -math.inf

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def update(self, line: dict[str, Any]) -> None:
        status = str(line.get("status", ""))[:200]
        total, completed = line.get("total"), line.get("completed")
        now = time.monotonic()
        if isinstance(total, int) and isinstance(completed, int) and total > 0:
            if status == self._status and now - self._logged_at < self.every_s:
                return
            percent = 100 * completed / total
            log.info("pulling %s: %s %.0f%% of %.2f GB", self.model, status, percent, total / 1e9)
        elif status != self._status:
            log.info("pulling %s: %s", self.model, status)
        self._status, self._logged_at = status, now
