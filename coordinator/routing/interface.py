"""The routing-policy interface: how a task's worker is chosen, in two pure steps.

* :meth:`Policy.prepare` turns the fleet's heartbeats (and the model-load leases) into
  candidates: whatever depends only on them, computed once per registry snapshot;
* :meth:`Policy.rank` adds the load routed since (``in_flight``) and orders the candidates,
  best first, each with a breakdown that explains its place.

The router (:mod:`coordinator.dispatch.router`) and the simulator
(:mod:`coordinator.sim.simulator`) call
the same two methods. Nothing here touches Redis, Celery or a clock: time comes in as
``now``, randomness as an ``rng``. The policies themselves are listed in
:mod:`coordinator.routing`.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar, Final, Generic, Protocol, TypeVar

from coordinator.core.heartbeat import Heartbeat

Leases = Mapping[str, Mapping[str, float]]
"""model -> {worker_id: unix time the worker expects the model to be in memory}."""

NO_LEASES: Final[Leases] = {}

MIN_LEASE_GRACE_S: Final = 30.0


def lease_grace_s(heartbeat_interval_s: float) -> float:
    """How long a model-load lease outlives the time the load should be done: until the
    worker's heartbeat can show the model in memory (two intervals: one to report, one of
    slack), and never under :data:`MIN_LEASE_GRACE_S`, because load estimates are rough.
    A load that fails frees its model for another worker once its lease runs out."""
    return max(MIN_LEASE_GRACE_S, 2.0 * heartbeat_interval_s)


class Breakdown(Protocol):
    """One worker's standing under a policy: what the decision log and ``explain`` show."""

    @property
    def worker_id(self) -> str: ...

    @property
    def total(self) -> float: ...

    def as_row(self) -> list[float | str]: ...

    def as_dict(self) -> dict[str, float | str]: ...


class Pooled(Protocol):
    """What every policy's candidates carry."""

    @property
    def heartbeat(self) -> Heartbeat: ...


C = TypeVar("C", bound=Pooled)


class Policy(ABC, Generic[C]):
    """A routing policy. Subclasses set :attr:`name`, :attr:`factors` and :attr:`unit`."""

    name: ClassVar[str]
    factors: ClassVar[tuple[str, ...]]
    """The breakdown's fields after ``worker_id``, in row order; ``total`` comes last."""
    unit: ClassVar[str]
    """How to read ``total``, for people: ``"points, highest wins"``..."""

    @abstractmethod
    def prepare(
        self,
        heartbeats: Iterable[Heartbeat],
        service: str,
        model: str | None,
        *,
        leases: Leases = NO_LEASES,
        now: float = 0.0,
        demand: Mapping[str, float] | None = None,
    ) -> list[C]:
        """The eligible workers for ``service`` and ``model``, ready for :meth:`rank`.

        ``leases`` are the model loads under way, ``now`` the unix time they are read
        against, ``demand`` each model's recent requests per second
        (:class:`~coordinator.routing.demand.Demand`)."""

    @abstractmethod
    def rank(
        self,
        pool: Sequence[C],
        *,
        in_flight: Mapping[str, int] | None = None,
        rng: random.Random | None = None,
        limit: int | None = None,
    ) -> list[Breakdown]:
        """The best ``limit`` candidates (all when ``None``), best first.

        ``in_flight`` counts tasks routed to a worker and not finished; a worker's load is
        the larger of that and its heartbeat's ``active_requests``. Without ``rng`` the
        result is reproducible (ties keep the pool's order).
        """

    def starts_load(self, winner: C, breakdown: Breakdown) -> tuple[str, float] | None:
        """``(model, seconds until it is in memory)`` when sending the task to ``winner``
        makes it load a model that no lease covers there, so the router should take a lease
        first; ``None`` otherwise (and always, for policies that ignore model state)."""
        return None


class KeyedPolicy(Policy[C]):
    """A policy whose order is one number per candidate that depends only on the candidate
    and its load, and never falls as the load grows. The router then keeps each pool in
    that order between decisions (:class:`~coordinator.routing.ranking.Ranking`), so a
    decision costs O(log n) instead of a sort of the pool; :meth:`rank` sorts by the same
    key, so both agree."""

    tie_s: float = 0.0
    """Random jitter added to the key when ranking with an ``rng``: splits equal keys."""

    @abstractmethod
    def sort_key(self, candidate: C, load: int) -> float:
        """Lowest first; must not decrease as ``load`` grows."""

    @abstractmethod
    def breakdown(self, candidate: C, load: int) -> Breakdown:
        """The candidate's breakdown at ``load`` (its ``total`` need not be the key)."""

    def with_leases(
        self, pool: Sequence[C], worker_id: str, leases: Leases, now: float
    ) -> C | None:
        """``worker_id``'s candidate in ``pool`` (from :meth:`prepare`) now that the loads
        it holds leases for are ``leases``', for the router to put in its place; or ``None``
        (the default) when the pool must be prepared again."""
        return None

    def rank(
        self,
        pool: Sequence[C],
        *,
        in_flight: Mapping[str, int] | None = None,
        rng: random.Random | None = None,
        limit: int | None = None,
    ) -> list[Breakdown]:
        """Lowest :meth:`sort_key` first."""
        flight = in_flight or {}
        loads = [load_of(c.heartbeat, flight) for c in pool]
        key, jitter = self.sort_key, self.tie_s if rng is not None else 0.0
        rand = rng.random if rng is not None else _zero
        keys = [key(c, n) + rand() * jitter for c, n in zip(pool, loads, strict=True)]
        order = sorted(range(len(pool)), key=keys.__getitem__)
        chosen = order if limit is None else order[:limit]
        return [self.breakdown(pool[i], loads[i]) for i in chosen]


def _zero() -> float:
    return 0.0


def load_of(heartbeat: Heartbeat, in_flight: Mapping[str, int]) -> int:
    """A worker's requests: the larger of the router's in-flight count and its own."""
    f = in_flight.get(heartbeat.worker_id, 0)
    return f if f > heartbeat.active_requests else heartbeat.active_requests
