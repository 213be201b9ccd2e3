"""The ``seed`` routing policy: the design document's scoring table as pure functions.

Nothing here touches Redis, Celery or the clock, so every decision can be replayed and
explained from the heartbeats it was made on.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from coordinator.core.heartbeat import TIER_GPU, Heartbeat, is_eligible
from coordinator.core.score_weights import SEED_WEIGHTS, Weights
from coordinator.routing.interface import NO_LEASES, Breakdown, Leases, Policy

FACTORS: Final = (
    "model_loaded",
    "specialization",
    "tier",
    "service_health",
    "cpu_load",
    "active_requests",
    "gpu_utilization",
    "tiebreak",
    "total",
)
"""The fields of :class:`ScoreBreakdown` that are points, in display order."""


@dataclass(frozen=True, slots=True)
class ScoreBreakdown:
    """Each factor's points for one worker, and their sum."""

    worker_id: str
    model_loaded: float
    specialization: float
    tier: float
    service_health: float
    cpu_load: float
    active_requests: float
    gpu_utilization: float
    tiebreak: float
    total: float

    def as_row(self) -> list[float | str]:
        """Compact form for storage: the worker id, then :data:`FACTORS` in order."""
        return [
            self.worker_id,
            self.model_loaded,
            self.specialization,
            self.tier,
            self.service_health,
            self.cpu_load,
            self.active_requests,
            self.gpu_utilization,
            self.tiebreak,
            self.total,
        ]

    def as_dict(self) -> dict[str, float | str]:
        """Plain JSON-ready form, rounded for people to read."""
        # Built by hand: dataclasses.asdict deep-copies, and this runs on every decision.
        out: dict[str, float | str] = {"worker_id": self.worker_id}
        for name in FACTORS:
            out[name] = round(getattr(self, name), 3)
        return out


@dataclass(frozen=True, slots=True)
class Candidate:
    """An eligible worker with the factors that depend only on its heartbeat.

    They change only with a new heartbeat, so a router can compute them once per
    registry snapshot and pay per decision only for load and the tiebreak.
    """

    heartbeat: Heartbeat
    model_loaded: float
    specialization: float
    tier: float
    service_health: float
    cpu_load: float
    gpu_utilization: float
    base: float
    # Copied out of the heartbeat: rank_candidates reads them for every worker per task.
    worker_id: str
    active_requests: int


def candidate(
    heartbeat: Heartbeat, service: str, model: str | None, weights: Weights = SEED_WEIGHTS
) -> Candidate:
    """The heartbeat-only factors of one worker for one service and model."""
    gpu = heartbeat.gpu_utilization if heartbeat.tier == TIER_GPU else None
    parts = (
        weights.model_loaded if model is not None and model in heartbeat.models_on_disk else 0.0,
        weights.specialization if heartbeat.specialization == service else 0.0,
        weights.tier_points(heartbeat.tier),
        weights.service_healthy if heartbeat.services_status.get(service) == "healthy" else 0.0,
        0.0 - weights.cpu_load * heartbeat.current_load,  # 0.0 - x: no -0.0 in output
        0.0 - weights.gpu_utilization * gpu / 100.0 if gpu is not None else 0.0,
    )
    return Candidate(
        heartbeat,
        *parts,
        base=sum(parts),
        worker_id=heartbeat.worker_id,
        active_requests=heartbeat.active_requests,
    )


def candidates(
    heartbeats: Iterable[Heartbeat],
    service: str,
    model: str | None,
    weights: Weights = SEED_WEIGHTS,
) -> list[Candidate]:
    """Every eligible worker as a :class:`Candidate`."""
    return [candidate(hb, service, model, weights) for hb in heartbeats if is_eligible(hb, service)]


def _breakdown(c: Candidate, active: int, tiebreak: float, weights: Weights) -> ScoreBreakdown:
    penalty = 0.0 - weights.active_request * active
    return ScoreBreakdown(
        worker_id=c.worker_id,
        model_loaded=c.model_loaded,
        specialization=c.specialization,
        tier=c.tier,
        service_health=c.service_health,
        cpu_load=c.cpu_load,
        active_requests=penalty,
        gpu_utilization=c.gpu_utilization,
        tiebreak=tiebreak,
        total=c.base + penalty + tiebreak,
    )


def score_worker(
    heartbeat: Heartbeat,
    service: str,
    model: str | None,
    *,
    weights: Weights = SEED_WEIGHTS,
    in_flight: int = 0,
    rng: random.Random | None = None,
) -> ScoreBreakdown:
    """Score one worker for one task, factor by factor.

    ``in_flight`` is the number of tasks routed to the worker that have not finished; the
    active-request penalty uses it when it exceeds the heartbeat's own count, so a burst
    sent between two heartbeats still sees the load it creates. Without ``rng`` there is
    no random tiebreak, which makes the result exactly reproducible.
    """
    tiebreak = rng.random() * weights.tiebreak if rng is not None else 0.0
    active = max(heartbeat.active_requests, in_flight)
    return _breakdown(candidate(heartbeat, service, model, weights), active, tiebreak, weights)


def rank_candidates(
    pool: Sequence[Candidate],
    *,
    weights: Weights = SEED_WEIGHTS,
    in_flight: Mapping[str, int] | None = None,
    rng: random.Random | None = None,
    limit: int | None = None,
) -> list[ScoreBreakdown]:
    """Add load and tiebreak to prepared candidates; the best ``limit`` first (all if None).

    This is the router's hot path: a flat loop, and breakdowns only for what is returned.
    """
    get = (in_flight or {}).get
    w_active, tiebreak = weights.active_request, weights.tiebreak
    rand = rng.random if rng is not None else _zero
    # One flat pass; 'f if f > a else a' is max() without the call, which matters here.
    totals = [
        c.base
        - w_active * (f if (f := get(c.worker_id, 0)) > c.active_requests else c.active_requests)
        + rand() * tiebreak
        for c in pool
    ]
    # sorted() beats heapq.nlargest at fleet sizes (a C sort of ~100 against Python).
    order = sorted(range(len(totals)), key=totals.__getitem__, reverse=True)[:limit]
    ranked = []
    for i in order:
        c = pool[i]
        active = max(c.active_requests, get(c.worker_id, 0))
        ranked.append(_breakdown(c, active, totals[i] - (c.base - w_active * active), weights))
    return ranked


def _zero() -> float:
    return 0.0


def rank_workers(
    heartbeats: Iterable[Heartbeat],
    service: str,
    model: str | None,
    *,
    weights: Weights = SEED_WEIGHTS,
    in_flight: Mapping[str, int] | None = None,
    rng: random.Random | None = None,
) -> list[ScoreBreakdown]:
    """Score every eligible worker, best first."""
    pool = candidates(heartbeats, service, model, weights)
    return rank_candidates(pool, weights=weights, in_flight=in_flight, rng=rng)


def select_best_worker(
    heartbeats: Iterable[Heartbeat],
    service: str,
    model: str | None,
    *,
    weights: Weights = SEED_WEIGHTS,
    in_flight: Mapping[str, int] | None = None,
    rng: random.Random | None = None,
) -> Heartbeat | None:
    """The eligible worker with the highest score, or ``None`` when none is eligible."""
    pool = candidates(heartbeats, service, model, weights)
    best = rank_candidates(pool, weights=weights, in_flight=in_flight, rng=rng, limit=1)
    if not best:
        return None
    return next(c.heartbeat for c in pool if c.heartbeat.worker_id == best[0].worker_id)


@dataclass
class SeedPolicy(Policy[Candidate]):
    """The design document's scoring table (:mod:`coordinator.routing.seed`)."""

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
        demand: Mapping[str, float] | None = None,
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
