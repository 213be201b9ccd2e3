"""What one router knows of the fleet between refreshes: per service and model, the
policy's pool of candidates, kept in order for a keyed policy, and the loads, leases and
demand they were built from. Not thread-safe: the router calls it under its lock."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from coordinator.fleet.fleet_view import FleetUpdate
from coordinator.fleet.registry import Snapshot
from coordinator.routing import Breakdown, Policy
from coordinator.routing.demand import moved
from coordinator.routing.interface import KeyedPolicy
from coordinator.routing.ranking import Ranking

KEPT_CANDIDATES: Final = 3
"""Breakdowns kept per decision in Redis (the winner and two runners-up); ``explain``
shows the whole fleet."""

PoolKey = tuple[str, str | None]
"""(service, model)"""


@dataclass
class Pools:
    """The pools of one router, built lazily from the last refresh and dropped when what
    they depend on changes (heartbeats, leases, demand); loads alone only re-place the
    workers whose count moved."""

    policy: Policy[Any]
    rng: random.Random
    rebuild_s: float = 5.0
    """How long pools may keep a worker's older figures (load, timings, server metrics) and
    an older demand before they are rebuilt: at a thousand workers heartbeating every 30 s,
    some heartbeat is new at every refresh, and rebuilding every pool each time would cost
    more than all the decisions in between. Who is live, healthy and holds which model, and
    the leases, rebuild them at once."""
    snapshot: Snapshot | None = None
    in_flight: dict[str, int] = field(default_factory=dict)
    """The snapshot's in-flight counts, plus what this router routed since."""
    leases: dict[str, dict[str, float]] = field(default_factory=dict)
    """The snapshot's leases, with the ones this router took or learnt of since."""
    demand: dict[str, float] = field(default_factory=dict)
    """The demand the pools were prepared with."""
    _built_at: float = field(default=float("-inf"), repr=False)
    _stale_figures: bool = field(default=False, repr=False)
    _pools: dict[PoolKey, list[Any]] = field(default_factory=dict, repr=False)
    _rankings: dict[PoolKey, Ranking[Any]] = field(default_factory=dict, repr=False)

    def update(
        self,
        fleet: FleetUpdate,
        in_flight: dict[str, int],
        demand: dict[str, float],
        now: float,
        wall: float,
    ) -> None:
        """Take in a refresh at ``now`` (the router's clock; ``wall``: unix s): the fleet,
        the loads and the demand."""
        snapshot = fleet.snapshot
        self._stale_figures |= fleet.figures_changed or moved(self.demand, demand)
        # Compared with the leases the pools were built with, this router's own included: a
        # lease it took is news to Redis, not to its pools.
        before, self.leases = self.leases, {m: dict(held) for m, held in snapshot.leases.items()}
        if (
            fleet.workers_changed
            or self.snapshot is None
            or (self._stale_figures and now - self._built_at >= self.rebuild_s)
        ):
            self._pools, self._rankings, self.demand = {}, {}, demand
            self._built_at, self._stale_figures = now, False
        else:
            self._with_leases(_moved_holders(before, self.leases), wall)
            for worker_id in in_flight.keys() | self.in_flight.keys():
                if in_flight.get(worker_id, 0) != self.in_flight.get(worker_id, 0):
                    for ranking in self._rankings.values():
                        ranking.update(worker_id, in_flight)
        self.snapshot, self.in_flight = snapshot, in_flight

    def pool(self, key: PoolKey, now: float) -> list[Any]:
        """The policy's candidates for ``key`` (``now``: unix s, for the leases)."""
        pool = self._pools.get(key)
        return self.prepare(key, now) if pool is None else pool

    def prepare(self, key: PoolKey, now: float) -> list[Any]:
        """The pool for ``key`` built anew from the snapshot and the lease view."""
        assert self.snapshot is not None
        service, model = key
        pool = self.policy.prepare(
            self.snapshot.heartbeats,
            service,
            model,
            leases=self.leases,
            now=now,
            demand=self.demand,
        )
        self._pools[key] = pool
        return pool

    def rank(
        self, key: PoolKey, pool: list[Any], exclude: frozenset[str], limit: int = KEPT_CANDIDATES
    ) -> tuple[list[Breakdown], Any, int]:
        """The best ``limit`` breakdowns, the winning candidate (``None``: nobody eligible)
        and how many were eligible; a keyed policy's pool stays ordered between
        decisions."""
        policy = self.policy
        if isinstance(policy, KeyedPolicy):
            ranking = self._rankings.get(key)
            if ranking is None or ranking.pool is not pool:
                ranking = self._rankings[key] = Ranking(policy, pool, self.in_flight, self.rng)
            top = ranking.top(self.in_flight, limit, exclude)
            ranked = [policy.breakdown(c, n) for c, n in top]
            eligible = len(pool) - sum(1 for w in exclude if w in ranking)
            return ranked, top[0][0] if top else None, eligible
        if exclude:
            pool = [c for c in pool if c.heartbeat.worker_id not in exclude]
        ranked = policy.rank(pool, in_flight=self.in_flight, rng=self.rng, limit=limit)
        if not ranked:
            return ranked, None, 0
        chosen = next(c for c in pool if c.heartbeat.worker_id == ranked[0].worker_id)
        return ranked, chosen, len(pool)

    def routed(self, worker_id: str) -> None:
        """Count a task this router sent to ``worker_id``."""
        self.in_flight[worker_id] = self.in_flight.get(worker_id, 0) + 1

    def leased(self, model: str, holders: dict[str, float], worker_id: str, now: float) -> None:
        """``model``'s lease holders are now ``holders``, after ``worker_id`` asked for one
        (``now``: unix s). When it got it, only its candidates change, and a keyed policy
        builds them alone (:meth:`KeyedPolicy.with_leases`): a burst that adds copies of a
        model takes a lease per copy, and preparing the pools again for each would cost
        O(fleet). The rest of the pools' view follows at the next rebuild. Refused, the
        model's pools go (the holders this router did not know of)."""
        self.leases[model] = holders
        if worker_id in holders:
            self._with_leases({worker_id}, now)
            self._stale_figures = True
        else:
            self._drop(model)

    def _with_leases(self, workers: set[str], now: float) -> None:
        """Put in every pool the candidates of ``workers`` under the current leases (a load
        makes a worker busy whatever the model); a pool the policy cannot patch goes."""
        if not workers:
            return
        policy = self.policy
        for key in list(self._pools):
            pool, ranking = self._pools[key], self._rankings.get(key)
            present = [w for w in workers if ranking is not None and w in ranking]
            fresh = [
                policy.with_leases(pool, w, self.leases, now)
                if isinstance(policy, KeyedPolicy)
                else None
                for w in present
            ]
            if ranking is None or any(c is None for c in fresh):
                del self._pools[key]
                self._rankings.pop(key, None)
                continue
            for candidate in fresh:
                ranking.replace(candidate, self.in_flight)

    def _drop(self, model: str) -> None:
        """Forget the pools for ``model``: they are built again when next needed."""
        for key in [k for k in self._pools if k[1] == model]:
            del self._pools[key]
            self._rankings.pop(key, None)


def _moved_holders(
    old: Mapping[str, Mapping[str, float]], new: Mapping[str, Mapping[str, float]]
) -> set[str]:
    """The workers whose leases differ between ``old`` and ``new`` (model -> holders)."""
    moved: set[str] = set()
    for model in old.keys() | new.keys():
        before, after = old.get(model, {}), new.get(model, {})
        if before != after:
            moved.update(w for w in before.keys() | after.keys() if before.get(w) != after.get(w))
    return moved
