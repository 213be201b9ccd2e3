"""The ``affinity`` policy: model affinity as Ray Serve's model multiplexing and the Ollama
routers do it, the model-aware baseline ``cost`` is measured against.

Among the workers with the model in memory or loading (a lease), the least loaded wins
while its requests are under :attr:`AffinityPolicy.threshold`; when every such worker has
that many or more (or none exists), the least loaded worker overall wins: on ties a warm
one, then the one holding the fewest models (as Ray Serve ranks replicas when none has the
model, so that a load fills a free slot before it evicts). A worker that must load the
model takes the same model-load lease as under ``cost``, so the next requests for the
model see it as loading and follow it there.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from coordinator.core.heartbeat import Heartbeat, is_eligible
from coordinator.routing.interface import NO_LEASES, Breakdown, Leases, Policy, load_of

AffinityState = Literal["memory", "loading", "disk", "absent", "none"]

GB: Final = 1_000_000_000
WARM: Final = frozenset({"memory", "loading", "none"})
"""States that count as having the model (``none``: a task without one, any worker)."""
COLD_TIE: Final = 0.5
"""Added to a cold worker's key past the threshold: a warm one wins ties of load."""
PER_MODEL_HELD: Final = 0.1
"""Added to a cold worker's key per model it holds (up to :data:`MAX_HELD`): among cold
workers of equal load, the emptiest wins."""
MAX_HELD: Final = 4
JITTER: Final = 0.05
"""Random tie-break, under :data:`PER_MODEL_HELD`: it never outranks a model or a request."""


@dataclass(frozen=True, slots=True)
class Affinity:
    """The affinity policy's breakdown: the model's state there and the worker's load."""

    worker_id: str
    state: AffinityState
    requests: float
    fetch_s: float
    """Download and load time when the worker must load the model, else 0."""
    total: float
    """``requests`` for a warm worker under the threshold; past it (or cold), the threshold
    plus ``requests``, and for a cold worker a half plus a tenth per model it holds: lowest
    wins."""

    def as_row(self) -> list[float | str]:
        """The worker id, then :attr:`AffinityPolicy.factors` in order."""
        return [self.worker_id, self.state, self.requests, self.fetch_s, self.total]

    def as_dict(self) -> dict[str, float | str]:
        """Named, rounded for people."""
        return {
            "worker_id": self.worker_id,
            "state": self.state,
            "requests": self.requests,
            "fetch_s": round(self.fetch_s, 3),
            "total": round(self.total, 3),
        }


@dataclass(frozen=True, slots=True)
class AffinityCandidate:
    """One eligible worker: the model's state there, and what a load would take."""

    heartbeat: Heartbeat
    worker_id: str
    model: str | None
    state: AffinityState
    fetch_s: float
    held: int
    """Models in memory or being loaded there."""
    per_request_s: float
    """The worker's mean task time: how long each request ahead delays a load it starts."""


@dataclass
class AffinityPolicy(Policy[AffinityCandidate]):
    """Least loaded among the workers that have the model, under a queue threshold."""

    name = "affinity"
    factors = ("state", "requests", "fetch_s", "total")
    unit = "requests, fewest wins; past the threshold or cold, plus the threshold"
    threshold: int = 128
    """Requests on a warm worker from which the least loaded worker overall is considered
    instead: Ray Serve's ``max_ongoing_requests`` per replica plays this part. Low values
    thrash on the simulator's Azure runs (a spill evicts a model others queue for, and
    every worker soon loads for every request); 64-256 are its best, 128 the steadiest
    (docs/routing-policies.md has the sweep)."""
    default_service_s: float = 1.0
    default_load_bps: float = 1.0 * GB
    default_download_bps: float = 0.1 * GB
    default_model_bytes: int = 4 * GB

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ValueError(f"affinity threshold {self.threshold!r}: must be at least 1")

    def prepare(
        self,
        heartbeats: Iterable[Heartbeat],
        service: str,
        model: str | None,
        *,
        leases: Leases = NO_LEASES,
        now: float = 0.0,
        demand: Mapping[str, float] | None = None,
    ) -> list[AffinityCandidate]:
        """Eligible workers by id (a seeded run must not depend on Redis's order)."""
        fleet = sorted(heartbeats, key=lambda hb: hb.worker_id)
        loading = leases.get(model, {}) if model is not None else {}
        leased: dict[str, set[str]] = {}
        for leased_model, holders in leases.items():
            for worker_id in holders:
                leased.setdefault(worker_id, set()).add(leased_model)
        sizes = [s for hb in fleet if model is not None and (s := hb.model_bytes.get(model))]
        size = max(sizes) if sizes else self.default_model_bytes
        return [
            self._candidate(hb, model, loading, size, leased.get(hb.worker_id, set()))
            for hb in fleet
            if is_eligible(hb, service)
        ]

    def _candidate(
        self,
        hb: Heartbeat,
        model: str | None,
        loading: Mapping[str, float],
        size: int,
        leased: set[str],
    ) -> AffinityCandidate:
        state: AffinityState
        fetch_s = 0.0
        if model is None:
            state = "none"
        elif model in hb.models_in_memory:
            state = "memory"
        elif hb.worker_id in loading:
            state = "loading"
        else:
            state = "disk" if model in hb.models_on_disk else "absent"
            # Only for the lease's expiry: the policy itself ranks by load alone.
            fetch_s = size / (hb.load_bps or self.default_load_bps)
            if state == "absent":
                fetch_s += size / (hb.download_bps or self.default_download_bps)
        per_request_s = hb.mean_service_s or self.default_service_s
        held = len(leased.union(hb.models_in_memory))
        return AffinityCandidate(hb, hb.worker_id, model, state, fetch_s, held, per_request_s)

    def rank(
        self,
        pool: Sequence[AffinityCandidate],
        *,
        in_flight: Mapping[str, int] | None = None,
        rng: random.Random | None = None,
        limit: int | None = None,
    ) -> list[Breakdown]:
        """Warm workers under the threshold, least loaded first; then everyone by load."""
        flights = in_flight or {}
        threshold = float(self.threshold)
        scored: list[tuple[float, Affinity]] = []
        for c in pool:
            n = float(load_of(c.heartbeat, flights))
            warm = c.state in WARM
            total = n if warm and n < threshold else threshold + n
            if not warm:
                total += COLD_TIE + PER_MODEL_HELD * min(c.held, MAX_HELD)
            key = total + (rng.random() * JITTER if rng is not None else 0.0)
            scored.append((key, Affinity(c.worker_id, c.state, n, c.fetch_s, total)))
        scored.sort(key=lambda s: s[0])
        return [b for _, b in (scored if limit is None else scored[:limit])]

    def starts_load(
        self, winner: AffinityCandidate, breakdown: Breakdown
    ) -> tuple[str, float] | None:
        """A cold winner loads the model once the requests ahead of it are done."""
        if winner.model is None or winner.state not in ("disk", "absent"):
            return None
        assert isinstance(breakdown, Affinity)
        return winner.model, breakdown.requests * winner.per_request_s + winner.fetch_s
