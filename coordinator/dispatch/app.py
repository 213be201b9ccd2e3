"""Any Celery app made a fleet app: JSON only, the fleet router on publish and, in a
``celery worker``, the fleet worker's runtime::

    app = Celery("myapp")
    coordinator.install(app)  # settings from the environment (docs/configuration.md)

    @app.task(service="vllm", default_model="llama3.2")
    def summarize(text: str, model: str | None = None) -> str: ...

``celery -A myapp worker`` then joins the fleet: it heartbeats, probes its model servers and
consumes its own queue, and ``summarize.delay(text, model="qwen2.5")`` is routed like the
built-in ``generate``. A process that only sends tasks needs nothing more than this module.
"""

from __future__ import annotations

import random
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from weakref import WeakKeyDictionary

from celery import Celery
from celery.app import app_or_default
from celery.utils.functional import maybe_list

from coordinator.core.errors import ConfigError
from coordinator.core.keys import Keys
from coordinator.core.settings import CoordinatorSettings, load_settings
from coordinator.dispatch.router import FleetRouter
from coordinator.fleet.registry import Registry, redis_client
from coordinator.routing import make_policy
from coordinator.routing.interface import lease_grace_s

WORKER_MODULES: Final = (
    "worker_tasks.lifecycle",
    "worker_tasks.tasks",
    "worker_tasks.job_handlers",
)
"""What a fleet worker imports as it starts (Celery's ``imports``): its runtime, the built-in
tasks and the broadcast jobs. Named, not imported: the coordinator never imports the worker
(a process that sends tasks does not need it), Celery's worker does."""


@dataclass(frozen=True)
class Fleet:
    """What makes a Celery app a fleet app: the fleet's settings, registry and router.

    Kept beside the app rather than in module globals, so a process (a test) can hold
    several fleets side by side.
    """

    settings: CoordinatorSettings
    registry: Registry
    router: FleetRouter

    @property
    def keys(self) -> Keys:
        """The fleet's key and queue names."""
        return self.settings.keys

    @classmethod
    def from_settings(cls, settings: CoordinatorSettings, app: Celery | None = None) -> Fleet:
        """The fleet of ``settings``, routing ``app``'s tasks by what they declare (without
        an app: as the workers declared them); nothing connects to Redis until it is used."""
        registry = Registry(
            redis_client(settings.registry_redis_url, settings.redis_timeout_s),
            settings.keys,
            settings.ttl_s,
        )
        router = FleetRouter(
            registry=registry,
            policy=make_policy(settings.routing_policy, settings.score_weights),
            refresh_s=settings.registry_refresh_s,
            decisions_kept=settings.decisions_kept,
            decisions_per_s=settings.decisions_per_s,
            rng=random.Random(settings.routing_seed),
            lease_grace_s=lease_grace_s(settings.heartbeat_interval_s),
            claim_lapse_s=settings.visibility_timeout_s,
        )
        if app is not None:
            router.tasks.local_task = _task_lookup(app)
        return cls(settings, registry, router)

    def close(self) -> None:
        """Write the router's buffered claims and decisions."""
        self.router.claims.flush()


_fleets: WeakKeyDictionary[Celery, Fleet] = WeakKeyDictionary()
_fleets_lock = threading.Lock()


def install(
    app: Celery, settings: CoordinatorSettings | None = None, *, make_default: bool = True
) -> Fleet:
    """Make ``app`` a fleet app, with ``settings`` (default: from the environment).

    Sets the app's broker and result backend to the fleet's Redis, JSON only, the fleet
    router before the app's own ``task_routes``, and the worker modules to import in
    ``celery worker``; call it after configuring the app. With ``make_default`` the app is
    Celery's default app in every thread, so ``.delay()`` from a thread that did not build
    it (a web server's pool) is routed by it rather than by Celery's fallback app (no
    router, broker ``amqp://localhost``). Installing twice returns the first fleet.

    Raises:
        ConfigError: a setting in the environment is invalid, or the app was installed with
            other settings.
    """
    with _fleets_lock:
        fleet = _fleets.get(app)
        if fleet is None:
            fleet = Fleet.from_settings(settings or load_settings(CoordinatorSettings), app)
            _configure(app, fleet)
            _fleets[app] = fleet
        elif settings is not None and settings != fleet.settings:
            raise ConfigError(f"Celery app {app.main!r} is a fleet app already, other settings")
    if make_default:
        app.set_default()
    return fleet


def _task_lookup(app: Celery) -> Callable[[str], object]:
    # Weak: the router must not keep its app alive (the fleets map holds apps weakly).
    ref = weakref.ref(app)

    def lookup(name: str) -> object:
        found = ref()
        try:
            return None if found is None else found.tasks.get(name)
        except RuntimeError:  # autofinalize=False, not finalized: as Celery, do not force it
            return None

    return lookup


def find_fleet(app: Celery) -> Fleet | None:
    """The fleet ``app`` was installed with, if any."""
    return _fleets.get(app)


def fleet_of(app: Celery) -> Fleet:
    """The fleet ``app`` was installed with.

    Raises:
        ConfigError: ``app`` is not a fleet app.
    """
    fleet = _fleets.get(app)
    if fleet is None:
        raise ConfigError(f"Celery app {app.main!r} is not a fleet app: coordinator.install(app)")
    return fleet


def create_app(
    settings: CoordinatorSettings, *, main: str = "worker_tasks", set_as_current: bool = True
) -> Celery:
    """A new fleet app for ``settings`` (``set_as_current``: also Celery's current and
    default app)."""
    app = Celery(main, set_as_current=set_as_current)
    install(app, settings, make_default=set_as_current)
    return app


def _configure(app: Celery, fleet: Fleet) -> None:
    settings = fleet.settings
    # Celery takes one route or module name as well as a list of them.
    own_routes = tuple(maybe_list(app.conf.task_routes) or ())
    imports = tuple(maybe_list(app.conf.imports) or ())
    app.conf.update(
        broker_url=settings.broker,
        result_backend=settings.redis_url,
        imports=(*imports, *(m for m in WORKER_MODULES if m not in imports)),
        # JSON only: a pickled message would run code chosen by whoever can write to Redis.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_routes=(fleet.router, *own_routes),
        task_default_queue=settings.keys.default_queue,
        # Remote control (revoke, inspect, refresh) on the fleet's own exchange: one Redis
        # may host several fleets, and a revoke must reach this one only.
        control_exchange=settings.keys.control_exchange,
        # Which worker ran a task is part of its result.
        result_extended=True,
        # A result read after this is PENDING, as if the task never ran: RESULT_EXPIRES_S.
        result_expires=settings.result_expires_s,
        # A Redis restart between the model call and the result write must not fail the
        # task (the model call is done): retry the write, with backoff, for about 2 minutes.
        result_backend_always_retry=True,
        result_backend_max_retries=20,
        # Results live under the namespace too, so one Redis can host several fleets.
        result_backend_transport_options={"global_keyprefix": f"{settings.namespace}:"},
        # At least once: a message is acknowledged after its task ran, so a worker that
        # dies mid-task leaves it unacknowledged for the reaper (or kombu's restore) to
        # deliver again; the model tasks and rag_ingestion are safe to run twice.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Model calls are long; a worker must not hoard messages another worker could run.
        worker_prefetch_multiplier=1,
        # No STARTED state: nothing reads it, and it cost every task a second result write
        # (a GET, then SET and PUBLISH) in the pool child.
        task_track_started=False,
        # Task events (received, started, succeeded: three Redis PUBLISHes per task from
        # the main process, the largest per-task cost) only while someone watches: Flower
        # switches them on as it runs; `celery control enable_events` or `worker -E` too.
        worker_send_task_events=False,
        # No task-sent event either: it is a second publish (a second Redis client and round
        # trip) for every task, which halved the publish rate, and no control command can
        # switch it back on. Flower sees a task from the worker's events once received.
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        **(_redis_broker(settings) if settings.broker_is_redis else _rabbitmq_broker()),
    )


def _redis_broker(settings: CoordinatorSettings) -> dict[str, Any]:
    return {
        "broker_transport_options": {
            # Longer than any task (model calls time out after MODEL_TIMEOUT_S, a model pull
            # gives up at half of it), or a running task would be delivered a second time.
            "visibility_timeout": settings.visibility_timeout_s,
            # Named by the fleet (kombu's public transport options), so that the reaper
            # knows where to look and fleets sharing a Redis do not share them.
            "unacked_key": settings.keys.unacked,
            "unacked_index_key": settings.keys.unacked_index,
            "unacked_mutex_key": settings.keys.unacked_mutex,
        }
    }


def _rabbitmq_broker() -> dict[str, Any]:
    # Quorum queues (replicated, and what RabbitMQ recommends for durable work) for every
    # queue, the ones the router creates on the fly included; each gets a topic exchange of
    # its own, so that a countdown (a retry's backoff) waits in RabbitMQ's delayed-delivery
    # exchanges rather than in a worker's memory. A consumer's connection that dies gives
    # its unacknowledged messages back at once: no visibility timeout to configure.
    return {
        "task_default_queue_type": "quorum",
        "task_create_missing_queue_type": "quorum",
        "task_create_missing_queue_exchange_type": "topic",
        "task_default_exchange_type": "topic",
        "broker_transport_options": {"confirm_publish": True},
    }


_default: Celery | None = None
_default_lock = threading.Lock()


def default_app() -> Celery:
    """The fleet app of this process: Celery's current app when it is a fleet app (a worker's,
    or one the application installed), else one built once from the environment.

    The one built here is made Celery's default app, so that a task sent from any thread
    finds it rather than Celery's fallback app (broker ``amqp://localhost``, no router).
    """
    global _default
    current = app_or_default()
    if current in _fleets:
        return current
    with _default_lock:
        if _default is None:
            _default = create_app(load_settings(CoordinatorSettings))
        return _default
