"""The reaper: moves the work of dead workers to live ones, so a crashed host costs time,
not tasks (but for kombu's own pop-then-record window; see docs/failure-modes.md).

A worker's own queue is consumed by that worker only. When it dies, what waits there would
wait forever, and kombu's restore of its unacknowledged messages puts them back into the
same dead queue (after the visibility timeout). The reaper notices a worker whose
heartbeat expired (and stayed away ``grace_s`` more), and moves every message waiting in
its queue and every unacknowledged message taken from it to the best live worker, scored
as usual, or to the service's shared queue when no live worker can take it.

Each message moves in one Lua call that removes exactly that message from where it was and
pushes the rewritten one where it goes, so a reaper that dies halfway loses or doubles
nothing, and two reapers never both move one message. The rewrite points the message's
delivery info at its new queue (a later restore sends it there, not back) and its claim
header at its new worker. Broadcast shards go to another capable worker; a replicated
broadcast job for the dead worker is dropped and reported (its broadcast reports
``timeout`` for that worker).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from coordinator.broadcast.client import RUN_JOB, select_recipients
from coordinator.broadcast.job_types import JOB_TYPES
from coordinator.core.heartbeat import Heartbeat
from coordinator.dispatch.app import Fleet
from coordinator.dispatch.router import Route
from coordinator.fleet.claims import CLAIM_HEADER, claim_header
from coordinator.fleet.lua import lua_script

if TYPE_CHECKING:
    from coordinator.core.settings import CoordinatorSettings

log = logging.getLogger(__name__)


@dataclass
class ReapReport:
    """What happened to one dead worker's messages."""

    worker_id: str
    moved: dict[str, int] = field(default_factory=dict)
    """Target queue -> messages moved there."""
    dropped: list[str] = field(default_factory=list)
    """Task ids of replicated broadcast jobs addressed to the dead worker."""
    lost_race: int = 0
    """Messages another reaper (or the worker itself) took first."""


@dataclass
class Reaper:
    """Finds dead workers and moves their messages; one :meth:`scan` per interval."""

    fleet: Fleet
    grace_s: float
    clock: Callable[[], float] = time.monotonic
    move_delay_s: float = 0.0
    """Pause between two moves; only tests use it, to kill a reaper halfway."""
    _missing_since: dict[str, float] = field(default_factory=dict)
    _live: list[Heartbeat] = field(default_factory=list)
    """The live fleet as read once at the start of a reap, for broadcast shards."""
    _reachable_since: float | None = None

    def __post_init__(self) -> None:
        client = self.fleet.registry.client
        self._move_queued = client.register_script(lua_script("move_queued"))
        self._move_unacked = client.register_script(lua_script("move_unacked"))

    def scan(self) -> list[ReapReport]:
        """Look for dead workers once and reap them.

        A worker is dead when it is known but has no live heartbeat, and has stayed so for
        ``grace_s`` of this reaper's own observation while Redis answered throughout: after
        an outage of Redis (when no worker could heartbeat) everyone gets a fresh grace.
        """
        now = self.clock()
        registry = self.fleet.registry
        try:
            known = registry.known_workers()
            live = {hb.worker_id for hb in registry.live_workers()}
        except redis.RedisError as exc:
            log.warning("reaper cannot read the registry, pausing judgement: %s", exc)
            self._missing_since.clear()
            self._reachable_since = None
            return []
        if self._reachable_since is None:
            self._reachable_since = now
        for worker_id in list(self._missing_since):
            if worker_id in live or worker_id not in known:
                del self._missing_since[worker_id]
        reports = []
        for worker_id, queue in sorted(known.items()):
            if worker_id in live:
                continue
            since = max(self._missing_since.setdefault(worker_id, now), self._reachable_since)
            if now - since >= self.grace_s:
                reports.append(self.reap(worker_id, queue))
                self._missing_since.pop(worker_id, None)
        return reports

    def reap(self, worker_id: str, queue: str) -> ReapReport:
        """Move everything of a dead worker: its unacknowledged messages, then its queue."""
        report = ReapReport(worker_id)
        client = self.fleet.registry.client
        # The router's snapshot may be older than the heartbeat's expiry: it could still
        # list the dead worker and send its messages straight back.
        self.fleet.router.refresh()
        self._live = self.fleet.registry.live_workers()
        for tag, entry in client.hscan_iter(self.fleet.keys.unacked):
            try:
                payload, _, routing_key = json.loads(entry)
            except (ValueError, TypeError):
                continue
            if routing_key == queue:
                self._move(report, payload, old=str(entry), tag=str(tag))
        # Oldest first: kombu pushes on the left and consumers pop on the right.
        for raw in reversed(client.lrange(queue, 0, -1)):
            try:
                payload = json.loads(raw)
            except ValueError:
                log.warning("reaper: unreadable message in %s left in place", queue)
                continue
            self._move(report, payload, old=str(raw), source=queue)
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

    def run(self, interval_s: float, stop: threading.Event) -> None:
        """Scan every ``interval_s`` until ``stop`` is set."""
        while not stop.wait(interval_s):
            try:
                self.scan()
            except Exception:  # the reaper must outlive one bad pass
                log.exception("reaper pass failed")

    def _move(
        self,
        report: ReapReport,
        payload: dict[str, Any],
        *,
        old: str,
        source: str = "",
        tag: str | None = None,
    ) -> None:
        """Move one message found in list ``source`` or under unacked delivery ``tag``."""
        target = self._target(payload)
        queue, new = (target.queue if target else ""), _rewrite(payload, target)
        if self.move_delay_s:
            time.sleep(self.move_delay_s)
        if tag is not None:
            keys = self.fleet.keys
            moved = self._move_unacked(
                keys=[keys.unacked, keys.unacked_index, queue], args=[tag, old, new]
            )
        else:
            moved = self._move_queued(keys=[source, queue], args=[old, new])
        if moved != 1:
            report.lost_race += 1  # not ours to move after all: its claim is never confirmed
            return
        if target is None:
            report.dropped.append(str(payload.get("headers", {}).get("id")))
        else:
            self.fleet.router.confirm(target.claim_id)
            report.moved[target.queue] = report.moved.get(target.queue, 0) + 1

    def _target(self, payload: dict[str, Any]) -> Route | None:
        """Where a dead worker's message goes; ``None`` drops it."""
        headers = payload.get("headers") or {}
        task = str(headers.get("task", ""))
        keys = self.fleet.keys
        spec = self.fleet.router.task_spec(task)
        if spec is not None:
            return self.fleet.router.route(task, spec.service, spec.model(*_body(payload)))
        if task == RUN_JOB:
            args = _body(payload)[0]
            job = JOB_TYPES.get(args[0]) if args else None
            if job is None or job.mode == "replicated":
                return None
            capability = args[4] if len(args) > 4 else None
            live = select_recipients(self._live, capability)
            if not live:
                return Route(keys.default_queue, None)
            best = min(live, key=lambda hb: hb.active_requests)
            return Route(best.queue or keys.worker_queue(best.worker_id), None)
        return Route(keys.default_queue, None)


def _body(payload: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """A Celery (protocol 2) message's positional and keyword arguments."""
    try:
        body = payload["body"]
        if payload.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _ = json.loads(body)
    except (KeyError, ValueError, TypeError):
        return [], {}
    return list(args), dict(kwargs)


def _rewrite(payload: dict[str, Any], target: Route | None) -> str:
    """The message pointed at its new queue and worker; '' when it is dropped."""
    if target is None:
        return ""
    moved = json.loads(json.dumps(payload))
    headers = moved.setdefault("headers", {})
    headers.pop(CLAIM_HEADER, None)
    if target.claim is not None:
        headers[CLAIM_HEADER] = claim_header(target.claim)
    properties = moved.setdefault("properties", {})
    properties["delivery_info"] = {"exchange": target.queue, "routing_key": target.queue}
    return json.dumps(moved)


def run_reaper(settings: CoordinatorSettings, *, interval_s: float | None = None) -> None:
    """``coordinator reaper``: scan every ``interval_s`` (default: the heartbeat interval)
    until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fleet = Fleet.from_settings(settings)
    stop = threading.Event()
    log.info("reaper watching namespace %s", settings.namespace)
    try:
        Reaper(fleet, settings.grace_s).run(interval_s or settings.heartbeat_interval_s, stop)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        fleet.close()
