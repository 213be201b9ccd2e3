"""The Celery router: ranks the live fleet with a routing policy and sends each model task
to one worker's queue; when that starts a model load, it takes the model's lease first."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import redis
from celery import signals

from coordinator.core.keys import Keys
from coordinator.core.task_spec import TaskSpec
from coordinator.dispatch.pools import KEPT_CANDIDATES, PoolKey, Pools
from coordinator.dispatch.route import Route
from coordinator.dispatch.task_lookup import TaskLookup
from coordinator.fleet import counters
from coordinator.fleet.claims import (
    CLAIM_HEADER,
    ClaimBuffer,
    Unsent,
    UnsentClaims,
    claim_header,
    new_claim_id,
    parse_claim,
)
from coordinator.fleet.fleet_view import FleetView
from coordinator.fleet.registry import Registry
from coordinator.routing import Breakdown, CostPolicy, Policy
from coordinator.routing.decisions import DecisionBudget, Outcome, decision_json
from coordinator.routing.demand import Demand, decayed, merged
from coordinator.routing.interface import MIN_LEASE_GRACE_S

log = logging.getLogger(__name__)

Clock = Callable[[], float]

WARN_EVERY_S: Final = 10.0


@dataclass
class FleetRouter:
    """A Celery router (``task_routes = [FleetRouter(...)]``) for the model tasks.

    It ranks a registry snapshot at most ``refresh_s`` old with its ``policy`` and adds
    each task to the chosen worker's in-flight count at once in its own view, so a burst
    spreads over equal workers instead of herding onto the one the last heartbeat
    favoured. The counts reach Redis in batches (:class:`ClaimBuffer`), where the other
    publishers pick them up, and the worker takes its count down when the task finishes.

    When the chosen worker would have to load the model (the policy's
    :meth:`~coordinator.routing.Policy.starts_load`), the router first takes that model's
    lease in Redis, so that a model in memory nowhere is loaded by one worker while the
    tasks that follow, from every publisher, queue behind that load, unless the policy
    estimates a second copy to be faster. The lease is a compare-and-set on the holders the
    router knew of: when another router got there first, it re-ranks once with the fresh
    holders and routes whatever wins then.

    Redis errors never escape: the task goes to its service's shared queue (or, when only
    the lease failed, to the chosen worker all the same) and the router leaves Redis alone
    for ``retry_after_s``.
    """

    registry: Registry
    policy: Policy[Any] = field(default_factory=CostPolicy)
    refresh_s: float = 1.0
    decisions_kept: int = 1000
    decisions_per_s: float = 100.0
    """Decisions kept at most per second, in bursts of as many; above it, a sample: at a
    few thousand tasks a second, a record of each would cost more than ranking them, and
    ``decisions_kept`` would hold less than a second of them anyway."""
    retry_after_s: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    clock: Clock = time.monotonic
    wall_clock: Clock = time.time
    lease_grace_s: float = MIN_LEASE_GRACE_S
    """A lease is void this long after its load should be done (see :func:`lease_grace_s`)."""
    claim_lapse_s: float = 3600.0
    """A claim whose message nothing releases (lost) stops counting after this long."""
    demand: Demand = field(default_factory=Demand)
    """The models this router has been asked for. A policy may add copies of the busy ones;
    it sees the fleet's demand over every publisher (counted in Redis with the claims), or
    this router's own where that is larger (Redis away, a batch not written yet)."""

    tasks: TaskLookup = field(init=False, repr=False)
    """What each task declares (the router's :meth:`task_spec`)."""
    claims: ClaimBuffer = field(init=False, repr=False)
    view: FleetView = field(init=False, repr=False)
    """The fleet as this router has read it: a refresh reads only what changed."""
    pools: Pools = field(init=False, repr=False)
    """The candidates per service and model, from the last refresh."""
    _refreshed_at: float = field(default=float("-inf"), init=False, repr=False)
    _budget: DecisionBudget = field(init=False, repr=False)
    _down_until: float = field(default=float("-inf"), init=False, repr=False)
    _last_warning: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    unsent: UnsentClaims = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.claims = ClaimBuffer(self.registry, self.decisions_kept, self.claim_lapse_s)
        self.claims.demand_tau_s = self.demand.tau_s
        self.view = FleetView(self.registry)
        self._budget = DecisionBudget(self.decisions_per_s)
        self.pools = Pools(self.policy, self.rng)
        self.unsent = UnsentClaims(self.claims)
        self.tasks = TaskLookup(self.registry, refresh_s=self.refresh_s, clock=self.clock)
        # Weak: the signal must not keep a discarded router (a test's, a CLI's) alive.
        signals.after_task_publish.connect(self._published, weak=True)

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
        """Celery's router protocol: a route for tasks that declare a ``service``, ``None``
        for everything else."""
        if options.get("queue"):
            self._drop_copied_claim(options)
            return None  # the caller chose a queue: theirs wins
        spec = self.task_spec(name, task)
        if spec is None:
            return None
        route = self.route(name, spec.service, spec.model(args, kwargs))
        # The caller's options win over a route's keys, headers included, so the claim goes
        # into the options' headers: a new dict, because the caller may send its own again.
        headers = {k: v for k, v in (options.get("headers") or {}).items() if k != CLAIM_HEADER}
        if route.claim is not None:
            headers[CLAIM_HEADER] = claim_header(route.claim)
        options["headers"] = headers
        return {"queue": route.queue}

    def _drop_copied_claim(self, options: MutableMapping[str, Any]) -> None:
        """Drop a claim header this router did not just give (a retry sent to a queue of the
        caller's choosing copies the last attempt's): the message is not counted, and work
        stealing leaves a message without a claim where its caller sent it."""
        headers = options.get("headers") or {}
        claim = parse_claim(headers.get(CLAIM_HEADER))
        if claim is not None and not self.unsent.holds(claim[1]):
            options["headers"] = {k: v for k, v in headers.items() if k != CLAIM_HEADER}

    def task_spec(self, name: str, task: object = None) -> TaskSpec | None:
        """What task ``name`` declares (see :meth:`TaskLookup.spec`)."""
        return self.tasks.spec(name, task)

    def confirm(self, claim_id: str | None) -> None:
        """Count a routed message's claim in Redis: its message was published (see
        :class:`Route`)."""
        if claim_id is not None:
            self.unsent.confirm(claim_id)

    def _published(self, headers: Mapping[str, Any] | None = None, **_: Any) -> None:
        # Celery's after_task_publish, sent in the publishing thread once the broker took
        # the message: only then does its claim count.
        claim = parse_claim((headers or {}).get(CLAIM_HEADER))
        if claim is not None:
            self.unsent.confirm(claim[1])

    def route(
        self, task: str, service: str, model: str | None, exclude: frozenset[str] = frozenset()
    ) -> Route:
        """Choose the queue for one task and count it against the chosen worker.

        Safe from any number of threads (a web server's pool, a worker's chord bodies): one
        decision at a time reads and changes the router's view. Never raises: whatever goes
        wrong, the task goes to its service's shared queue, because a publish must not fail
        for routing's sake. Workers in ``exclude`` are not considered (one that just said it
        does not have the model).
        """
        started = time.perf_counter()
        try:
            with self._lock:
                return self._route(task, service, model, started, exclude)
        except Exception as exc:  # logged with its traceback by _fallback, rate-limited
            return self._fallback(task, service, model, "fallback_error", started, exc)

    def _route(
        self, task: str, service: str, model: str | None, started: float, exclude: frozenset[str]
    ) -> Route:
        now = self.clock()
        if model is not None:
            self.demand.record(model, now)
            self.claims.ask(model)
        if now < self._down_until:
            return self._fallback(task, service, model, "fallback_registry_down", started)
        try:
            pool = self._pool((service, model), now)
        except redis.RedisError as exc:
            self._down_until = now + self.retry_after_s
            return self._fallback(task, service, model, "fallback_registry_down", started, exc)
        keep = self._keep_decision(now)
        limit = KEPT_CANDIDATES if keep else 1
        ranked, chosen, eligible = self.pools.rank((service, model), pool, exclude, limit)
        if chosen is None:
            return self._fallback(task, service, model, "fallback_no_worker", started)
        load = self.policy.starts_load(chosen, ranked[0])
        if load is not None:
            ranked, chosen, eligible = self._lease_or_rerank(
                service, model, load, (ranked, chosen, eligible), exclude
            )
        winner, heartbeat = ranked[0], chosen.heartbeat
        # Never the queue a heartbeat names: a forged one would collect tasks nobody reads.
        queue = self.keys.worker_queue(winner.worker_id)
        self.pools.routed(winner.worker_id)
        decision = (
            self._decision(task, service, model, "routed", queue, ranked, eligible)
            if keep
            else None
        )
        # A hit is a model in memory: one on disk still costs a load, which is what the
        # hit ratio exists to show.
        hit = model in heartbeat.models_in_memory if model is not None else None
        latency_s = time.perf_counter() - started
        counts = counters.routed(self.keys, winner.worker_id, service, hit, latency_s)
        claim = (winner.worker_id, new_claim_id())
        self.unsent.hold(Unsent(claim, decision, counts, now))
        log.info(
            "routed %s (model %s) to %s, %s %.3f, best of %d",
            task,
            model,
            winner.worker_id,
            self.policy.name,
            winner.total,
            eligible,
        )
        if log.isEnabledFor(logging.DEBUG):
            for score in ranked:
                log.debug("  candidate %s", score.as_dict())
        return Route(queue, *claim)

    def _keep_decision(self, now: float) -> bool:
        return self.decisions_kept > 0 and self._budget.keep(now)

    def refresh(self) -> None:
        """Take a registry snapshot now instead of reusing one up to ``refresh_s`` old."""
        with self._lock:
            self._refresh(self.clock())

    def explain(self, service: str, model: str | None) -> list[Breakdown]:
        """How every eligible worker ranks right now, best first: the router's own decision,
        on its pools as a routed task would find them after a refresh (its leases, in-flight
        counts and demand; figures up to ``Pools.rebuild_s`` old), without the random
        tiebreak; claims nothing and takes no lease."""
        with self._lock:
            now = self.clock()
            self._refresh(now)
            pool = self._pool((service, model), now)
            return self.policy.rank(pool, in_flight=self.pools.in_flight)

    def _pool(self, key: PoolKey, now: float) -> list[Any]:
        if self.pools.snapshot is None or now - self._refreshed_at >= self.refresh_s:
            self._refresh(now)
        return self.pools.pool(key, self.wall_clock())

    def _lease_or_rerank(
        self,
        service: str,
        model: str | None,
        load: tuple[str, float],
        decision: tuple[list[Breakdown], Any, int],
        exclude: frozenset[str],
    ) -> tuple[list[Breakdown], Any, int]:
        """Take the lease ``chosen`` needs to load ``load``'s model before routing to it.

        Refused (another router's load is news to this one): rank once more with the
        fresh holders, and take the lease the new winner needs in turn, if any; refused
        again, or Redis failing, route anyway: a load too many costs less than a task
        bounced around. Returns the ranking, candidate and eligible count to route by.
        """
        _, chosen, _ = decision
        if self._take_lease(load, chosen.heartbeat.worker_id) is not False:
            return decision
        # Same snapshot, fresh holders: never empty, and no Redis call on the way.
        key = (service, model)
        decision = self.pools.rank(key, self.pools.prepare(key, self.wall_clock()), exclude)
        ranked, chosen, _ = decision
        again = self.policy.starts_load(chosen, ranked[0])
        if again is not None and self._take_lease(again, chosen.heartbeat.worker_id) is False:
            log.info(
                "lease on loading %s refused twice: %s loads it all the same",
                again[0],
                chosen.heartbeat.worker_id,
            )
        return decision

    def _take_lease(self, load: tuple[str, float], worker_id: str) -> bool | None:
        """Whether the lease on ``worker_id`` loading ``load`` was granted; ``None`` when
        Redis failed (the router then backs off as after any registry error)."""
        model, ready_in_s = load
        now = self.wall_clock()
        ready_at = now + ready_in_s
        expected = frozenset(self.pools.leases.get(model, ()))
        try:
            result = self.registry.acquire_lease(
                model, worker_id, ready_at, ready_at + self.lease_grace_s, expected, now
            )
        except redis.RedisError as exc:
            self._down_until = self.clock() + self.retry_after_s
            self._warn(
                "lease",
                "lease on loading %s not taken (%s): %s loads it unannounced",
                model,
                type(exc).__name__,
                worker_id,
            )
            return None
        self.pools.leased(model, result.holders, worker_id, now)
        return result.granted

    def _refresh(self, now: float) -> None:
        self.unsent.prune(now)
        self.claims.flush()
        wall = self.wall_clock()
        update = self.view.refresh(wall)
        # Claims still buffered (Redis refused the flush) are part of the load all the same.
        in_flight = dict(update.snapshot.in_flight)
        for worker_id, count in self.claims.pending().items():
            in_flight[worker_id] = in_flight.get(worker_id, 0) + count
        shared = decayed(update.demand, wall, self.demand.tau_s)
        demand = merged(shared, self.demand.rates(now))
        self.pools.update(update, in_flight, demand, now, wall)
        self._refreshed_at = now

    def _decision(
        self,
        task: str,
        service: str,
        model: str | None,
        outcome: Outcome,
        queue: str,
        ranked: Sequence[Breakdown] = (),
        eligible: int = 0,
        reason: str | None = None,
    ) -> str:
        where = (task, service, model, outcome, queue)
        return decision_json(self.wall_clock(), self.policy.name, where, ranked, eligible, reason)

    def _fallback(
        self,
        task: str,
        service: str,
        model: str | None,
        outcome: Outcome,
        started: float,
        error: Exception | None = None,
    ) -> Route:
        queue = self.keys.service_queue(service)
        if outcome == "fallback_no_worker":
            reason = f"no live worker offers {service!r}"
        elif outcome == "fallback_error":
            reason = f"routing failed: {type(error).__name__}: {error}"
        else:
            reason = f"registry unreachable: {type(error).__name__ if error else 'backing off'}"
        self._warn(
            service + outcome,
            "%s for %s (model %s): sent to shared queue %s",
            reason,
            task,
            model,
            queue,
            exc_info=error if outcome == "fallback_error" else None,
        )
        decision = (
            self._decision(task, service, model, outcome, queue, reason=reason)
            if outcome != "fallback_registry_down" and self._keep_decision(self.clock())
            else None
        )
        label = outcome.removeprefix("fallback_")
        latency_s = time.perf_counter() - started
        self.claims.add(None, decision, counters.fell_back(self.keys, service, label, latency_s))
        return Route(queue, None)

    def _warn(
        self, topic: str, message: str, *args: object, exc_info: Exception | None = None
    ) -> None:
        # A fleet-wide outage, or a bug hit by every task, would log this once per task;
        # once per topic per interval says the same thing.
        now = self.clock()
        if now - self._last_warning.get(topic, float("-inf")) >= WARN_EVERY_S:
            self._last_warning[topic] = now
            log.warning(message, *args, exc_info=exc_info)
