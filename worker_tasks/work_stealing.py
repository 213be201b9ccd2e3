"""Work stealing, the worker's side: when this worker has a free slot and nothing waits in
its own queue, it takes waiting tasks from the longest queue of a peer, those it can run
without loading a model (the moves: :mod:`coordinator.recovery.stealing`).

A thread of the worker's main process, where Celery keeps the requests it holds, started
and stopped with the heartbeat (``lifecycle.py``). Every ``WORK_STEALING_INTERVAL_S`` it
makes one Redis call: it posts its own backlog on the fleet's board and, when idle, reads
the longest backlogs; only when one holds a task it can run does it read and move
messages. After a steal it looks again as soon as a slot frees, not an interval later: a
burst's tail of short tasks is drained by batches, not one task per interval.

What it runs: a routed task of its own code (a broadcast job is meant for its addressee
alone), of a service this worker offers and finds healthy, whose model is in its memory or
that names none, unless an earlier attempt found this worker without that model
(``aiq_excluded``). A stolen task never causes a cold load.

The claim carried by the message moves with it, to this worker (see the moves' module):
the routers count the task against the worker that runs it, and the outcome hooks release
it here by the id in the rewritten header, as for any other task.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import redis
from celery import Celery
from celery.worker import state

from coordinator.core.errors import ConfigError, TaskInputError
from coordinator.core.settings import WorkerSettings
from coordinator.core.task_spec import TaskSpec, normalize_model
from coordinator.dispatch.app import Fleet
from coordinator.recovery.stealing import RedisStealing, supported
from worker_tasks.probes import ProbeResult

log = logging.getLogger(__name__)

EAGER_TICK_S: Final = 0.02
"""After a steal, how often the (in-process) free-slot check runs: the next look follows
the next free slot by this much at most."""
WARN_EVERY_S: Final = 30.0


@dataclass(frozen=True, slots=True)
class Step:
    """What one look did."""

    stolen: int
    waiting: int
    """Messages waiting in this worker's own queue."""


@dataclass
class WorkStealer:
    """Looks for waiting tasks to take while this worker is idle, on a thread of its own."""

    settings: WorkerSettings
    moves: RedisStealing
    specs: Mapping[str, TaskSpec]
    """The routed tasks of this worker's code."""
    probe: Callable[[], ProbeResult]
    """What this worker's services have, as last probed (the heartbeat sender's)."""
    free_slots: Callable[[], int]
    excluded_header: str = "aiq_excluded"
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _warned_at: float = field(default=-WARN_EVERY_S, init=False)

    def start(self) -> None:
        """Look every ``WORK_STEALING_INTERVAL_S`` from now on."""
        self._thread = threading.Thread(target=self._run, name="work-stealing", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop looking and leave the board (what was stolen stays in this worker's queue,
        consumed until the worker stops, then moved on by the reaper like the rest)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.redis_timeout_s * 4 + 1)
        try:
            self.moves.leave()
        except redis.RedisError as exc:  # the board entry lapses with the board
            log.debug("work stealing: board entry left behind: %s", exc)

    def step(self, free: int) -> Step:
        """One look: post this worker's backlog; when it has ``free`` slots and nothing
        waits in its queue, steal from the first of the longest backlogs that holds a task
        it runs."""
        look = self.moves.look(idle=free > 0)
        if free <= 0 or look.waiting > 0:
            return Step(0, look.waiting)
        for victim, waiting in look.backlogs:
            stolen = self.moves.steal(victim, waiting, self.wanted)
            if stolen:
                log.info("work stealing: took %d waiting task(s) from %s", stolen, victim)
                return Step(stolen, 0)
        return Step(0, 0)

    def wanted(
        self, task: str, args: list[Any], kwargs: dict[str, Any], headers: Mapping[str, Any]
    ) -> bool:
        """Whether this worker runs the task now, without loading a model."""
        spec = self.specs.get(task)
        if spec is None:
            return False
        excluded = headers.get(self.excluded_header)
        if isinstance(excluded, list) and self.settings.worker_id in excluded:
            return False
        probed = self.probe()
        offered = self.settings.worker_capabilities
        if not probed.services_status.get(spec.service) or (
            offered is not None and spec.service not in offered
        ):
            return False
        try:
            model = spec.model(args, kwargs)
        except TaskInputError:  # it fails where it was sent, with that reason
            return False
        return model is None or model in {normalize_model(m) for m in probed.models_in_memory}

    def _run(self) -> None:
        eager = False  # someone had a backlog a moment ago: look as soon as a slot frees
        while not self._stop.is_set():
            free = self.free_slots()
            if eager and free <= 0:
                self._stop.wait(EAGER_TICK_S)
                continue
            try:
                step = self.step(free)
            except Exception as exc:  # the thread must outlive Redis outages and bad looks
                self._warn(exc)
                step = Step(0, 0)
            eager = step.stolen > 0 or (eager and step.waiting > 0)
            self._stop.wait(EAGER_TICK_S if eager else self.settings.work_stealing_interval_s)

    def _warn(self, exc: Exception) -> None:
        """Log a failed look, once per :data:`WARN_EVERY_S` (a Redis outage lasts)."""
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            unexpected = not isinstance(exc, redis.RedisError)
            log.warning("work stealing: look failed: %s", exc, exc_info=unexpected)


def start_stealer(
    app: Celery, fleet: Fleet, settings: WorkerSettings, consumer: Any, probe: Callable[[], Any]
) -> WorkStealer | None:
    """Start work stealing for this worker (``consumer``: Celery's, for its pool), or
    ``None`` when it is off (``WORK_STEALING``) or the broker does not allow it."""
    if not settings.work_stealing:
        return None
    if not supported(settings):
        log.info("work stealing is off: it needs the Redis broker, in the registry's Redis")
        return None
    # model_task imports lifecycle, which imports this module: read once all are loaded.
    from worker_tasks.model_task import EXCLUDED_HEADER

    stealer = WorkStealer(
        settings=settings,
        moves=RedisStealing(
            fleet.registry.client,
            fleet.keys,
            settings.worker_id,
            claim_lapse_s=fleet.router.claim_lapse_s,
        ),
        specs=_routed_specs(app),
        probe=probe,
        free_slots=_free_slots(consumer),
        excluded_header=EXCLUDED_HEADER,
    )
    stealer.start()
    return stealer


def _routed_specs(app: Celery) -> dict[str, TaskSpec]:
    specs = {}
    for name, task in app.tasks.items():
        try:
            spec = TaskSpec.of(task)
        except ConfigError:  # refused at start-up already; never stolen
            continue
        if spec is not None:
            specs[name] = spec
    return specs


def _free_slots(consumer: Any) -> Callable[[], int]:
    """Slots of the pool not holding a request (running or reserved), by Celery's own
    bookkeeping in this process; none once a shutdown has begun."""
    pool = consumer.pool

    def free() -> int:
        if state.should_stop not in (None, False) or state.should_terminate not in (None, False):
            return 0
        return int(pool.num_processes or 1) - len(state.reserved_requests)

    return free
