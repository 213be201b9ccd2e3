"""What a fleet worker does at start and at shutdown, through Celery's signals.

Imported by every ``celery worker`` of a fleet app (:func:`coordinator.install` lists it in
Celery's ``imports``); its hooks act for fleet apps only, so a process may hold others.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import redis
from celery import Celery, signals
from celery.worker import state
from celery.worker.control import control_command

from coordinator.broadcast.client import CONTROL_COMMANDS
from coordinator.core.errors import ConfigError, HeartbeatError, ServiceError
from coordinator.core.heartbeat import parse_heartbeat
from coordinator.core.settings import REDIS_SCHEMES, WorkerSettings, load_settings, redact_url
from coordinator.core.task_spec import TaskSpec
from coordinator.dispatch.app import Fleet, find_fleet
from coordinator.recovery.redis_moves import requeue_unacked
from worker_tasks import model_servers, outcomes, system
from worker_tasks.chroma_server import ChromaServer
from worker_tasks.heartbeat_sender import HeartbeatSender
from worker_tasks.model_stats import ModelStats
from worker_tasks.work_stealing import WorkStealer, start_stealer

log = logging.getLogger(__name__)

__all__ = ["WorkerRuntime", "outcomes", "runtime_of"]  # outcomes: its hooks, one per outcome


@dataclass
class WorkerRuntime:
    """This worker process's identity, heartbeat and model statistics; set at start-up."""

    settings: WorkerSettings
    queue: str
    heartbeat: HeartbeatSender
    stats: ModelStats
    """Where tasks record their model calls; the heartbeat reports it."""
    chroma: ChromaServer | None = None
    stealer: WorkStealer | None = None
    """Work stealing's thread, started with the heartbeat (``None``: off)."""


def _active_requests() -> int:
    # Kept by Celery in the worker's main process for every pool, solo included.
    return len(state.active_requests)


_runtimes: WeakKeyDictionary[Celery, WorkerRuntime] = WeakKeyDictionary()
_queues_chosen: WeakKeyDictionary[Celery, bool] = WeakKeyDictionary()


def runtime_of(app: Celery) -> WorkerRuntime | None:
    """The runtime of ``app``'s started worker in this process; ``None`` where tasks are only
    sent (or run eagerly)."""
    return _runtimes.get(app)


def _own_queues(fleet: Fleet, settings: WorkerSettings, capabilities: tuple[str, ...]) -> list[str]:
    keys = fleet.keys
    return [
        keys.worker_queue(settings.worker_id),
        *(keys.service_queue(service) for service in capabilities),
        keys.default_queue,
    ]


def _publish_task_specs(app: Celery, fleet: Fleet) -> list[str]:
    """Declare the routed tasks this worker runs, for processes without their code."""
    specs = {name: spec for name, task in app.tasks.items() if (spec := TaskSpec.of(task))}
    try:
        fleet.registry.publish_task_specs(specs)
    except redis.RedisError as exc:  # the other workers declare the same tasks
        log.warning("routed tasks not declared to the registry: %s", exc)
    return sorted(specs)


def _take_back_unacked(
    app: Celery, fleet: Fleet, settings: WorkerSettings, started_at: float
) -> None:
    """A restart under the same id (a new incarnation) finds what the last one was running
    unacknowledged: requeued now, not after the visibility timeout, unless the last one may
    still run (another live process with this id: its tasks must not run twice)."""
    scheme = str(app.conf.broker_url or "").partition("://")[0]
    if scheme not in REDIS_SCHEMES:
        return
    queue = fleet.keys.worker_queue(settings.worker_id)
    try:
        holder = _other_live_holder(fleet, settings)
        if holder is not None:
            log.error("%s: its unacknowledged messages are left to it", holder)
            return
        moved = requeue_unacked(fleet, queue, delivered_before=started_at)
    except redis.RedisError as exc:  # kombu restores them after the visibility timeout
        log.warning("the previous run's unacknowledged messages stay for now: %s", exc)
        return
    if moved:
        log.warning("%d message(s) the previous run took and never finished: requeued", moved)


def _other_live_holder(fleet: Fleet, settings: WorkerSettings) -> str | None:
    """Who else may be running under this worker id, from the id's last heartbeat: a
    process still alive on this host, or one on another host that heartbeated within its
    TTL; ``None`` when the last run is dead (or there was none)."""
    raw = fleet.registry.client.get(fleet.keys.worker(settings.worker_id))
    try:
        last = parse_heartbeat(raw, settings.worker_id) if raw else None
    except HeartbeatError:
        return None
    if last is None or last.pid is None or last.host is None:
        return None
    here = socket.gethostname()[:128]
    if last.host == here:
        if last.pid != os.getpid() and _pid_alive(last.pid):
            return f"worker id {settings.worker_id} is in use here by process {last.pid}"
        return None
    ttl_s = last.ttl_s or settings.ttl_s
    if last.timestamp is not None and time.time() - last.timestamp < ttl_s:
        return f"worker id {settings.worker_id} heartbeats from host {last.host} too"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def start(app: Celery, fleet: Fleet) -> WorkerRuntime:
    """Load worker settings, probe the services and choose the queues to consume."""
    try:
        settings = load_settings(WorkerSettings)
        routed = _publish_task_specs(app, fleet)
    except ConfigError as exc:
        # SystemExit, because Celery logs and ignores ordinary errors from signal handlers.
        raise SystemExit(f"worker cannot start: {exc}") from None
    # httpx logs every probe at INFO: one line per service per heartbeat is noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    tier = settings.worker_tier or system.detect_tier()
    chroma = None
    if settings.served_chromadb_url is not None:
        chroma = ChromaServer(
            settings.chromadb_path,
            settings.chromadb_host,
            settings.chromadb_port,
            settings.served_chromadb_url,
        )
        try:
            chroma.start()
        except ServiceError as exc:
            raise SystemExit(f"worker cannot start: {exc}") from None
    queue = fleet.keys.worker_queue(settings.worker_id)
    _take_back_unacked(app, fleet, settings, time.time())
    # Made before the pool forks, so that prefork children inherit its pipe.
    stats = ModelStats()
    sender = HeartbeatSender(
        settings=settings,
        registry=fleet.registry,
        tier=tier,
        queue=queue,
        active_requests=_active_requests,
        stats=stats,
    )
    capabilities = sender.capabilities(sender.refresh_probes())
    queues = app.amqp.queues
    # With -Q (seen by celeryd_init) the operator's choice of queues stands.
    if not _queues_chosen.get(app, False):
        queues.select(_own_queues(fleet, settings, capabilities))
    elif queue not in queues.consume_from:
        log.warning("queue %s is not consumed (-Q): the router's tasks will wait there", queue)
    log.info(
        "worker %s (tier %s, specialization %s, capabilities %s, registry %s) consumes %s",
        settings.worker_id,
        tier,
        settings.worker_specialization,
        ",".join(capabilities) or "none",
        redact_url(fleet.settings.registry_redis_url),
        ",".join(sorted(queues.consume_from)),
    )
    log.info("routed tasks: %s", ", ".join(routed) or "none")
    runtime = WorkerRuntime(
        settings=settings, queue=queue, heartbeat=sender, stats=stats, chroma=chroma
    )
    _runtimes[app] = runtime
    return runtime


@signals.celeryd_init.connect
def _init(sender: str, instance: Any, options: dict[str, Any], **_: Any) -> None:
    if find_fleet(instance.app) is not None:
        _queues_chosen[instance.app] = bool(options.get("queues"))


@signals.celeryd_after_setup.connect
def _after_setup(sender: str, instance: Any, **_: Any) -> None:
    fleet = find_fleet(instance.app)
    if fleet is not None:
        start(instance.app, fleet)


@signals.worker_ready.connect
def _ready(sender: Any, **_: Any) -> None:
    runtime = _runtimes.get(sender.app)
    if runtime is not None:
        runtime.heartbeat.start()
        fleet = find_fleet(sender.app)
        if fleet is not None:  # started with the heartbeat, given the consumer (its pool)
            probe = runtime.heartbeat.latest_probe
            runtime.stealer = start_stealer(sender.app, fleet, runtime.settings, sender, probe)


@signals.worker_shutdown.connect
def _shutdown(sender: Any, **_: Any) -> None:
    runtime = _runtimes.pop(sender.app, None)
    if runtime is not None:
        if runtime.stealer is not None:  # before the worker leaves the fleet
            runtime.stealer.stop()
        runtime.heartbeat.stop(deregister=True)
        runtime.stats.close()
        if runtime.chroma is not None:
            runtime.chroma.stop()
        model_servers.close_clients()


@signals.worker_process_shutdown.connect
def _pool_child_shutdown(**_: Any) -> None:
    # A prefork child's pooled client: its kept-alive connections closed, not left to exit.
    model_servers.close_clients()


@control_command(name=CONTROL_COMMANDS["refresh"])
def aiq_refresh(state: Any) -> dict[str, str]:
    """Probe the model services and heartbeat now (after a broadcast changed what is loaded).

    A remote-control command (sent by :func:`coordinator.broadcast.send_control`): Celery runs
    it in the worker's main process whatever the pool, where the heartbeat and probe threads
    live; a task would run in a prefork child, whose copy of the sender has no threads.
    """
    runtime = _runtimes.get(state.consumer.app)
    if runtime is None:
        return {"ok": "no fleet runtime here"}
    runtime.heartbeat.refresh_soon()
    return {"ok": "refreshing"}
