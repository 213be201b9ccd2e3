"""A discrete-event simulation of the fleet, routed by the real policy classes.

What is simulated: workers with a tier, a speed, a number of model slots (LRU eviction, as
Ollama's ``OLLAMA_MAX_LOADED_MODELS``), disk-to-memory load and download bandwidths; each
runs one request at a time from its own FIFO queue (batching is folded into the token
rates). What is real: the routing. Every arrival is routed by the policy's own
``prepare``/``rank`` on heartbeats (:class:`~coordinator.core.heartbeat.Heartbeat`) the workers
publish every ``heartbeat_s``, with the router's exact in-flight counts, and with model-load
leases taken where the policy says a task starts a load, as :class:`FleetRouter` does.

A request's time on a worker: download (model absent) + load (model not in memory) +
run, where run = (context / prefill rate + generated / decode rate) x the model's
relative cost (its size over 5 GB: decoding is memory-bound) / the worker's speed.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from coordinator.core.heartbeat import TIER_BY_NAME, Heartbeat
from coordinator.routing import Leases, Policy
from coordinator.routing.demand import Demand
from coordinator.routing.interface import lease_grace_s
from coordinator.sim.traces import TraceRequest

GB: Final = 1_000_000_000
SERVICE: Final = "vllm"
REFERENCE_BYTES: Final = 5 * GB
EWMA_ALPHA: Final = 0.2


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model of the catalogue: its name and size (bytes, on disk and in memory)."""

    name: str
    size_bytes: int

    @property
    def cost(self) -> float:
        """Run time relative to a 5 GB model."""
        return max(0.25, self.size_bytes / REFERENCE_BYTES)


# Ollama Q4 sizes of common open models, most popular (by the Zipf rule) first.
CATALOG: Final = (
    ModelSpec("llama3.2:1b", int(1.3 * GB)),
    ModelSpec("llama3.2:3b", int(2.0 * GB)),
    ModelSpec("mistral:7b", int(4.1 * GB)),
    ModelSpec("qwen2.5:7b", int(4.7 * GB)),
    ModelSpec("llama3.1:8b", int(4.9 * GB)),
    ModelSpec("gemma2:9b", int(5.4 * GB)),
    ModelSpec("phi3:14b", int(7.9 * GB)),
    ModelSpec("qwen2.5:14b", int(9.0 * GB)),
    ModelSpec("qwen2.5:32b", int(20 * GB)),
    ModelSpec("deepseek-r1:32b", int(20 * GB)),
    ModelSpec("mixtral:8x7b", int(26 * GB)),
    ModelSpec("llama3.1:70b", int(40 * GB)),
)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One simulated worker."""

    worker_id: str
    tier: str
    speed: float
    slots: int
    load_bps: float
    download_bps: float


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """The simulated fleet and its workload constants; defaults are the README's runs."""

    workers: int = 8
    gpu_workers: int = 5
    """The rest are CPU-tier: half the speed, half the load bandwidth."""
    slots: int = 3
    gpu_load_bps: float = 2.0 * GB
    download_bps: float = 0.1 * GB
    disk_fraction: float = 0.5
    """Share of the catalogue each worker has on disk at the start (drawn per seed)."""
    prefill_tps: float = 6000.0
    decode_tps: float = 600.0
    heartbeat_s: float = 2.0

    def worker_specs(self) -> list[WorkerSpec]:
        """The workers, GPU tier first."""
        specs = []
        for i in range(self.workers):
            gpu = i < self.gpu_workers
            specs.append(
                WorkerSpec(
                    worker_id=f"{'gpu' if gpu else 'cpu'}-{i + 1}",
                    tier="gpu" if gpu else "cpu",
                    speed=1.0 if gpu else 0.5,
                    slots=self.slots,
                    load_bps=self.gpu_load_bps if gpu else self.gpu_load_bps / 2,
                    download_bps=self.download_bps,
                )
            )
        return specs


@dataclass
class _Job:
    index: int
    model: ModelSpec
    arrival_s: float
    run_s: float
    ideal_s: float


@dataclass
class _Worker:
    spec: WorkerSpec
    disk: set[str]
    memory: OrderedDict[str, None] = field(default_factory=OrderedDict)  # LRU first
    loading: tuple[str, float] | None = None  # model, in memory from this time on
    queue: deque[_Job] = field(default_factory=deque)
    running: _Job | None = None
    busy_s: float = 0.0
    service_s: dict[str, float] = field(default_factory=dict)
    mean_service_s: float | None = None
    measured_load_bps: float | None = None
    evicted: set[str] = field(default_factory=set)

    def settle(self, now: float) -> None:
        """A load whose time has come is in memory."""
        if self.loading is not None and self.loading[1] <= now:
            self.memory[self.loading[0]] = None
            self.loading = None

    def heartbeat(self, now: float, sizes: Mapping[str, int]) -> Heartbeat:
        self.settle(now)
        spec = self.spec
        in_memory = tuple(self.memory)
        full = len(in_memory) + (self.loading is not None) >= spec.slots
        busy = 1.0 if self.running is not None else 0.0
        # model_construct: these values are valid by construction, and this runs ~10^5 times.
        return Heartbeat.model_construct(
            worker_id=spec.worker_id,
            status="healthy",
            current_load=busy,
            gpu_utilization=busy * 100.0 if spec.tier == "gpu" else None,
            active_requests=0,  # the router's in-flight count is exact here
            loaded_models=tuple(self.disk | self.memory.keys()),
            models_in_memory=in_memory,
            specialization=None,
            services_status={SERVICE: "healthy"},
            tier=TIER_BY_NAME[spec.tier],
            capabilities=(SERVICE,),
            queue=None,
            timestamp=now,
            model_bytes={m: sizes[m] for m in self.disk},
            service_s=dict(self.service_s),
            mean_service_s=self.mean_service_s,
            model_slots=spec.slots,
            would_evict=in_memory[0] if full and in_memory else None,
            load_bps=self.measured_load_bps,
            download_bps=spec.download_bps,
        )


@dataclass(frozen=True, slots=True)
class Served:
    """What happened to one request."""

    index: int
    worker_id: str
    latency_s: float
    work_s: float
    """Time the worker spent on it: download + load + run."""
    ideal_s: float
    cold_load: bool
    download: bool
    reload_after_eviction: bool


@dataclass(frozen=True, slots=True)
class RunResult:
    """One policy on one trace: every request, in arrival order, and each worker's busy time."""

    policy: str
    served: tuple[Served, ...]
    busy_s: Mapping[str, float]
    makespan_s: float


def run(
    policy: Policy[Any],
    trace: Sequence[TraceRequest],
    *,
    fleet: FleetSpec,
    catalog: Sequence[ModelSpec],
    seed: int,
) -> RunResult:
    """Route and serve every request of ``trace`` (each must name a catalogue model)."""
    rng = random.Random(seed)
    by_name = {m.name: m for m in catalog}
    sizes = {m.name: m.size_bytes for m in catalog}
    placement = random.Random(seed ^ 0x5EED)
    keep = max(1, round(fleet.disk_fraction * len(catalog)))
    workers = [
        _Worker(spec, set(placement.sample(sorted(sizes), keep))) for spec in fleet.worker_specs()
    ]
    index = {w.spec.worker_id: w for w in workers}
    outstanding = {w.spec.worker_id: 0 for w in workers}
    leases: dict[str, dict[str, tuple[float, float]]] = {}
    served: list[Served | None] = [None] * len(trace)
    events: list[tuple[float, int, str]] = []  # (finish time, sequence, worker id)
    seq = 0
    snapshot: list[Heartbeat] = []
    pools: dict[str, list[Any]] = {}
    demand = Demand()
    grace_s = lease_grace_s(fleet.heartbeat_s)  # the router's rule, not a copy of it
    next_beat = 0.0

    def start(w: _Worker, now: float) -> None:
        nonlocal seq
        job = w.queue.popleft()
        w.settle(now)
        name = job.model.name
        download = load = 0.0
        # FIFO: the job that started a load has finished by now, so settle() put it in memory.
        if name in w.memory:
            w.memory.move_to_end(name)
        else:
            if name not in w.disk:
                download = job.model.size_bytes / w.spec.download_bps
                w.disk.add(name)
            load = job.model.size_bytes / w.spec.load_bps
            if len(w.memory) >= w.spec.slots:
                victim, _ = w.memory.popitem(last=False)
                w.evicted.add(victim)
            w.loading = (name, now + download + load)
        finish = now + download + load + job.run_s
        w.running = job
        w.busy_s += finish - now
        served[job.index] = Served(
            job.index,
            w.spec.worker_id,
            finish - job.arrival_s,
            finish - now,
            job.ideal_s,
            cold_load=load > 0,
            download=download > 0,
            reload_after_eviction=load > 0 and name in w.evicted,
        )
        if load > 0:
            w.measured_load_bps = w.spec.load_bps
        seq += 1
        heapq.heappush(events, (finish, seq, w.spec.worker_id))

    def finish(now: float, worker_id: str) -> None:
        w = index[worker_id]
        job = w.running
        assert job is not None
        w.settle(now)
        old = w.service_s.get(job.model.name)
        w.service_s[job.model.name] = _ewma(old, job.run_s)
        w.mean_service_s = _ewma(w.mean_service_s, job.run_s)
        w.running = None
        outstanding[worker_id] -= 1
        if w.queue:
            start(w, now)

    def beat(now: float) -> None:
        nonlocal snapshot
        snapshot = [w.heartbeat(now, sizes) for w in workers]
        for model in list(leases):
            live = {h: v for h, v in leases[model].items() if v[1] > now}
            if live:
                leases[model] = live
            else:
                del leases[model]
        pools.clear()

    def lease_view() -> Leases:
        return {m: {h: v[0] for h, v in held.items()} for m, held in leases.items()}

    for i, request in enumerate(trace):
        now = request.arrival_s
        while events and events[0][0] <= now:
            done_at, _, worker_id = heapq.heappop(events)
            while next_beat <= done_at:
                beat(next_beat)
                next_beat += fleet.heartbeat_s
            finish(done_at, worker_id)
        while next_beat <= now:
            beat(next_beat)
            next_beat += fleet.heartbeat_s
        assert request.model is not None
        model = by_name[request.model]
        demand.record(model.name, now)
        pool = pools.get(model.name)
        if pool is None:
            pool = policy.prepare(
                snapshot,
                SERVICE,
                model.name,
                leases=lease_view(),
                now=now,
                demand=demand.rates(now),
            )
            pools[model.name] = pool
        ranked = policy.rank(pool, in_flight=outstanding, rng=rng, limit=1)
        winner = ranked[0]
        candidate = next(c for c in pool if c.heartbeat.worker_id == winner.worker_id)
        starts = policy.starts_load(candidate, winner)
        if starts is not None:
            loaded, ready_in_s = starts
            ready_at = now + ready_in_s
            leases.setdefault(loaded, {})[winner.worker_id] = (
                ready_at,
                ready_at + grace_s,
            )
            pools.pop(loaded, None)
        w = index[winner.worker_id]
        base_s = request.context_tokens / fleet.prefill_tps + (
            request.generated_tokens / fleet.decode_tps
        )
        ideal = max(1e-3, base_s * model.cost)
        w.queue.append(_Job(i, model, now, ideal / w.spec.speed, ideal))
        outstanding[w.spec.worker_id] += 1
        if w.running is None:
            start(w, now)
    last = 0.0
    while events:
        last, _, worker_id = heapq.heappop(events)
        finish(last, worker_id)
    makespan = last - trace[0].arrival_s if trace else 0.0
    assert all(s is not None for s in served)
    return RunResult(
        policy.name,
        tuple(s for s in served if s is not None),
        {w.spec.worker_id: w.busy_s for w in workers},
        makespan,
    )


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + EWMA_ALPHA * (new - old)
