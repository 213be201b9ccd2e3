"""The ``cost`` policy: the lowest estimated time to serve, cold loads and evictions priced."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from coordinator.core.heartbeat import TIER_CPU, TIER_GPU, TIER_STORAGE, Heartbeat, is_eligible
from coordinator.routing.interface import NO_LEASES, Breakdown, Leases, Policy

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
    hold_s: float
    """What the task costs the requests that will queue behind it (see ``CostPolicy``)."""
    run_s: float
    total: float

    def as_row(self) -> list[float | str]:
        """The worker id, then :attr:`CostPolicy.factors` in order (the state first)."""
        return [
            self.worker_id,
            self.state,
            self.queue_s,
            self.download_s,
            self.load_s,
            self.evict_s,
            self.hold_s,
            self.run_s,
            self.total,
        ]

    def as_dict(self) -> dict[str, float | str]:
        """Named, rounded for people, with the model's state on the worker."""
        out: dict[str, float | str] = {"worker_id": self.worker_id}
        for name, value in zip(CostPolicy.factors, self.as_row()[1:], strict=True):
            out[name] = value if isinstance(value, str) else round(value, 3)
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
    hold_s: float
    hold_per_request_s: float
    run_s: float
    fixed_s: float
    server_wait_s: float
    """Waiting behind what the model server queues for other clients (its ``/metrics``)."""
    sort_s: float
    """What ``rank`` adds to the queue to sort: ``fixed_s`` and ``server_wait_s``, less a
    tie-break no breakdown shows that lets a worker specialised in the service win ties."""


GB: Final = 1_000_000_000
TIER_SLOWDOWN: Final = {TIER_GPU: 1.0, TIER_CPU: 4.0, TIER_STORAGE: 8.0}
"""How much longer a task runs on each tier than on a GPU, until the worker has measured its
own times: a prior, replaced by measurements as they arrive. A 3B model generates about 4x
slower on a server CPU than on a mid-range GPU; a storage host's CPU is weaker still."""


@dataclass(frozen=True, slots=True)
class _FleetView:
    """What one ``prepare`` knows about the fleet beyond a single worker."""

    heartbeats: Sequence[Heartbeat]
    service: str
    copies: Mapping[str, int]
    """Workers holding each model in memory."""
    demand: Mapping[str, float] | None
    busy_until: Mapping[str, float]
    """Per worker, when the last load it holds a lease for should be done (unix s)."""
    default_bytes: int
    default_run_s: float
    load_bps: float
    """The fleet's mean measured load bandwidth: for workers that have not measured theirs."""
    mean_s: float
    """The fleet's mean task time, on a GPU's scale: for workers that have not measured
    theirs."""

    # Every candidate asks about the same few models: scanning the fleet each time would
    # make ``prepare`` quadratic in the fleet's size.
    _sizes: dict[str, int] = field(default_factory=dict)
    _runs: dict[str, float | None] = field(default_factory=dict)

    def size(self, model: str) -> int:
        """The model's size as any worker reported it (the largest), else the default."""
        known = self._sizes.get(model)
        if known is None:
            found = [s for hb in self.heartbeats if (s := hb.model_bytes.get(model)) is not None]
            known = self._sizes[model] = max(found) if found else self.default_bytes
        return known

    def run_s(self, model: str) -> float | None:
        """The model's mean task time over the workers that measured it, on a GPU's scale."""
        if model not in self._runs:
            runs = [
                t / slowdown(hb)
                for hb in self.heartbeats
                if (t := hb.service_s.get(model)) is not None
            ]
            self._runs[model] = sum(runs) / len(runs) if runs else None
        return self._runs[model]

    def wanted(self, model: str) -> float:
        """Workers' worth of demand for ``model``: requests/s x its run seconds."""
        rate = self.demand.get(model, 0.0) if self.demand is not None else 0.0
        run_s = self.run_s(model)
        return rate * (run_s if run_s is not None else self.default_run_s)


@dataclass
class CostPolicy(Policy[CostCandidate]):
    """Lowest estimated time to serve: queue wait + model download/load + eviction + run.

    * queue wait: the worker's requests (the larger of heartbeat and in-flight count) times
      its recent mean task time (``mean_service_s``); when loads are under way there
      (leases), the wait is at least the time until they are done. On top, what its model
      server queues for other clients (``server_load``), and one request more when the
      server's KV cache is at least ``kv_cache_full``;
    * load: 0 in memory; size / the worker's measured load bandwidth on disk; download time
      plus that when absent. A model's size is what any worker reported for it;
    * hold: what the task costs the requests that will queue behind it. A worker with
      ``n`` queued is busy about n/(n+1) of the time, and such a busy period serves about
      ``n`` more arrivals, each delayed by the task's load and run: so the load is charged
      once per queued request, and the run ``queue_weight`` times (the run must happen
      somewhere; the load need not). On top, a load counts ``load_weight - 1`` times over
      unless demand calls for another copy of the model (``replicate_above``). Without
      this a fleet near saturation trades one cold load for the next until nothing is warm,
      and warm workers take queues while others idle;
    * eviction: the expected cost of reloading the model this load would evict, when the
      copies left would not serve its demand (with no demand figures: when no other
      worker holds it);
    * run: the worker's recent mean time for this model, else the fleet's, else the
      worker's mean over all tasks. Until a worker has measured its own, its tier sets how
      much slower than a GPU it is (:data:`TIER_SLOWDOWN`: CPU 4x), so the design's
      preference for GPUs holds from the first task;
    * ties: a worker specialised in the service wins them.

    A worker that has not measured its load bandwidth or task time is taken to have the
    fleet's mean; unknowns fleet-wide fall back to the defaults below.
    """

    name = "cost"
    factors = ("state", "queue_s", "download_s", "load_s", "evict_s", "hold_s", "run_s", "total")
    unit = "estimated seconds to serve, lowest wins"
    default_service_s: float = 1.0
    default_load_bps: float = 1.0 * GB
    default_download_bps: float = 0.1 * GB
    default_model_bytes: int = 4 * GB
    load_weight: float = 1.5
    replicate_above: float = 0.5
    """Demand per copy in memory (workers' worth) above which another copy is worth its
    load at face value."""
    queue_weight: float = 0.5
    """Share of the task's own run time charged again per request queued on the worker."""
    demand_horizon_s: float = 60.0
    """How far ahead an evicted model's demand is expected to ask for it again."""
    kv_cache_full: float = 0.9
    """KV-cache use from which a server is taken to queue new requests (as llm-d's picker)."""
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
        demand: Mapping[str, float] | None = None,
    ) -> list[CostCandidate]:
        """Per eligible worker: the model's state there and the parts of the estimate."""
        fleet = list(heartbeats)
        copies: dict[str, int] = {}
        for hb in fleet:
            for m in hb.models_in_memory:
                copies[m] = copies.get(m, 0) + 1
        busy_until: dict[str, float] = {}
        for held in leases.values():
            for worker_id, ready_at in held.items():
                busy_until[worker_id] = max(ready_at, busy_until.get(worker_id, ready_at))
        bandwidths = [hb.load_bps for hb in fleet if hb.load_bps is not None]
        means = [hb.mean_service_s / slowdown(hb) for hb in fleet if hb.mean_service_s is not None]
        view = _FleetView(
            fleet,
            service,
            copies,
            demand,
            busy_until,
            self.default_model_bytes,
            self.default_service_s,
            load_bps=sum(bandwidths) / len(bandwidths) if bandwidths else self.default_load_bps,
            mean_s=sum(means) / len(means) if means else self.default_service_s,
        )
        loading = leases.get(model, {}) if model is not None else {}
        weight = self.load_weight
        if model is not None and view.wanted(model) > self.replicate_above * (
            copies.get(model, 0) + len(loading)
        ):
            weight = 1.0
        fleet_run_s = view.run_s(model) if model is not None else None
        return [
            self._candidate(hb, view, model, fleet_run_s, loading, weight, now)
            for hb in fleet
            if is_eligible(hb, service)
        ]

    def _candidate(
        self,
        hb: Heartbeat,
        view: _FleetView,
        model: str | None,
        fleet_run_s: float | None,
        loading: Mapping[str, float],
        weight: float,
        now: float,
    ) -> CostCandidate:
        times, slower = hb.service_s, slowdown(hb)
        mean_s = hb.mean_service_s
        if mean_s is None:  # a worker that does not report it: its models, unweighted
            mean_s = sum(times.values()) / len(times) if times else view.mean_s * slower
        run_s = times.get(model or "", fleet_run_s * slower if fleet_run_s is not None else mean_s)
        load_bps = hb.load_bps or view.load_bps
        # Whatever the model, a task queues behind the loads the worker is doing.
        ready_in_s = max(0.0, view.busy_until.get(hb.worker_id, now) - now)
        download_s = load_s = evict_s = hold_s = hold_per_request_s = 0.0
        state: ModelState
        if model is None:
            state = "none"
        elif model in hb.models_in_memory:
            state = "memory"
        elif hb.worker_id in loading:
            state = "loading"
        else:
            state = "disk" if model in hb.models_on_disk else "absent"
            load_s = view.size(model) / load_bps
            if state == "absent":
                download_s = view.size(model) / (hb.download_bps or self.default_download_bps)
            hold_s = (download_s + load_s) * (weight - 1.0)
            hold_per_request_s = download_s + load_s
            victim = hb.would_evict
            if victim is not None and victim != model:
                evict_s = self._eviction_s(victim, view, load_bps)
        hold_per_request_s += self.queue_weight * run_s
        fixed_s = download_s + load_s + evict_s + hold_s + run_s
        server_wait_s = self._server_wait_s(hb, view.service, mean_s)
        preference_s = 2 * self.tie_s if hb.specialization == view.service else 0.0
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
            hold_s=hold_s,
            hold_per_request_s=hold_per_request_s,
            run_s=run_s,
            fixed_s=fixed_s,
            server_wait_s=server_wait_s,
            sort_s=fixed_s + server_wait_s - preference_s,
        )

    def _server_wait_s(self, hb: Heartbeat, service: str, per_request_s: float) -> float:
        """The server's own queue beyond the worker's requests (those are counted already),
        and one request more when its KV cache is nearly full: it would queue or preempt."""
        load = hb.server_load.get(service)
        if load is None:
            return 0.0
        wait_s = max(0, load.waiting - hb.active_requests) * per_request_s
        kv = load.kv_cache_usage
        return wait_s + (per_request_s if kv is not None and kv >= self.kv_cache_full else 0.0)

    def _eviction_s(self, victim: str, view: _FleetView, load_bps: float) -> float:
        reload_s = view.size(victim) / load_bps * self.load_weight
        left = view.copies.get(victim, 1) - 1
        if view.demand is None:
            return reload_s if left == 0 else 0.0
        if view.wanted(victim) <= self.replicate_above * left:
            return 0.0  # the copies left serve its demand
        rate = view.demand.get(victim, 0.0)
        return reload_s * (1.0 - math.exp(-rate * self.demand_horizon_s))

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
        # The router's hot path: one flat pass for the sort keys (jitter included), exact
        # figures only for what is returned. 'a if a > b else b' is max() without the call,
        # and sorted() beats heapq.nsmallest at fleet sizes: both count here.
        loads = [
            f if (f := get(c.worker_id, 0)) > c.active_requests else c.active_requests for c in pool
        ]
        keys = [
            (w if (w := c.per_request_s * n) > c.ready_in_s else c.ready_in_s)
            + c.sort_s
            + c.hold_per_request_s * n
            + rand() * jitter
            for c, n in zip(pool, loads, strict=True)
        ]
        order = sorted(range(len(pool)), key=keys.__getitem__)
        ranked: list[Breakdown] = []
        for i in order if limit is None else order[:limit]:
            c, n = pool[i], loads[i]
            queue_s = max(c.per_request_s * n, c.ready_in_s) + c.server_wait_s
            behind_s = c.hold_per_request_s * n
            ranked.append(
                Estimate(
                    worker_id=c.worker_id,
                    state=c.state,
                    queue_s=queue_s,
                    download_s=c.download_s,
                    load_s=c.load_s,
                    evict_s=c.evict_s,
                    hold_s=c.hold_s + behind_s,
                    run_s=c.run_s,
                    total=queue_s + c.fixed_s + behind_s,
                )
            )
        return ranked

    def starts_load(self, winner: CostCandidate, breakdown: Breakdown) -> tuple[str, float] | None:
        """A model on disk or absent starts a load, done once the queue ahead and it are."""
        if winner.model is None or winner.state not in ("disk", "absent"):
            return None
        assert isinstance(breakdown, Estimate)
        return winner.model, breakdown.queue_s + breakdown.download_s + breakdown.load_s


def slowdown(hb: Heartbeat) -> float:
    """The worker's tier prior (:data:`TIER_SLOWDOWN`); an unknown tier counts as a GPU."""
    return TIER_SLOWDOWN.get(hb.tier, 1.0) if hb.tier is not None else 1.0


def _zero() -> float:
    return 0.0
