"""The reaper: moves the work of dead workers to live ones, so a crashed host costs time,
not tasks (but for kombu's own pop-then-record window on Redis; see docs/failure-modes.md).

A worker's own queue is consumed by that worker only. When it dies, what waits there would
wait forever (and on Redis, kombu's restore of its unacknowledged messages puts them back
into the same dead queue, after the visibility timeout). The reaper notices a worker whose
heartbeat key is gone (and stayed gone its grace) and moves every message waiting in its
queue, and on Redis every unacknowledged message taken from it, to the best live worker,
scored as usual, or to the service's shared queue when no live worker can take it
(:mod:`~coordinator.recovery.redis_moves`, :mod:`~coordinator.recovery.amqp_moves`). It also
routes the fleet's tasks out of Celery's default queue, where apps without the fleet router
send them. Broadcast shards go to another capable worker; a replicated broadcast job for
the dead worker is dropped and reported (its broadcast reports ``timeout`` for it).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

import redis
from celery import Celery

from coordinator.dispatch.app import Fleet, create_app, fleet_of
from coordinator.fleet.registry_entries import KnownWorker
from coordinator.recovery.amqp_moves import AmqpMessages
from coordinator.recovery.redis_moves import RedisMessages
from coordinator.recovery.report import ReapReport
from coordinator.recovery.targets import Targets

if TYPE_CHECKING:
    from coordinator.core.settings import CoordinatorSettings

log = logging.getLogger(__name__)

DRAINED_FOR_S: Final = 300.0
"""A gone worker's queue is drained this long: longer than a retry's longest backoff (60 s),
a router's snapshot, and RabbitMQ noticing a dead connection (its heartbeat, 60 s)."""
DEFAULT_GRACE_S: Final = 1.0
"""A gone heartbeat key is given this much more (at most one heartbeat interval) before
its worker is reaped: its TTL already covers missed heartbeats."""


class Messages(Protocol):
    """How messages move on one broker."""

    def reap(self, report: ReapReport, queue: str) -> None: ...

    def reroute_plain(self, report: ReapReport, queue: str) -> None: ...

    def retire(self, queue: str) -> None: ...


@dataclass
class Reaper:
    """Finds dead workers of ``app``'s fleet and moves their messages; one :meth:`scan` a
    second or so.

    A worker is dead once its heartbeat key is gone (its TTL passed without a heartbeat)
    and stays gone for its grace: ``grace_s`` when set, else the smaller of one second and
    the worker's own heartbeat interval, as its heartbeat states. So a dead worker's queued
    tasks run elsewhere about TTL + 2 s after its last heartbeat, whatever this process's
    own heartbeat settings are.
    """

    app: Celery
    grace_s: float | None = None
    clock: Callable[[], float] = time.monotonic
    move_delay_s: float = 0.0
    """Pause between two moves; only tests use it, to kill a reaper halfway."""
    fleet: Fleet = field(init=False)
    messages: Messages = field(init=False)
    _targets: Targets = field(init=False)
    _missing_since: dict[str, float] = field(default_factory=dict)
    _reachable_since: float | None = None
    _had_outage: bool = False
    _due_at: float = math.inf
    """When the next missing worker's grace ends (this reaper's clock)."""
    _warned: set[tuple[str, float | None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.fleet = fleet_of(self.app)
        self._targets = Targets(self.fleet)
        if self.fleet.settings.broker_is_redis:
            self.messages = RedisMessages(self.fleet, self._targets, self.move_delay_s)
        else:
            self.messages = AmqpMessages(self.app, self.fleet, self._targets, self.move_delay_s)

    def scan(self) -> list[ReapReport]:
        """Look for dead workers once and reap them, then route the fleet's tasks out of
        Celery's default queue.

        Dead is judged from this reaper's own observation while Redis answered throughout:
        a worker already missing when Redis comes back from an outage (when no worker could
        heartbeat) gets a TTL to heartbeat again. A heartbeat that exists but does not parse
        is alive: liveness is the key, not its contents.
        """
        now = self.clock()
        self._due_at = math.inf
        registry = self.fleet.registry
        try:
            known = registry.known_workers()
            alive = registry.alive(known)
        except redis.RedisError as exc:
            log.warning("reaper cannot read the registry, pausing judgement: %s", exc)
            self._missing_since.clear()
            self._reachable_since, self._had_outage = None, True
            return []
        if self._reachable_since is None:
            self._reachable_since = now
        for worker_id in list(self._missing_since):
            if worker_id in alive or worker_id not in known:
                del self._missing_since[worker_id]
        reports = []
        for worker_id, worker in sorted(known.items()):
            self._check_settings(worker_id, worker)
            if worker_id in alive:
                continue
            missing_since = self._missing_since.setdefault(worker_id, now)
            grace_s = self._grace_s(worker)
            ttl_s = worker.ttl_s or self.fleet.settings.ttl_s
            if self._had_outage and missing_since < self._reachable_since + ttl_s:
                # Silent while Redis was away, or since: a TTL to heartbeat again.
                grace_s = max(grace_s, ttl_s)
            due_at = max(missing_since, self._reachable_since) + grace_s
            if now >= due_at:
                reports.append(self.reap(worker_id))
                self._missing_since.pop(worker_id, None)
            else:
                self._due_at = min(self._due_at, due_at)
        self.drain_gone()
        self.reroute_plain()
        return reports

    def drain_gone(self) -> int:
        """Drain again the queues of workers reaped or shut down in the last
        :data:`DRAINED_FOR_S`: messages still arrive there (a retry's delayed delivery, a
        router with an older snapshot, messages a broker gives back once it notices a dead
        connection); afterwards their queues are retired. Returns how many were moved."""
        registry, wall = self.fleet.registry, time.time()
        gone = registry.gone_workers()
        back = registry.alive(gone)
        moved = 0
        for worker_id, since in sorted(gone.items()):
            queue = self.fleet.keys.worker_queue(worker_id)
            if worker_id in back or wall - since > DRAINED_FOR_S:
                registry.drop_gone(worker_id, back=worker_id in back)
                if worker_id not in back:
                    self.messages.retire(queue)
                continue
            report = ReapReport(worker_id)
            self.messages.reap(report, queue)
            if report.moved or report.dropped:
                self.fleet.router.claims.flush()
                log.warning("moved what reached gone worker %s late: %s", worker_id, report.moved)
            moved += sum(report.moved.values())
        return moved

    def reap(self, worker_id: str) -> ReapReport:
        """Move everything of a dead worker, then forget it."""
        report = ReapReport(worker_id)
        self._targets.refresh()
        self.messages.reap(report, self.fleet.keys.worker_queue(worker_id))
        self.fleet.router.claims.flush()
        self.fleet.registry.forget(worker_id)
        log.warning(
            "reaped dead worker %s: moved %s, dropped %d replicated broadcast job(s) %s",
            worker_id,
            report.moved or "nothing",
            len(report.dropped),
            report.dropped,
        )
        return report

    def reroute_plain(self) -> int:
        """Route the fleet's tasks out of Celery's default queue (``PLAIN_CELERY_QUEUE``),
        where an app without the fleet router sends them; other apps' tasks stay where they
        are, for their own workers. Returns how many were moved."""
        queue = self.fleet.settings.plain_celery_queue
        if not queue:
            return 0
        report = ReapReport(queue)
        self.messages.reroute_plain(report, queue)
        if report.moved:
            self.fleet.router.claims.flush()
            log.info("routed out of Celery's default queue %s: %s", queue, report.moved)
        return sum(report.moved.values())

    def run(self, interval_s: float, stop: threading.Event) -> None:
        """Scan every ``interval_s``, and when a missing worker's grace ends, until ``stop``
        is set."""
        while not stop.wait(min(interval_s, max(self._due_at - self.clock(), 0.05))):
            try:
                self.scan()
            except Exception:  # the reaper must outlive one bad pass
                log.exception("reaper pass failed")

    def _grace_s(self, worker: KnownWorker) -> float:
        if self.grace_s is not None:
            return self.grace_s
        return min(DEFAULT_GRACE_S, worker.interval_s or DEFAULT_GRACE_S)

    def _check_settings(self, worker_id: str, worker: KnownWorker) -> None:
        """Warn once when a worker heartbeats on another interval than this process's
        settings say: its own figures are used, but routers here assume theirs (leases)."""
        mine = self.fleet.settings.heartbeat_interval_s
        if worker.interval_s is None or worker.interval_s == mine:
            return
        if (worker_id, worker.interval_s) not in self._warned:
            self._warned.add((worker_id, worker.interval_s))
            log.warning(
                "worker %s heartbeats every %g s (TTL %g s) but HEARTBEAT_INTERVAL_S here is"
                " %g s: its own figures decide when it is dead; set the same everywhere",
                worker_id,
                worker.interval_s,
                worker.ttl_s or 0.0,
                mine,
            )


def run_reaper(settings: CoordinatorSettings, *, interval_s: float | None = None) -> None:
    """``coordinator reaper``: scan every ``interval_s`` (default: ``REAPER_INTERVAL_S``)
    until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    app = create_app(settings, main="reaper")
    stop = threading.Event()
    log.info("reaper watching namespace %s", settings.namespace)
    try:
        Reaper(app, settings.reaper_grace_s).run(interval_s or settings.reaper_interval_s, stop)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        fleet_of(app).close()
