"""Routing policies: which eligible worker gets a task. Pure code, chosen by ``ROUTING_POLICY``.

A policy works in two steps, so that the router and the simulator run the same code:

* :meth:`Policy.prepare` turns the fleet's heartbeats (and the model-load leases) into
  candidates: whatever depends only on them, computed once per registry snapshot;
* :meth:`Policy.rank` adds the load routed since (``in_flight``) and orders the candidates,
  best first, each with a breakdown that explains its place.

Nothing here touches Redis, Celery or a clock: time comes in as ``now``, randomness as an
``rng``. A new policy is a subclass with those two methods, listed in :data:`POLICIES`.
"""

from __future__ import annotations

import heapq
import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Generic, Literal, Protocol, TypeVar

from coordinator.errors import ConfigError
from coordinator.heartbeat import Heartbeat
from coordinator.scoring import (
    FACTORS,
    SEED_WEIGHTS,
    Candidate,
    Weights,
    candidates,
    is_eligible,
    rank_candidates,
)

Leases = Mapping[str, Mapping[str, float]]
"""model -> {worker_id: unix time the worker expects the model to be in memory}."""

NO_LEASES: Final[Leases] = {}


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
    ) -> list[C]:
        """The eligible workers for ``service`` and ``model``, ready for :meth:`rank`."""

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


def _load(heartbeat: Heartbeat, in_flight: Mapping[str, int]) -> int:
    f = in_flight.get(heartbeat.worker_id, 0)
    return f if f > heartbeat.active_requests else heartbeat.active_requests


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


def _plain(heartbeats: Iterable[Heartbeat], service: str) -> list[Plain]:
    return [Plain(hb) for hb in heartbeats if is_eligible(hb, service)]


def _ordered(scored: list[tuple[float, Plain, Parts]], limit: int | None) -> list[Breakdown]:
    best = (
        sorted(scored, key=lambda s: s[0])
        if limit is None
        else heapq.nsmallest(limit, scored, key=lambda s: s[0])
    )
    return [parts for _, _, parts in best]


class RandomPolicy(Policy[Plain]):
    """Uniformly random among eligible workers: the baseline that knows nothing."""

    name = "random"
    factors = ("total",)
    unit = "a random draw, lowest wins"

    def prepare(
        self,
        heartbeats: Iterable[Heartbeat],
        service: str,
        model: str | None,
        *,
        leases: Leases = NO_LEASES,
        now: float = 0.0,
    ) -> list[Plain]:
        """Eligible workers."""
        return _plain(heartbeats, service)

    def rank(
        self,
        pool: Sequence[Plain],
        *,
        in_flight: Mapping[str, int] | None = None,
        rng: random.Random | None = None,
        limit: int | None = None,
    ) -> list[Breakdown]:
        """A random order."""
        draw = rng.random if rng is not None else (lambda: 0.0)
        scored = []
        for c in pool:
            d = draw()
            scored.append((d, c, Parts(c.heartbeat.worker_id, self.factors, (d,))))
        return _ordered(scored, limit)


@dataclass
class RoundRobinPolicy(Policy[Plain]):
    """Each service's eligible workers in turn, by worker id."""

    name = "round_robin"
    factors = ("total",)
    unit = "turns to wait, fewest wins"
    _next: dict[str, int] = field(default_factory=dict, repr=False)

    def prepare(
        self,
        heartbeats: Iterable[Heartbeat],
        service: str,
        model: str | None,
        *,
        leases: Leases = NO_LEASES,
        now: float = 0.0,
    ) -> list[Plain]:
        """Eligible workers, by id."""
        return sorted(_plain(heartbeats, service), key=lambda c: c.heartbeat.worker_id)

    def rank(
        self,
        pool: Sequence[Plain],
        *,
        in_flight: Mapping[str, int] | None = None,
        rng: random.Random | None = None,
        limit: int | None = None,
    ) -> list[Breakdown]:
        """The pool rotated to the next turn; each call advances the turn."""
        if not pool:
            return []
        # One counter per pool shape: the service's workers, whatever the model.
        key = ",".join(c.heartbeat.worker_id for c in pool)
        turn = self._next.get(key, 0) % len(pool)
        self._next[key] = turn + 1
        scored = [
            (float(i), c, Parts(c.heartbeat.worker_id, self.factors, (float(i),)))
            for i, c in enumerate([*pool[turn:], *pool[:turn]])
        ]
        return _ordered(scored, limit)


class LeastLoadedPolicy(Policy[Plain]):
    """The worker with the fewest requests, ties at random: balances load, blind to models."""

    name = "least_loaded"
    factors = ("requests", "total")
    unit = "requests, fewest wins"

    def prepare(
        self,
        heartbeats: Iterable[Heartbeat],
        service: str,
        model: str | None,
        *,
        leases: Leases = NO_LEASES,
        now: float = 0.0,
    ) -> list[Plain]:
        """Eligible workers."""
        return _plain(heartbeats, service)

    def rank(
        self,
        pool: Sequence[Plain],
        *,
        in_flight: Mapping[str, int] | None = None,
        rng: random.Random | None = None,
        limit: int | None = None,
    ) -> list[Breakdown]:
        """Fewest requests first."""
        flights = in_flight or {}
        draw = rng.random if rng is not None else (lambda: 0.0)
        scored = []
        for c in pool:
            n = float(_load(c.heartbeat, flights))
            scored.append((n + draw() * 0.5, c, Parts(c.heartbeat.worker_id, self.factors, (n, n))))
        return _ordered(scored, limit)


class PowerOfTwoPolicy(Policy[Plain]):
    """Two workers drawn at random, the less loaded wins (Mitzenmacher's two choices)."""

    name = "p2c"
    factors = ("requests", "total")
    unit = "requests of two drawn, fewest wins"

    def prepare(
        self,
        heartbeats: Iterable[Heartbeat],
        service: str,
        model: str | None,
        *,
        leases: Leases = NO_LEASES,
        now: float = 0.0,
    ) -> list[Plain]:
        """Eligible workers."""
        return _plain(heartbeats, service)

    def rank(
        self,
        pool: Sequence[Plain],
        *,
        in_flight: Mapping[str, int] | None = None,
        rng: random.Random | None = None,
        limit: int | None = None,
    ) -> list[Breakdown]:
        """The two drawn workers, less loaded first (without ``rng``: the first two)."""
        flights = in_flight or {}
        drawn = rng.sample(list(pool), min(2, len(pool))) if rng is not None else pool[:2]
        scored = []
        for i, c in enumerate(drawn):
            n = float(_load(c.heartbeat, flights))
            scored.append((n + i * 0.1, c, Parts(c.heartbeat.worker_id, self.factors, (n, n))))
        return _ordered(scored, limit)


@dataclass
class SeedPolicy(Policy[Candidate]):
    """The design document's scoring table (:mod:`coordinator.scoring`)."""

    name = "seed"
    factors = FACTORS
    unit = "points, highest wins"
    weights: Weights = SEED_WEIGHTS

    def prepare(
        self,
        heartbeats: Iterable[Heartbeat],
        service: str,
        model: str | None,
        *,
        leases: Leases = NO_LEASES,
        now: float = 0.0,
    ) -> list[Candidate]:
        """The heartbeat-only factors of the table."""
        return candidates(heartbeats, service, model, self.weights)

    def rank(
        self,
        pool: Sequence[Candidate],
        *,
        in_flight: Mapping[str, int] | None = None,
        rng: random.Random | None = None,
        limit: int | None = None,
    ) -> list[Breakdown]:
        """Highest score first."""
        return list(
            rank_candidates(pool, weights=self.weights, in_flight=in_flight, rng=rng, limit=limit)
        )


ModelState = Literal["memory", "loading", "disk", "absent", "none"]


@dataclass(frozen=True, slots=True)
class Estimate:
    """The cost policy's breakdown: estimated seconds until the task is done there."""

    worker_id: str
    state: ModelState
    queue_s: float
    """Waiting behind the worker's requests, or for a load under way, whichever is longer."""
    download_s: float
    load_s: float
    evict_s: float
    """Expected cost of reloading, elsewhere, the model this load would evict."""
    run_s: float
    total: float

    def as_row(self) -> list[float | str]:
        """The worker id, then :attr:`CostPolicy.factors` in order."""
        return [
            self.worker_id,
            self.queue_s,
            self.download_s,
            self.load_s,
            self.evict_s,
            self.run_s,
            self.total,
        ]

    def as_dict(self) -> dict[str, float | str]:
        """Named, rounded for people, with the model's state on the worker."""
        out: dict[str, float | str] = {"worker_id": self.worker_id, "state": self.state}
        for name, value in zip(CostPolicy.factors, self.as_row()[1:], strict=True):
            assert isinstance(value, float)
            out[name] = round(value, 3)
        return out


@dataclass(frozen=True, slots=True)
class CostCandidate:
    """One worker's time-to-serve estimate for one model, less what depends on its load."""

    heartbeat: Heartbeat
    worker_id: str
    model: str | None
    active_requests: int
    state: ModelState
    per_request_s: float
    ready_in_s: float
    download_s: float
    load_s: float
    evict_s: float
    run_s: float
    fixed_s: float


GB: Final = 1_000_000_000


@dataclass
class CostPolicy(Policy[CostCandidate]):
    """Lowest estimated time to serve: queue wait + model download/load + eviction + run.

    * queue wait: the worker's requests (the larger of heartbeat and in-flight count) times
      its recent mean task time; when a load of the model is under way there (a lease),
      the wait is at least the time until it is in memory;
    * load: 0 in memory; size / the worker's measured load bandwidth on disk; download time
      plus that when absent. A model's size is what any worker reported for it;
    * eviction: when the load would evict a model that no other worker holds in memory,
      that model's reload time here (someone will need it again);
    * run: the worker's recent mean time for this model, else the fleet's, else the
      worker's mean over all models.

    Unknowns fall back to the defaults below; they are deliberately pessimistic about
    loads, so that a measured warm worker keeps the model's traffic.
    """

    name = "cost"
    factors = ("queue_s", "download_s", "load_s", "evict_s", "run_s", "total")
    unit = "estimated seconds to serve, lowest wins"
    default_service_s: float = 1.0
    default_load_bps: float = 1.0 * GB
    default_download_bps: float = 0.1 * GB
    default_model_bytes: int = 4 * GB
    tie_s: float = 1e-3
    """Random jitter (seconds) that splits equal estimates; not shown in breakdowns."""

    def prepare(
        self,
        heartbeats: Iterable[Heartbeat],
        service: str,
        model: str | None,
        *,
        leases: Leases = NO_LEASES,
        now: float = 0.0,
    ) -> list[CostCandidate]:
        """Per eligible worker: the model's state there and the parts of the estimate."""
        fleet = list(heartbeats)
        size = self._size(fleet, model) if model is not None else 0
        in_memory: dict[str, int] = {}
        for hb in fleet:
            for m in hb.models_in_memory:
                in_memory[m] = in_memory.get(m, 0) + 1
        loading = leases.get(model, {}) if model is not None else {}
        measured = [t for hb in fleet if (t := hb.service_s.get(model or "")) is not None]
        fleet_run_s = sum(measured) / len(measured) if measured else None
        pool = []
        for hb in fleet:
            if is_eligible(hb, service):
                pool.append(
                    self._candidate(hb, fleet, model, size, fleet_run_s, in_memory, loading, now)
                )
        return pool

    def _size(self, fleet: Sequence[Heartbeat], model: str) -> int:
        sizes = [s for hb in fleet if (s := hb.model_bytes.get(model)) is not None]
        return max(sizes) if sizes else self.default_model_bytes

    def _candidate(
        self,
        hb: Heartbeat,
        fleet: Sequence[Heartbeat],
        model: str | None,
        size: int,
        fleet_run_s: float | None,
        in_memory: Mapping[str, int],
        loading: Mapping[str, float],
        now: float,
    ) -> CostCandidate:
        times = hb.service_s
        mean_s = sum(times.values()) / len(times) if times else self.default_service_s
        run_s = times.get(model or "", fleet_run_s if fleet_run_s is not None else mean_s)
        load_bps = hb.load_bps or self.default_load_bps
        ready_in_s = download_s = load_s = evict_s = 0.0
        state: ModelState
        if model is None:
            state = "none"
        elif model in hb.models_in_memory:
            state = "memory"
        elif hb.worker_id in loading:
            state, ready_in_s = "loading", max(0.0, loading[hb.worker_id] - now)
        else:
            state = "disk" if model in hb.loaded_models else "absent"
            load_s = size / load_bps
            if state == "absent":
                download_s = size / (hb.download_bps or self.default_download_bps)
            victim = hb.would_evict
            if victim is not None and victim != model and not in_memory.get(victim, 0) > 1:
                victim_bytes = self._size(fleet, victim)
                evict_s = victim_bytes / load_bps
        return CostCandidate(
            heartbeat=hb,
            worker_id=hb.worker_id,
            model=model,
            active_requests=hb.active_requests,
            state=state,
            per_request_s=mean_s,
            ready_in_s=ready_in_s,
            download_s=download_s,
            load_s=load_s,
            evict_s=evict_s,
            run_s=run_s,
            fixed_s=download_s + load_s + evict_s + run_s,
        )

    def rank(
        self,
        pool: Sequence[CostCandidate],
        *,
        in_flight: Mapping[str, int] | None = None,
        rng: random.Random | None = None,
        limit: int | None = None,
    ) -> list[Breakdown]:
        """Lowest estimate first."""
        get = (in_flight or {}).get
        jitter = self.tie_s if rng is not None else 0.0
        rand = rng.random if rng is not None else _zero
        # The router's hot path: one flat pass, breakdowns only for what is returned.
        totals = []
        for c in pool:
            n = f if (f := get(c.worker_id, 0)) > c.active_requests else c.active_requests
            wait = c.per_request_s * n
            totals.append((wait if wait > c.ready_in_s else c.ready_in_s) + c.fixed_s)
        keys = [t + rand() * jitter for t in totals]
        n_pool = len(pool)
        order = (
            sorted(range(n_pool), key=keys.__getitem__)
            if limit is None
            else heapq.nsmallest(limit, range(n_pool), key=keys.__getitem__)
        )
        return [
            Estimate(
                worker_id=(c := pool[i]).worker_id,
                state=c.state,
                queue_s=totals[i] - c.fixed_s,
                download_s=c.download_s,
                load_s=c.load_s,
                evict_s=c.evict_s,
                run_s=c.run_s,
                total=totals[i],
            )
            for i in order
        ]

    def starts_load(self, winner: CostCandidate, breakdown: Breakdown) -> tuple[str, float] | None:
        """A model on disk or absent starts a load, done once the queue ahead and it are."""
        if winner.model is None or winner.state not in ("disk", "absent"):
            return None
        return winner.model, breakdown.total - winner.run_s


def _zero() -> float:
    return 0.0


POLICIES: Final[Mapping[str, type[Policy[Any]]]] = {
    p.name: p
    for p in (
        RandomPolicy,
        RoundRobinPolicy,
        LeastLoadedPolicy,
        PowerOfTwoPolicy,
        SeedPolicy,
        CostPolicy,
    )
}
"""Every policy by its ``ROUTING_POLICY`` name."""

DEFAULT_POLICY: Final = CostPolicy.name


def make_policy(name: str, weights: Weights = SEED_WEIGHTS) -> Policy[Any]:
    """A new policy by name; ``weights`` configure ``seed``.

    Raises:
        ConfigError: for a name not in :data:`POLICIES`.
    """
    cls = POLICIES.get(name)
    if cls is None:
        raise ConfigError(f"ROUTING_POLICY={name!r}: expected one of {', '.join(POLICIES)}")
    if cls is SeedPolicy:
        return SeedPolicy(weights)
    return cls()
