"""The Celery application: JSON only, the fleet router installed, worker hooks connected."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from celery import Celery

from coordinator.policies import make_policy
from coordinator.registry import Registry, redis_client
from coordinator.router import FleetRouter, lease_grace_s
from coordinator.settings import CoordinatorSettings

if TYPE_CHECKING:
    from worker_tasks.lifecycle import WorkerRuntime


class FleetApp(Celery):
    """A Celery app that carries the fleet's settings, registry and router.

    Holding them here, not in module globals, lets a test run several apps side by side.
    """

    settings: CoordinatorSettings
    registry: Registry
    router: FleetRouter
    runtime: WorkerRuntime | None = None
    """Set in a started worker's processes; ``None`` where tasks are only sent."""

    def close(self) -> None:
        """Write the router's buffered claims and decisions, then close as Celery does."""
        self.router.claims.flush()
        super().close()


def create_app(settings: CoordinatorSettings, *, main: str = "worker_tasks") -> FleetApp:
    """Build the app for ``settings``; nothing connects to Redis until it is used."""
    app = FleetApp(main, broker=settings.redis_url, backend=settings.redis_url)
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
    )
    app.conf.update(
        # JSON only: a pickled message would run code chosen by whoever can write to Redis.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_routes=(app.router,),
        task_default_queue=settings.keys.default_queue,
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
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        # Model calls are long; a worker must not hoard messages another worker could run.
        worker_prefetch_multiplier=1,
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        imports=("worker_tasks.tasks", "worker_tasks.jobs"),
    )
    from worker_tasks.lifecycle import install

    install(app)
    return app
