"""The base of the model tasks, built-in or an application's own: where the task runs and
what happens when a model service fails.

- A message that reached a worker unrouted (sent by an app without the fleet router, to
  Celery's default queue or the fleet's) is routed on from there, under the same task id.

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
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import redis
from celery import Task
from celery.exceptions import Ignore

from coordinator.core.errors import (
    ModelNotFoundError,
    ServiceUnavailableError,
    ServiceUnreachableError,
)
from coordinator.core.heartbeat import is_eligible
from coordinator.core.settings import Endpoint, WorkerSettings, load_settings
from coordinator.core.task_spec import TaskSpec
from coordinator.dispatch.app import Fleet, find_fleet
from coordinator.fleet.claims import CLAIM_HEADER, claim_header
from worker_tasks import model_servers
from worker_tasks.lifecycle import runtime_of
from worker_tasks.model_servers import Backend

log = logging.getLogger(__name__)

EXCLUDE_OPTION = "aiq_exclude"
"""A :meth:`ModelTask.retry` option: workers the retry must not be routed to."""
EXCLUDED_HEADER = "aiq_excluded"
"""The workers a task's earlier attempts found without its model, carried from retry to
retry so that a model missing from several workers does not bounce between them."""
MAX_EXCLUDED = 64
MAX_PULL_S = 900.0
"""A pull of a model nobody has gives up after this long, to be retried (and resumed)."""


class ModelTask(Task[Any, Any]):
    """Base of the model tasks: routed on when it arrived unrouted, retries transient service
    failures (re-routed), moves to a worker with the model when this one has none.

    Declare what the task needs as task options (:class:`~coordinator.core.task_spec.TaskSpec`):
    ``@app.task(base=ModelTask, bind=True, service="vllm", default_model="llama3.2")``.
    """

    service: str | None = None
    """The service the task needs (``vllm``, ``ocr``, ``embeddings`` or a capability)."""
    model_arg: str | None = "model"
    """The argument naming the model."""
    default_model: str | None = None
    """The model when the call names none."""

    autoretry_for = (ServiceUnavailableError,)
    max_retries = 3
    retry_backoff = 2
    retry_backoff_max = 60
    retry_jitter = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fleet, spec = find_fleet(self.app), self.spec
        if fleet is not None and spec is not None and self._arrived_unrouted(fleet):
            self._route_on(fleet, spec, args, kwargs)
        try:
            return super().__call__(*args, **kwargs)
        except ModelNotFoundError as exc:
            return self._on_model_missing(exc, args, kwargs)

    @property
    def spec(self) -> TaskSpec | None:
        """What the task declares it needs (see :meth:`TaskSpec.of`)."""
        cached: tuple[TaskSpec | None] | None = self.__dict__.get("_spec")
        if cached is None:
            cached = self.__dict__["_spec"] = (TaskSpec.of(self),)
        return cached[0]

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
        routed either. A retry that is not sent leaves no claim behind (see
        :class:`~coordinator.dispatch.router.Route`).
        """
        fleet, spec = find_fleet(self.app), self.spec
        exclude = self._excluded() | frozenset(options.pop(EXCLUDE_OPTION, ()))
        # Called directly or eagerly, Celery sends no retry message: nothing to route.
        in_worker = not (self.request.called_directly or self.request.is_eager)
        if spec is not None and in_worker and isinstance(exc, ServiceUnreachableError):
            self._leave(spec.service, exc)
        limit = self.max_retries if max_retries is None else max_retries
        exhausted = limit is not None and self.request.retries >= limit
        routed_here = in_worker and not exhausted and "queue" not in options
        if fleet is not None and spec is not None and routed_here:
            call = (
                args if args is not None else self.request.args,
                kwargs if kwargs is not None else self.request.kwargs,
            )
            options.update(self._routed(fleet, spec, call, exclude))
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)

    def _routed(
        self,
        fleet: Fleet,
        spec: TaskSpec,
        call: tuple[Sequence[Any] | None, Mapping[str, Any] | None],
        exclude: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """The options sending this task's message again where the router chooses now: a new
        message with a claim of its own (this attempt's claim is released as it ends, by
        ``worker_tasks.outcomes``)."""
        route = fleet.router.route(self.name, spec.service, spec.model(*call), exclude)
        headers = dict(self.request.headers or {})
        headers.pop(CLAIM_HEADER, None)
        if exclude:
            headers[EXCLUDED_HEADER] = sorted(exclude)[:MAX_EXCLUDED]
        if route.claim is not None:
            headers[CLAIM_HEADER] = claim_header(route.claim)
        return {"queue": route.queue, "headers": headers}

    def _arrived_unrouted(self, fleet: Fleet) -> bool:
        """Whether this message came through the fleet's default queue, where no router sent
        it (a fleet app without the task's spec, the reaper's default for odd messages)."""
        request = self.request
        if request.called_directly or request.is_eager or (request.headers or {}).get(CLAIM_HEADER):
            return False
        return (request.delivery_info or {}).get("routing_key") == fleet.keys.default_queue

    def _route_on(
        self, fleet: Fleet, spec: TaskSpec, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> None:
        """Send this message where the router chooses, under the same task id, and end this
        attempt without a result (Celery's ``Ignore``, as ``Task.replace`` does); returns when
        the router chose this worker."""
        options = self._routed(fleet, spec, (args, kwargs))
        if options["queue"] == fleet.keys.worker_queue(self.worker_settings().worker_id):
            return  # chosen: its claim, never published, lapses unused
        signature = self.signature_from_request(self.request, tuple(args), dict(kwargs), **options)
        signature.apply_async()
        log.info(
            "%s %s arrived unrouted: sent on to %s", self.name, self.request.id, options["queue"]
        )
        raise Ignore()

    def _excluded(self) -> frozenset[str]:
        """The workers earlier attempts of this task found without its model."""
        carried = (self.request.headers or {}).get(EXCLUDED_HEADER)
        if not isinstance(carried, list):
            return frozenset()
        return frozenset(w for w in carried[:MAX_EXCLUDED] if isinstance(w, str))

    def worker_settings(self) -> WorkerSettings:
        """This worker's settings (read from the environment outside a started worker)."""
        runtime = runtime_of(self.app)
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
        runtime = runtime_of(self.app)
        if runtime is not None:
            runtime.stats.record_answer(model, answer, time.monotonic() - started)

    def _leave(self, service: str, exc: ServiceUnreachableError) -> None:
        """Mark this worker's ``service`` unreachable in the registry, for two heartbeat
        intervals (its probes say so by then, or that it is back), and make this process's
        router see it before it routes the retry."""
        fleet = find_fleet(self.app)
        if fleet is None:
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
            fleet.registry.mark_unreachable(settings.worker_id, service, for_s, why)
            fleet.router.refresh()
        except Exception as error:  # the next heartbeat carries the news all the same
            log.warning("could not mark %s unreachable: %s", service, error)

    def _on_model_missing(
        self, exc: ModelNotFoundError, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Any:
        """Route the task to another worker that has the model; none has it: pull it here
        where the server can (the router's lease on this load is held meanwhile), else fail,
        naming it and the models the fleet serves, and end this worker's lease on it."""
        fleet, spec = find_fleet(self.app), self.spec
        if fleet is None or spec is None:
            raise exc
        model = spec.model(args, kwargs)
        me = self.worker_settings().worker_id
        try:
            live = [hb for hb in fleet.registry.live_workers() if is_eligible(hb, spec.service)]
        except redis.RedisError:  # nobody to ask: the model's absence is the answer
            _drop_lease(fleet, model, me)
            raise exc from None
        tried = self._excluded() | {me}
        holders = [
            hb.worker_id
            for hb in live
            if hb.worker_id not in tried and model in (*hb.models_on_disk, *hb.models_in_memory)
        ]
        if holders:
            log.info("%s not on %s: routed again, away from it (%s have it)", model, me, holders)
            return self.retry(exc=exc, countdown=0, aiq_exclude=[me])
        try:
            pulled = model is not None and self._pull(spec.service, model)
        except ModelNotFoundError as nowhere:
            pulled, exc = False, nowhere
        except ServiceUnavailableError as failed:  # a pull cut short: retried, elsewhere too
            _drop_lease(fleet, model, me)
            raise self.retry(exc=failed) from None
        if pulled:  # the lease stays until this worker's heartbeat shows the model
            return super().__call__(*args, **kwargs)
        _drop_lease(fleet, model, me)  # no load is coming: this worker must not look busy
        served = sorted({m for hb in live for m in (*hb.models_on_disk, *hb.models_in_memory)})
        raise ModelNotFoundError(
            exc.url,
            f"{exc.reason}; no other live worker has {model!r} (the fleet's "
            f"{spec.service} models: {', '.join(served) or 'none'})",
        ) from None

    def _pull(self, service: str, model: str) -> bool:
        """Download ``model`` onto this worker's server, if its API can; whether it did."""
        settings = self.worker_settings()
        client, endpoint, server = self.server(service, settings)
        if not server.can_pull:
            return False
        log.info("%s is on no live worker: %s pulls it", model, endpoint.url)
        # Well before the broker would deliver the message again (Redis's visibility timeout,
        # RabbitMQ's 30-minute consumer timeout): a longer pull goes on at the next attempt,
        # which Ollama resumes.
        deadline_s = min(settings.visibility_timeout_s / 2, MAX_PULL_S)
        server.pull(client, endpoint, model, deadline_s=deadline_s)
        return True


def _drop_lease(fleet: Fleet, model: str | None, worker_id: str) -> None:
    if model is None:
        return
    try:
        fleet.registry.drop_lease(model, worker_id)
    except Exception as exc:  # it expires on its own
        log.warning("could not end the lease on loading %s: %s", model, exc)
