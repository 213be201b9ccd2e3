"""The fleet's Celery app: JSON only, the fleet router installed on publish.

A worker process builds on it (:func:`worker_tasks.create_worker_app` adds the task modules
and the worker's start, heartbeat and shutdown hooks); a process that only sends tasks
needs nothing more than this.
"""

from __future__ import annotations

import random
import threading
from typing import Any, Self

from celery import Celery
from celery.app import app_or_default
from celery.result import AsyncResult

from coordinator.core.settings import CoordinatorSettings, load_settings
from coordinator.dispatch.router import FleetRouter
from coordinator.fleet.registry import Registry, redis_client
from coordinator.routing import make_policy
from coordinator.routing.interface import lease_grace_s


class FleetApp(Celery):
    """A Celery app that carries the fleet's settings, registry and router.

    Holding them here, not in module globals, lets a test run several apps side by side.
    """

    settings: CoordinatorSettings
    registry: Registry
    router: FleetRouter

    @classmethod
    def from_settings(
        cls,
        settings: CoordinatorSettings,
        *,
        main: str = "worker_tasks",
        set_as_current: bool = True,
    ) -> Self:
        """Build the app for ``settings``; nothing connects to Redis until it is used.

        With ``set_as_current`` the app is Celery's current app in this thread and its
        default app in every other, so ``.delay()`` from any thread of the application
        (a web server's pool, a chord body in a worker) is routed by it: Celery's current
        app is per thread, and elsewhere falls back to an app with no router.
        """
        app = cls(
            main,
            broker=settings.redis_url,
            backend=settings.redis_url,
            set_as_current=set_as_current,
        )
        app.settings = settings
        app.registry = Registry(
            redis_client(settings.registry_redis_url, settings.redis_timeout_s),
            settings.keys,
            settings.ttl_s,
        )
        app.router = FleetRouter(
            registry=app.registry,
            policy=make_policy(settings.routing_policy, settings.score_weights),
            refresh_s=settings.registry_refresh_s,
            decisions_kept=settings.decisions_kept,
            rng=random.Random(settings.routing_seed),
            lease_grace_s=lease_grace_s(settings.heartbeat_interval_s),
            claim_lapse_s=settings.visibility_timeout_s,
        )
        _configure(app, settings)
        if set_as_current:
            app.set_default()
        return app

    def send_task(self, name: str, *args: Any, **options: Any) -> AsyncResult[Any]:
        """Celery's ``send_task`` (which ``delay`` and ``apply_async`` call): a message that
        could not be published gives back the claim its route took."""
        with self.router.publishing():
            return super().send_task(name, *args, **options)

    def close(self) -> None:
        """Write the router's buffered claims and decisions, then close as Celery does."""
        self.router.claims.flush()
        super().close()


def create_app(
    settings: CoordinatorSettings, *, main: str = "worker_tasks", set_as_current: bool = True
) -> FleetApp:
    """A fleet app for a process that sends tasks (see :meth:`FleetApp.from_settings`)."""
    return FleetApp.from_settings(settings, main=main, set_as_current=set_as_current)


def _configure(app: FleetApp, settings: CoordinatorSettings) -> None:
    app.conf.update(
        # JSON only: a pickled message would run code chosen by whoever can write to Redis.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_routes=(app.router,),
        task_default_queue=settings.keys.default_queue,
        # Remote control (revoke, inspect, refresh) on the fleet's own exchange: one Redis
        # may host several fleets, and a revoke must reach this one only.
        control_exchange=settings.keys.control_exchange,
        # Which worker ran a task is part of its result.
        result_extended=True,
        result_expires=24 * 3600,
        # Results live under the namespace too, so one Redis can host several fleets.
        result_backend_transport_options={"global_keyprefix": f"{settings.namespace}:"},
        # At least once: a message is acknowledged after its task ran, so a worker that
        # dies mid-task leaves it unacknowledged for the reaper (or kombu's restore) to
        # deliver again; the model tasks and rag_ingestion are safe to run twice.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Longer than any task (model calls time out after MODEL_TIMEOUT_S), or a running
        # task would be delivered a second time while it runs.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Named by the fleet (kombu's public transport options), so that the reaper
            # knows where to look and fleets sharing a Redis do not share them.
            "unacked_key": settings.keys.unacked,
            "unacked_index_key": settings.keys.unacked_index,
            "unacked_mutex_key": settings.keys.unacked_mutex,
        },
        # Model calls are long; a worker must not hoard messages another worker could run.
        worker_prefetch_multiplier=1,
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
    )


_default: FleetApp | None = None
_default_lock = threading.Lock()


def default_app() -> FleetApp:
    """The fleet app of this process: Celery's current app when it is a fleet app (a worker's,
    or one the application built), else one built once from the environment.

    The one built here is made Celery's default app, so that a task sent from any thread
    finds it rather than Celery's fallback app (broker ``amqp://localhost``, no router).
    """
    global _default
    current = app_or_default()
    if isinstance(current, FleetApp):
        return current
    with _default_lock:
        if _default is None:
            _default = create_app(load_settings(CoordinatorSettings))
        return _default
