"""The base of the model tasks: what happens when a model service fails.

- Connection refused, timeout, HTTP 5xx or 429 (:class:`ServiceUnavailableError`): retried up
  to 3 times with exponential backoff and jitter (2 s, 4 s, 8 s, at most 60 s), each retry
  routed afresh, so it can move to a healthier worker. When nobody answered at all
  (:class:`ServiceUnreachableError`), the worker first marks that service unreachable in the
  registry, so the retry, and every other publisher's next task, goes elsewhere at once
  rather than after the next heartbeat.
- HTTP 404 for the model (:class:`ModelNotFoundError`): routed again, to another worker
  that has the model, at once; when no other live worker has it, the task fails naming the
  model and the models the fleet serves.
- Anything else (bad input, other 4xx): the task fails at once with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import httpx
from celery import Task
from celery.exceptions import Retry

from coordinator.core.catalog import detect_required_model, task_spec
from coordinator.core.errors import (
    ModelNotFoundError,
    ServiceUnavailableError,
    ServiceUnreachableError,
)
from coordinator.core.heartbeat import is_eligible
from coordinator.core.settings import Endpoint, WorkerSettings, load_settings
from coordinator.dispatch.app import FleetApp
from coordinator.fleet.claims import CLAIM_HEADER, claim_header
from worker_tasks import model_servers
from worker_tasks.model_servers import Backend

log = logging.getLogger(__name__)

EXCLUDE_OPTION = "aiq_exclude"
"""A :meth:`ModelTask.retry` option: workers the retry must not be routed to."""
EXCLUDED_HEADER = "aiq_excluded"
"""The workers a task's earlier attempts found without its model, carried from retry to
retry so that a model missing from several workers does not bounce between them."""
MAX_EXCLUDED = 64


class ModelTask(Task[Any, Any]):
    """Base of the model tasks: retries transient service failures, re-routed."""

    autoretry_for = (ServiceUnavailableError,)
    max_retries = 3
    retry_backoff = 2
    retry_backoff_max = 60
    retry_jitter = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ModelNotFoundError as exc:
            return self._elsewhere(exc, kwargs)

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: Exception | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Celery's retry, sent where the router chooses now rather than back to this worker.

        When no retry is left, Celery raises without sending anything: then nothing is
        routed either, or the claim taken for it would have no message behind it.
        """
        spec = task_spec(self.name)
        exclude = self._excluded() | frozenset(options.pop(EXCLUDE_OPTION, ()))
        # Called directly or eagerly, Celery sends no retry message: nothing to route.
        in_worker = not (self.request.called_directly or self.request.is_eager)
        if spec is not None and in_worker and isinstance(exc, ServiceUnreachableError):
            self._leave(spec.service, exc)
        limit = self.max_retries if max_retries is None else max_retries
        exhausted = limit is not None and self.request.retries >= limit
        routed_here = in_worker and not exhausted and "queue" not in options
        if spec is None or not routed_here or not isinstance(self.app, FleetApp):
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        call_kwargs = kwargs if kwargs is not None else self.request.kwargs
        model = detect_required_model(self.name, call_kwargs)
        route = self.app.router.route(self.name, spec.service, model, exclude)
        # The retry is a new message with a claim of its own; this attempt's claim is
        # released when it ends (worker_tasks.outcomes).
        headers = dict(self.request.headers or {})
        headers.pop(CLAIM_HEADER, None)
        if exclude:
            headers[EXCLUDED_HEADER] = sorted(exclude)[:MAX_EXCLUDED]
        if route.claim is not None:
            headers[CLAIM_HEADER] = claim_header(route.claim)
        options.update(queue=route.queue, headers=headers)
        try:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        except Retry:
            raise  # sent: Celery's way of ending this attempt
        except BaseException:
            if route.claim is not None:  # not sent (the broker refused): take the claim back
                self.app.router.claims.cancel(route.claim)
            raise

    def _excluded(self) -> frozenset[str]:
        """The workers earlier attempts of this task found without its model."""
        carried = (self.request.headers or {}).get(EXCLUDED_HEADER)
        if not isinstance(carried, list):
            return frozenset()
        return frozenset(w for w in carried[:MAX_EXCLUDED] if isinstance(w, str))

    def worker_settings(self) -> WorkerSettings:
        """This worker's settings (read from the environment outside a started worker)."""
        runtime = getattr(self.app, "runtime", None)
        return runtime.settings if runtime is not None else load_settings(WorkerSettings)

    def server(
        self, service: str, settings: WorkerSettings
    ) -> tuple[httpx.Client, Endpoint, Backend]:
        """The process's pooled client, ``service``'s endpoint and the backend for its API.

        Raises:
            ServiceUnreachableError: the API is to be detected and nothing answered.
        """
        return model_servers.connect(settings, service)

    def record(self, model: str, answer: Mapping[str, Any], started: float) -> None:
        """Add a model call that began at ``started`` (``time.monotonic()``) to this worker's
        model statistics, which its heartbeat reports; outside a started worker there are
        none."""
        runtime = getattr(self.app, "runtime", None)
        if runtime is not None:
            runtime.stats.record_answer(model, answer, time.monotonic() - started)

    def _leave(self, service: str, exc: ServiceUnreachableError) -> None:
        """Mark this worker's ``service`` unreachable in the registry, for two heartbeat
        intervals (its probes say so by then, or that it is back), and make this process's
        router see it before it routes the retry."""
        if not isinstance(self.app, FleetApp):
            return
        settings = self.worker_settings()
        for_s = 2 * settings.heartbeat_interval_s
        log.warning(
            "%s unreachable at %s (%s): worker %s leaves it for %.0f s",
            service,
            exc.url,
            exc.reason,
            settings.worker_id,
            for_s,
        )
        try:
            why = f"{exc.url}: {exc.reason} (from a task)"
            self.app.registry.mark_unreachable(settings.worker_id, service, for_s, why)
            self.app.router.refresh()
        except Exception as error:  # the next heartbeat carries the news all the same
            log.warning("could not mark %s unreachable: %s", service, error)

    def _elsewhere(self, exc: ModelNotFoundError, kwargs: Mapping[str, Any]) -> Any:
        """Route the task to another worker that has the model; none: fail, naming it."""
        spec = task_spec(self.name)
        if spec is None or not isinstance(self.app, FleetApp):
            raise exc
        model = detect_required_model(self.name, kwargs)
        me = self.worker_settings().worker_id
        tried = self._excluded() | {me}
        live = [hb for hb in self.app.registry.live_workers() if is_eligible(hb, spec.service)]
        holders = [
            hb.worker_id
            for hb in live
            if hb.worker_id not in tried and model in (*hb.models_on_disk, *hb.models_in_memory)
        ]
        if not holders:
            served = sorted({m for hb in live for m in (*hb.models_on_disk, *hb.models_in_memory)})
            raise ModelNotFoundError(
                exc.url,
                f"{exc.reason}; no other live worker has {model!r} (the fleet's "
                f"{spec.service} models: {', '.join(served) or 'none'})",
            ) from None
        log.info("%s not on %s: routed again, away from it (%s have it)", model, me, holders)
        return self.retry(exc=exc, countdown=0, aiq_exclude=[me])
