"""What a worker does at start, per task and at shutdown, through Celery's signals."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import signals
from celery.worker import state

from coordinator.core.errors import ConfigError, ServiceError
from coordinator.core.settings import WorkerSettings, load_settings
from coordinator.fleet.registry import redact_url
from worker_tasks import outcomes, system
from worker_tasks.chroma_server import ChromaServer
from worker_tasks.heartbeat_sender import HeartbeatSender
from worker_tasks.model_stats import ModelStats

if TYPE_CHECKING:
    from worker_tasks.worker_app import WorkerApp

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    """This worker process's identity, heartbeat and model statistics; set at start-up."""

    settings: WorkerSettings
    queue: str
    heartbeat: HeartbeatSender
    stats: ModelStats
    """Where tasks record their model calls; the heartbeat reports it."""
    chroma: ChromaServer | None = None


def _active_requests() -> int:
    # Kept by Celery in the worker's main process for every pool, solo included.
    return len(state.active_requests)


def _own_queues(
    app: WorkerApp, settings: WorkerSettings, capabilities: tuple[str, ...]
) -> list[str]:
    keys = app.settings.keys
    return [
        keys.worker_queue(settings.worker_id),
        *(keys.service_queue(service) for service in capabilities),
        keys.default_queue,
    ]


def start(app: WorkerApp, instance: Any) -> WorkerRuntime:
    """Load worker settings, probe the services and choose the queues to consume."""
    try:
        settings = load_settings(WorkerSettings)
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
    queue = app.settings.keys.worker_queue(settings.worker_id)
    # Made before the pool forks, so that prefork children inherit its pipe.
    stats = ModelStats()
    sender = HeartbeatSender(
        settings=settings,
        registry=app.registry,
        tier=tier,
        queue=queue,
        active_requests=_active_requests,
        stats=stats,
    )
    capabilities = sender.capabilities(sender.refresh_probes())
    queues = app.amqp.queues
    # With -Q (seen by celeryd_init) the operator's choice of queues stands.
    if not app.queues_chosen:
        queues.select(_own_queues(app, settings, capabilities))
    elif queue not in queues.consume_from:
        log.warning("queue %s is not consumed (-Q): the router's tasks will wait there", queue)
    log.info(
        "worker %s (tier %s, specialization %s, capabilities %s, registry %s) consumes %s",
        settings.worker_id,
        tier,
        settings.worker_specialization,
        ",".join(capabilities) or "none",
        redact_url(app.settings.registry_redis_url),
        ",".join(sorted(queues.consume_from)),
    )
    runtime = WorkerRuntime(
        settings=settings, queue=queue, heartbeat=sender, stats=stats, chroma=chroma
    )
    app.runtime = runtime
    return runtime


def install(app: WorkerApp) -> None:
    """Connect the worker hooks of ``app``; harmless in processes that only send tasks."""
    outcomes.install(app)

    @signals.celeryd_init.connect(weak=False)
    def _init(sender: str, instance: Any, options: dict[str, Any], **_: Any) -> None:
        if instance.app is app:
            app.queues_chosen = bool(options.get("queues"))

    @signals.celeryd_after_setup.connect(weak=False)
    def _after_setup(sender: str, instance: Any, **_: Any) -> None:
        if instance.app is app:
            start(app, instance)

    @signals.worker_ready.connect(weak=False)
    def _ready(sender: Any, **_: Any) -> None:
        runtime = app.runtime
        if sender.app is app and runtime is not None:
            runtime.heartbeat.start()

    @signals.worker_shutdown.connect(weak=False)
    def _shutdown(sender: Any, **_: Any) -> None:
        runtime, app.runtime = app.runtime, None
        if runtime is not None:
            runtime.heartbeat.stop(deregister=True)
            runtime.stats.close()
            if runtime.chroma is not None:
                runtime.chroma.stop()
