"""The ``cost`` policy: the lowest estimated time to serve, cold loads and evictions priced."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

from coordinator.core.heartbeat import Heartbeat, is_eligible
from coordinator.routing.cost_fleet import GB as GB
from coordinator.routing.cost_fleet import TIER_SLOWDOWN as TIER_SLOWDOWN
from coordinator.routing.cost_fleet import CostFleetView, slowdown
from coordinator.routing.interface import NO_LEASES, Breakdown, KeyedPolicy, Leases

ModelState = Literal["memory", "loading", "disk", "absent", "none"]

BALANCE_CAP: Final = 0.5
"""The most a worker's expected busy time over the fleet's mean counts in the balance term
(as a fraction of the mean)."""


class Estimate(NamedTuple):
    """The cost policy's breakdown: estimated seconds until the task is done there.

    A named tuple: the router builds a few for every task, and a frozen dataclass takes
    several times as long to build."""

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
        return list(self)

    def as_dict(self) -> dict[str, float | str]:
        """Named, rounded for people, with the model's state on the worker."""
        out: dict[str, float | str] = {"worker_id": self.worker_id}
        for name, value in zip(CostPolicy.factors, self.as_row()[1:], strict=True):
            out[name] = value if isinstance(value, str) else round(value, 3)
        return out


class CostCandidate(NamedTuple):
    """One worker's time-to-serve estimate for one model, less what depends on its load.

    A named tuple: a pool is rebuilt, one per eligible worker, whenever the fleet changes,
    and a frozen dataclass takes several times as long to build."""

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


class CostPool(list[CostCandidate]):
    """A prepared pool with what it was prepared from: enough to build one worker's
    candidate again when it starts loading the pool's model (:meth:`CostPolicy.lease_taken`)
    without preparing the whole fleet again."""

    def __init__(
        self,
        candidates: Iterable[CostCandidate],
        view: CostFleetView,
        model: str | None,
        fleet_run_s: float | None,
        weight: float,
        replicating: bool,
    ) -> None:
        super().__init__(candidates)
        self.view, self.model, self.fleet_run_s = view, model, fleet_run_s
        self.weight, self.replicating = weight, replicating


@dataclass
class CostPolicy(KeyedPolicy[CostCandidate]):
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
      and warm workers take queues while others idle. A model with more than
      ``replicate_share`` fair shares of the fleet's work per copy calls for another copy
      too, however idle the fleet: one copy of a model with a fifth of the work keeps its
      worker far busier than the rest;
    * balance (in hold): the run again ``balance_weight`` times by how much busier than the
      fleet's mean the demand for the models a worker holds should keep it (credited when
      idler; on a load, the model counts as held), scaled by the idle share of the fleet.
      Left to latency alone, an idle-ish fleet sends everything to warm GPUs: slower
      workers idle and a few fast ones carry the popular models, so one worker does far
      more than its share;
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
    load_weight: float = 10.0
    """How many times over a load is charged unless demand calls for another copy: a load
    evicts a model that some later request must load again, and each load delays the
    requests queued behind it (1.5 made 2-22x the cold loads of the affinity baseline on
    the Azure traces; 20 halves them at load 1.3 but leaves a lone hot copy queueing
    longer before a second is loaded; 30 costs up to 1.5x the median latency)."""
    replicate_above: float = 0.5
    """Demand per copy in memory (workers' worth) above which another copy is worth its
    load at face value."""
    replicate_share: float = 1.3
    """Share of the fleet's work per copy, in workers' fair shares (1 / eligible workers),
    above which another copy is worth its load at face value, however idle the fleet."""
    balance_weight: float = 5.0
    """How many times over the run is charged per unit of a worker's expected busy time
    over the fleet's mean (and credited under it), scaled by the share of the fleet's
    capacity left idle: 0 turns the balance term off. The Azure traces at load 0.5 leave
    most of the fleet idle, and put up to 1.7x the mean busy time on one worker without it;
    higher weights move more models (cold loads) for little more balance."""
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
        view = CostFleetView(
            fleet,
            service,
            copies,
            demand,
            leases,
            busy_until,
            self.default_model_bytes,
            self.default_service_s,
            load_bps=sum(bandwidths) / len(bandwidths) if bandwidths else self.default_load_bps,
            mean_s=sum(means) / len(means) if means else self.default_service_s,
        )
        loading = leases.get(model, {}) if model is not None else {}
        replicating = model is not None and self._wants_copy(
            view, model, copies.get(model, 0) + len(loading)
        )
        weight = 1.0 if replicating else self.load_weight
        fleet_run_s = view.run_s(model) if model is not None else None
        return CostPool(
            (
                self._candidate(hb, view, model, fleet_run_s, loading, weight, now)
                for hb in fleet
                if is_eligible(hb, service)
            ),
            view,
            model,
            fleet_run_s,
            weight,
            replicating,
        )

    def with_leases(
        self, pool: Sequence[CostCandidate], worker_id: str, leases: Leases, now: float
    ) -> CostCandidate | None:
        """``worker_id``'s candidate in ``pool`` now that its loads are ``leases``' (a lease
        taken, ended or moved); ``None`` when the pool must be prepared again: a copy more
        or less of the pool's model changes whether demand wants another, and so every cold
        candidate's price. The rest of the fleet's view (the balance term's shares) takes
        the leases in at the pool's next rebuild."""
        if not isinstance(pool, CostPool):
            return None
        model, view = pool.model, pool.view
        loading = leases.get(model, {}) if model is not None else {}
        held = view.copies.get(model, 0) + len(loading) if model is not None else 0
        if model is not None and self._wants_copy(view, model, held) != pool.replicating:
            return None
        old = next((c for c in pool if c.worker_id == worker_id), None)
        if old is None:
            return None
        busy_until = view.busy_until
        assert isinstance(busy_until, dict)  # the pool's own, built by prepare
        ready = [holders[worker_id] for holders in leases.values() if worker_id in holders]
        if ready:
            busy_until[worker_id] = max(ready)
        else:
            busy_until.pop(worker_id, None)
        return self._candidate(
            old.heartbeat, view, model, pool.fleet_run_s, loading, pool.weight, now
        )

    def _candidate(
        self,
        hb: Heartbeat,
        view: CostFleetView,
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
        download_s = load_s = evict_s = hold_per_request_s = 0.0
        hold_s = self._balance_s(hb, view, model, run_s, cold=False)
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
            hold_s = self._balance_s(hb, view, model, run_s, cold=True)
            hold_s += (download_s + load_s) * (weight - 1.0)
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

    def _wants_copy(self, view: CostFleetView, model: str, held: int) -> bool:
        """Whether demand calls for another copy of ``model``: more demand per copy than
        ``replicate_above`` workers' worth, or a larger share of the fleet's work per copy
        than ``replicate_share`` workers' fair share (one copy of a model with a fifth of
        the work keeps its worker far busier than the rest even when the fleet idles)."""
        if view.wanted(model) > self.replicate_above * held:
            return True
        eligible = sum(1 for hb in view.heartbeats if is_eligible(hb, view.service))
        return held > 0 and view.share(model) / held > self.replicate_share / max(1, eligible)

    def _balance_s(
        self, hb: Heartbeat, view: CostFleetView, model: str | None, run_s: float, cold: bool
    ) -> float:
        """The run again, ``balance_weight`` times over, by how much busier than the fleet's
        mean the demand should keep the worker (negative when idler), the task's model
        counted when it would load there. Capped above, so that a worker far over the mean
        does not make every load elsewhere look cheaper (that churned models)."""
        if model is None or self.balance_weight <= 0:
            return 0.0
        excess = view.excess(hb, adding=model if cold else None)
        if excess is None:
            return 0.0
        return self.balance_weight * run_s * min(excess, BALANCE_CAP)

    def _server_wait_s(self, hb: Heartbeat, service: str, per_request_s: float) -> float:
        """The server's own queue beyond the worker's requests (those are counted already),
        and one request more when its KV cache is nearly full: it would queue or preempt."""
        load = hb.server_load.get(service)
        if load is None:
            return 0.0
        wait_s = max(0, load.waiting - hb.active_requests) * per_request_s
        kv = load.kv_cache_usage
        return wait_s + (per_request_s if kv is not None and kv >= self.kv_cache_full else 0.0)

    def _eviction_s(self, victim: str, view: CostFleetView, load_bps: float) -> float:
        reload_s = view.size(victim) / load_bps * self.load_weight
        left = view.copies.get(victim, 1) - 1
        if view.demand is None:
            return reload_s if left == 0 else 0.0
        if view.wanted(victim) <= self.replicate_above * left:
            return 0.0  # the copies left serve its demand
        rate = view.demand.get(victim, 0.0)
        return reload_s * (1.0 - math.exp(-rate * self.demand_horizon_s))

    def sort_key(self, candidate: CostCandidate, load: int) -> float:
        """The estimate ``rank`` orders by: the total less what does not depend on the
        worker (the server's own queue is in; a specialist's tie-break too)."""
        c = candidate
        wait_s = c.per_request_s * load
        return (
            (wait_s if wait_s > c.ready_in_s else c.ready_in_s)
            + c.sort_s
            + c.hold_per_request_s * load
        )

    def breakdown(self, candidate: CostCandidate, load: int) -> Estimate:
        """The estimate in parts, ``load`` requests ahead."""
        c = candidate
        queue_s = max(c.per_request_s * load, c.ready_in_s) + c.server_wait_s
        behind_s = c.hold_per_request_s * load
        # Positional: the router builds one for every task, and keywords cost a third more.
        return Estimate(
            c.worker_id,
            c.state,
            queue_s,
            c.download_s,
            c.load_s,
            c.evict_s,
            c.hold_s + behind_s,
            c.run_s,
            queue_s + c.fixed_s + behind_s,
        )

    def starts_load(self, winner: CostCandidate, breakdown: Breakdown) -> tuple[str, float] | None:
        """A model on disk or absent starts a load, done once the queue ahead and it are."""
        if winner.model is None or winner.state not in ("disk", "absent"):
            return None
        assert isinstance(breakdown, Estimate)
        return winner.model, breakdown.queue_s + breakdown.download_s + breakdown.load_s
