"""The routing policy: the design's scoring table as pure functions.

Nothing here touches Redis, Celery or the clock, so every decision can be replayed and
explained from the heartbeats it was made on.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Final

from pydantic import BaseModel, ConfigDict, Field

from coordinator.heartbeat import TIER_CPU, TIER_GPU, TIER_STORAGE, Heartbeat

ROUTABLE_STATUSES: Final = frozenset({"healthy", "degraded"})


class Weights(BaseModel):
    """Points per factor; the defaults are the design document's table."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    model_loaded: float = Field(default=100.0, description="worker has the model")
    specialization: float = Field(default=50.0, description="worker specialises in the service")
    tier_gpu: float = 30.0
    tier_cpu: float = 20.0
    tier_storage: float = 10.0
    service_healthy: float = Field(default=10.0, description="service reported healthy")
    cpu_load: float = Field(default=30.0, description="penalty at 100% CPU")
    active_request: float = Field(default=5.0, description="penalty per active request")
    gpu_utilization: float = Field(default=20.0, description="penalty at 100% GPU (GPU tier)")
    tiebreak: float = Field(default=5.0, ge=0.0, description="random bonus drawn from [0, x)")

    def tier_points(self, tier: int | None) -> float:
        """Points for a tier; an unknown tier earns none."""
        if tier == TIER_GPU:
            return self.tier_gpu
        if tier == TIER_CPU:
            return self.tier_cpu
        if tier == TIER_STORAGE:
            return self.tier_storage
        return 0.0


SEED_WEIGHTS: Final = Weights()


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

    def as_dict(self) -> dict[str, float | str]:
        """Plain JSON-ready form, rounded for people to read."""
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def is_eligible(heartbeat: Heartbeat, service: str) -> bool:
    """Whether the worker may receive a task of ``service`` at all."""
    return (
        heartbeat.status in ROUTABLE_STATUSES
        and service in heartbeat.capabilities
        and heartbeat.services_status.get(service) != "unhealthy"
    )


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


def candidate(
    heartbeat: Heartbeat, service: str, model: str | None, weights: Weights = SEED_WEIGHTS
) -> Candidate:
    """The heartbeat-only factors of one worker for one service and model."""
    gpu = heartbeat.gpu_utilization if heartbeat.tier == TIER_GPU else None
    parts = (
        weights.model_loaded if model is not None and model in heartbeat.loaded_models else 0.0,
        weights.specialization if heartbeat.specialization == service else 0.0,
        weights.tier_points(heartbeat.tier),
        weights.service_healthy if heartbeat.services_status.get(service) == "healthy" else 0.0,
        -weights.cpu_load * heartbeat.current_load,
        -weights.gpu_utilization * gpu / 100.0 if gpu is not None else 0.0,
    )
    return Candidate(heartbeat, *parts, base=sum(parts))


def candidates(
    heartbeats: Iterable[Heartbeat],
    service: str,
    model: str | None,
    weights: Weights = SEED_WEIGHTS,
) -> list[Candidate]:
    """Every eligible worker as a :class:`Candidate`."""
    return [candidate(hb, service, model, weights) for hb in heartbeats if is_eligible(hb, service)]


def _breakdown(c: Candidate, active: int, tiebreak: float, weights: Weights) -> ScoreBreakdown:
    penalty = -weights.active_request * active
    return ScoreBreakdown(
        worker_id=c.heartbeat.worker_id,
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
    flight = in_flight or {}
    n = len(pool)
    ties = [rng.random() * weights.tiebreak for _ in range(n)] if rng else [0.0] * n
    actives = [max(c.heartbeat.active_requests, flight.get(c.heartbeat.worker_id, 0)) for c in pool]
    w_active = weights.active_request
    totals = [c.base - w_active * a + t for c, a, t in zip(pool, actives, ties, strict=True)]
    if limit is None:
        order = sorted(range(n), key=totals.__getitem__, reverse=True)
    else:
        order = heapq.nlargest(limit, range(n), key=totals.__getitem__)
    return [_breakdown(pool[i], actives[i], ties[i], weights) for i in order]


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
