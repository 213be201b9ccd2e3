"""The Celery router: scores the live fleet and sends each model task to one worker's queue."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import redis

from coordinator import metrics
from coordinator.catalog import detect_required_model, task_spec
from coordinator.claims import CLAIM_HEADER, ClaimBuffer
from coordinator.decisions import Outcome
from coordinator.keys import Keys
from coordinator.registry import Registry, Snapshot
from coordinator.scoring import Candidate, ScoreBreakdown, Weights, candidates, rank_candidates

log = logging.getLogger(__name__)

Clock = Callable[[], float]

KEPT_CANDIDATES: Final = 5
"""Breakdowns kept per decision in Redis; ``explain`` shows the whole fleet."""

WARN_EVERY_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class Route:
    """Where one task goes, and whose in-flight count it was added to (``None``: nobody's)."""

    queue: str
    worker_id: str | None


@dataclass
class FleetRouter:
    """A Celery router (``task_routes = [FleetRouter(...)]``) for the model tasks.

    It scores a registry snapshot at most ``refresh_s`` old and adds each task to the
    chosen worker's in-flight count at once in its own view, so a burst spreads over equal
    workers instead of herding onto the one the last heartbeat favoured. The counts reach
    Redis in batches (:class:`ClaimBuffer`), where the other publishers pick them up, and
    the worker takes its count down when the task finishes.

    Redis errors never escape: the task goes to its service's shared queue and the router
    leaves Redis alone for ``retry_after_s``.
    """

    registry: Registry
    weights: Weights = field(default_factory=Weights)
    refresh_s: float = 1.0
    decisions_kept: int = 1000
    retry_after_s: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    clock: Clock = time.monotonic
    wall_clock: Clock = time.time

    claims: ClaimBuffer = field(init=False, repr=False)
    _snapshot: Snapshot | None = field(default=None, init=False, repr=False)
    _snapshot_at: float = field(default=float("-inf"), init=False, repr=False)
    _pools: dict[tuple[str, str | None], list[Candidate]] = field(
        default_factory=dict, init=False, repr=False
    )
    _in_flight: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _down_until: float = field(default=float("-inf"), init=False, repr=False)
    _last_warning: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.claims = ClaimBuffer(self.registry, self.decisions_kept)

    @property
    def keys(self) -> Keys:
        """The namespace's key and queue names."""
        return self.registry.keys

    def __call__(
        self,
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        options: MutableMapping[str, Any],
        task: Any = None,
        **_: Any,
    ) -> dict[str, Any] | None:
        """Celery's router protocol: a route for model tasks, ``None`` for everything else."""
        spec = task_spec(name)
        if spec is None or options.get("queue"):
            return None  # not ours, or the caller chose a queue: theirs wins
        route = self.route(name, spec.service, detect_required_model(name, kwargs))
        result: dict[str, Any] = {"queue": route.queue}
        if route.worker_id is not None:
            # The caller's options win over a route's keys, headers included, so a caller's
            # own headers get the claim added in place.
            headers = options.get("headers")
            if isinstance(headers, dict):
                headers[CLAIM_HEADER] = route.worker_id
            else:
                result["headers"] = {CLAIM_HEADER: route.worker_id}
        return result

    def route(self, task: str, service: str, model: str | None) -> Route:
        """Choose the queue for one task and count it against the chosen worker."""
        started = time.perf_counter()
        now = self.clock()
        if now < self._down_until:
            return self._fallback(task, service, model, "fallback_registry_down", started)
        try:
            pool = self._pool(service, model, now)
        except redis.RedisError as exc:
            self._down_until = now + self.retry_after_s
            return self._fallback(task, service, model, "fallback_registry_down", started, exc)
        ranked = rank_candidates(
            pool,
            weights=self.weights,
            in_flight=self._in_flight,
            rng=self.rng,
            limit=KEPT_CANDIDATES,
        )
        if not ranked:
            return self._fallback(task, service, model, "fallback_no_worker", started)
        winner = ranked[0]
        queue = next(self._queue_of(c) for c in pool if c.heartbeat.worker_id == winner.worker_id)
        self._in_flight[winner.worker_id] = self._in_flight.get(winner.worker_id, 0) + 1
        decision = (
            self._decision(task, service, model, "routed", queue, ranked, len(pool))
            if self.decisions_kept > 0
            else None
        )
        hit = winner.model_loaded > 0 if model is not None else None
        latency_s = time.perf_counter() - started
        counts = metrics.routed(self.keys, winner.worker_id, service, hit, latency_s)
        self.claims.add(winner.worker_id, decision, counts)
        log.info(
            "routed %s (model %s) to %s, score %.1f, best of %d",
            task,
            model,
            winner.worker_id,
            winner.total,
            len(pool),
        )
        if log.isEnabledFor(logging.DEBUG):
            for score in ranked:
                log.debug("  candidate %s", score.as_dict())
        return Route(queue, winner.worker_id)

    def refresh(self) -> None:
        """Take a registry snapshot now instead of reusing one up to ``refresh_s`` old."""
        with self._lock:
            self._refresh(self.clock())

    def explain(self, service: str, model: str | None) -> list[ScoreBreakdown]:
        """How every eligible worker scores right now, best first; claims nothing."""
        snapshot = self.registry.snapshot()
        pool = candidates(snapshot.heartbeats, service, model, self.weights)
        return rank_candidates(pool, weights=self.weights, in_flight=snapshot.in_flight)

    def _pool(self, service: str, model: str | None, now: float) -> list[Candidate]:
        if self._snapshot is None or now - self._snapshot_at >= self.refresh_s:
            with self._lock:
                if self._snapshot is None or now - self._snapshot_at >= self.refresh_s:
                    self._refresh(now)
        key = (service, model)
        pool = self._pools.get(key)
        if pool is None:
            assert self._snapshot is not None
            pool = candidates(self._snapshot.heartbeats, service, model, self.weights)
            self._pools[key] = pool
        return pool

    def _refresh(self, now: float) -> None:
        self.claims.flush()
        snapshot = self.registry.snapshot()
        # Claims still buffered (Redis refused the flush) are part of the load all the same.
        in_flight = dict(snapshot.in_flight)
        for worker_id, count in self.claims.pending().items():
            in_flight[worker_id] = in_flight.get(worker_id, 0) + count
        self._snapshot, self._snapshot_at, self._pools = snapshot, now, {}
        self._in_flight = in_flight

    def _queue_of(self, c: Candidate) -> str:
        return c.heartbeat.queue or self.keys.worker_queue(c.heartbeat.worker_id)

    def _decision(
        self,
        task: str,
        service: str,
        model: str | None,
        outcome: Outcome,
        queue: str,
        ranked: Sequence[ScoreBreakdown] = (),
        eligible: int = 0,
        reason: str | None = None,
    ) -> str:
        """The decision as stored: JSON of a :class:`~coordinator.decisions.Decision`,
        built without pydantic and with breakdowns as rows, because it runs for every task."""
        return json.dumps(
            {
                "at": self.wall_clock(),
                "task": task,
                "service": service,
                "model": model,
                "outcome": outcome,
                "queue": queue,
                "worker_id": ranked[0].worker_id if ranked else None,
                "eligible": eligible,
                "candidates": [score.as_row() for score in ranked],
                "reason": reason,
            },
            separators=(",", ":"),
        )

    def _fallback(
        self,
        task: str,
        service: str,
        model: str | None,
        outcome: Outcome,
        started: float,
        error: Exception | None = None,
    ) -> Route:
        now = self.clock()
        queue = self.keys.service_queue(service)
        if outcome == "fallback_no_worker":
            reason = f"no live worker offers {service!r}"
        else:
            reason = f"registry unreachable: {type(error).__name__ if error else 'backing off'}"
        # A fleet-wide outage would log this once per task; once per service per interval
        # says the same thing.
        if now - self._last_warning.get(service + outcome, float("-inf")) >= WARN_EVERY_S:
            self._last_warning[service + outcome] = now
            log.warning("%s for %s (model %s): sent to shared queue %s", reason, task, model, queue)
        if outcome == "fallback_no_worker" and self.decisions_kept > 0:
            self.claims.add(
                None, self._decision(task, service, model, outcome, queue, reason=reason)
            )
        return Route(queue, None)
