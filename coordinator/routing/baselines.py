"""The baseline policies: what routing does without knowing about models.

They exist to be compared with (``coordinator simulate``), and can be chosen with
``ROUTING_POLICY`` like any other.
"""

from __future__ import annotations

import heapq
import random
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from coordinator.core.heartbeat import Heartbeat, is_eligible
from coordinator.routing.interface import NO_LEASES, Breakdown, Leases, Policy, load_of


@dataclass(frozen=True, slots=True)
class Parts:
    """A breakdown by named parts; ``values`` lines up with ``names``, ``total`` last."""

    worker_id: str
    names: tuple[str, ...]
    values: tuple[float, ...]

    @property
    def total(self) -> float:
        """The value the policy ranked by."""
        return self.values[-1]

    def as_row(self) -> list[float | str]:
        """The worker id, then the values."""
        return [self.worker_id, *self.values]

    def as_dict(self) -> dict[str, float | str]:
        """Named, rounded for people."""
        out: dict[str, float | str] = {"worker_id": self.worker_id}
        out.update((n, round(v, 3)) for n, v in zip(self.names, self.values, strict=True))
        return out


@dataclass(frozen=True, slots=True)
class Plain:
    """A candidate of the baseline policies: nothing but the heartbeat."""

    heartbeat: Heartbeat


class Blind(Policy[Plain]):
    """A policy that sees only eligibility and load: ranks by one number, lowest first."""

    def prepare(
        self,
        heartbeats: Iterable[Heartbeat],
        service: str,
        model: str | None,
        *,
        leases: Leases = NO_LEASES,
        now: float = 0.0,
        demand: Mapping[str, float] | None = None,
    ) -> list[Plain]:
        """Eligible workers, by id (so that a seeded run does not depend on Redis's order)."""
        eligible = (Plain(hb) for hb in heartbeats if is_eligible(hb, service))
        return sorted(eligible, key=lambda c: c.heartbeat.worker_id)

    def rank(
        self,
        pool: Sequence[Plain],
        *,
        in_flight: Mapping[str, int] | None = None,
        rng: random.Random | None = None,
        limit: int | None = None,
    ) -> list[Breakdown]:
        """Lowest :meth:`values` total first; ties go to the lower sort key."""
        scored = [
            (key, Parts(c.heartbeat.worker_id, self.factors, values))
            for c, key, values in self.values(pool, in_flight or {}, rng)
        ]
        best = (
            sorted(scored, key=lambda s: s[0])
            if limit is None
            else heapq.nsmallest(limit, scored, key=lambda s: s[0])
        )
        return [parts for _, parts in best]

    @abstractmethod
    def values(
        self, pool: Sequence[Plain], in_flight: Mapping[str, int], rng: random.Random | None
    ) -> list[tuple[Plain, float, tuple[float, ...]]]:
        """Per candidate considered: its sort key and its breakdown's values."""


class RandomPolicy(Blind):
    """Uniformly random among eligible workers: the baseline that knows nothing."""

    name = "random"
    factors = ("total",)
    unit = "a random draw, lowest wins"

    def values(
        self, pool: Sequence[Plain], in_flight: Mapping[str, int], rng: random.Random | None
    ) -> list[tuple[Plain, float, tuple[float, ...]]]:
        """A draw each (without ``rng``: the pool's order)."""
        draws = [rng.random() if rng is not None else float(i) for i in range(len(pool))]
        return [(c, d, (d,)) for c, d in zip(pool, draws, strict=True)]


@dataclass
class RoundRobinPolicy(Blind):
    """Each service's eligible workers in turn, by worker id."""

    name = "round_robin"
    factors = ("total",)
    unit = "turns to wait, fewest wins"
    _next: dict[str, int] = field(default_factory=dict, repr=False)

    def values(
        self, pool: Sequence[Plain], in_flight: Mapping[str, int], rng: random.Random | None
    ) -> list[tuple[Plain, float, tuple[float, ...]]]:
        """Turns to wait; each ranking advances the turn."""
        if not pool:
            return []
        # One counter per pool shape: the service's workers, whatever the model.
        key = ",".join(c.heartbeat.worker_id for c in pool)
        turn = self._next.get(key, 0) % len(pool)
        self._next[key] = turn + 1
        return [(c, float(t), (float(t),)) for t, c in enumerate([*pool[turn:], *pool[:turn]])]


class LeastLoadedPolicy(Blind):
    """The worker with the fewest requests, ties at random: balances load, blind to models."""

    name = "least_loaded"
    factors = ("requests", "total")
    unit = "requests, fewest wins"

    def values(
        self, pool: Sequence[Plain], in_flight: Mapping[str, int], rng: random.Random | None
    ) -> list[tuple[Plain, float, tuple[float, ...]]]:
        """Requests each; a random fraction splits ties."""
        out: list[tuple[Plain, float, tuple[float, ...]]] = []
        for c in pool:
            n = float(load_of(c.heartbeat, in_flight))
            out.append((c, n + (rng.random() * 0.5 if rng is not None else 0.0), (n, n)))
        return out


class PowerOfTwoPolicy(Blind):
    """Two workers drawn at random, the less loaded wins (Mitzenmacher's two choices)."""

    name = "p2c"
    factors = ("requests", "total")
    unit = "requests of two drawn, fewest wins"

    def values(
        self, pool: Sequence[Plain], in_flight: Mapping[str, int], rng: random.Random | None
    ) -> list[tuple[Plain, float, tuple[float, ...]]]:
        """The two drawn (without ``rng``: the first two), the first drawn winning ties."""
        drawn = rng.sample(list(pool), min(2, len(pool))) if rng is not None else pool[:2]
        out: list[tuple[Plain, float, tuple[float, ...]]] = []
        for i, c in enumerate(drawn):
            n = float(load_of(c.heartbeat, in_flight))
            out.append((c, n + i * 0.1, (n, n)))
        return out
