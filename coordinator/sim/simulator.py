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
            models_on_disk=tuple(self.disk | self.memory.keys()),
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
    simulation = _Simulation(policy, fleet, catalog, seed, len(trace))
    for i, request in enumerate(trace):
        simulation.advance_to(request.arrival_s)
        simulation.arrive(i, request)
    last = simulation.drain()
    makespan = last - trace[0].arrival_s if trace else 0.0
    return simulation.result(makespan)


class _Simulation:
    """The state of one run, and one method per kind of event: an arrival, a completion, a
    heartbeat."""

    def __init__(
        self,
        policy: Policy[Any],
        fleet: FleetSpec,
        catalog: Sequence[ModelSpec],
        seed: int,
        requests: int,
    ) -> None:
        self.policy = policy
        self.fleet = fleet
        self.rng = random.Random(seed)
        self.by_name = {m.name: m for m in catalog}
        self.sizes = {m.name: m.size_bytes for m in catalog}
        placement = random.Random(seed ^ 0x5EED)
        keep = max(1, round(fleet.disk_fraction * len(catalog)))
        self.workers = [
            _Worker(spec, set(placement.sample(sorted(self.sizes), keep)))
            for spec in fleet.worker_specs()
        ]
        self.by_id = {w.spec.worker_id: w for w in self.workers}
        self.in_flight = {w.spec.worker_id: 0 for w in self.workers}
        # model -> worker id -> (in memory at, lease expires at)
        self.leases: dict[str, dict[str, tuple[float, float]]] = {}
        self.served: list[Served | None] = [None] * requests
        self.completions: list[tuple[float, int, str]] = []  # (finish time, sequence, worker id)
        self.sequence = 0  # breaks ties between equal finish times in start order
        self.snapshot: list[Heartbeat] = []
        # One prepared pool per model until the next heartbeat or lease changes it.
        self.pools: dict[str, list[Any]] = {}
        self.demand = Demand()
        self.grace_s = lease_grace_s(fleet.heartbeat_s)  # the router's rule, not a copy of it
        self.next_beat = 0.0

    def advance_to(self, now: float) -> None:
        """Every completion and heartbeat up to ``now``, in time order."""
        while self.completions and self.completions[0][0] <= now:
            done_at, _, worker_id = heapq.heappop(self.completions)
            self._beat_until(done_at)
            self._complete(done_at, worker_id)
        self._beat_until(now)

    def drain(self) -> float:
        """Finish every queued job, with no more heartbeats; the last finish time (0 if none)."""
        last = 0.0
        while self.completions:
            last, _, worker_id = heapq.heappop(self.completions)
            self._complete(last, worker_id)
        return last

    def result(self, makespan_s: float) -> RunResult:
        assert all(s is not None for s in self.served)
        return RunResult(
            self.policy.name,
            tuple(s for s in self.served if s is not None),
            {w.spec.worker_id: w.busy_s for w in self.workers},
            makespan_s,
        )

    def arrive(self, index: int, request: TraceRequest) -> None:
        """Route the request as the router would, and queue it on the winner."""
        now = request.arrival_s
        assert request.model is not None
        model = self.by_name[request.model]
        self.demand.record(model.name, now)
        worker = self._route(model.name, now)
        base_s = request.context_tokens / self.fleet.prefill_tps + (
            request.generated_tokens / self.fleet.decode_tps
        )
        ideal = max(1e-3, base_s * model.cost)
        worker.queue.append(_Job(index, model, now, ideal / worker.spec.speed, ideal))
        self.in_flight[worker.spec.worker_id] += 1
        if worker.running is None:
            self._start(worker, now)

    def _route(self, model: str, now: float) -> _Worker:
        pool = self.pools.get(model)
        if pool is None:
            pool = self.policy.prepare(
                self.snapshot,
                SERVICE,
                model,
                leases=self._lease_view(),
                now=now,
                demand=self.demand.rates(now),
            )
            self.pools[model] = pool
        winner = self.policy.rank(pool, in_flight=self.in_flight, rng=self.rng, limit=1)[0]
        candidate = next(c for c in pool if c.heartbeat.worker_id == winner.worker_id)
        starts = self.policy.starts_load(candidate, winner)
        if starts is not None:
            loaded, ready_in_s = starts
            ready_at = now + ready_in_s
            self.leases.setdefault(loaded, {})[winner.worker_id] = (
                ready_at,
                ready_at + self.grace_s,
            )
            self.pools.pop(loaded, None)  # its pool no longer sees the new lease
        return self.by_id[winner.worker_id]

    def _lease_view(self) -> Leases:
        return {m: {h: v[0] for h, v in held.items()} for m, held in self.leases.items()}

    def _start(self, w: _Worker, now: float) -> None:
        """The next job of ``w``'s queue starts: fetch its model, then run it."""
        job = w.queue.popleft()
        w.settle(now)
        download, load = self._fetch(w, job.model, now)
        finish = now + download + load + job.run_s
        w.running = job
        w.busy_s += finish - now
        self.served[job.index] = Served(
            job.index,
            w.spec.worker_id,
            finish - job.arrival_s,
            finish - now,
            job.ideal_s,
            cold_load=load > 0,
            download=download > 0,
            reload_after_eviction=load > 0 and job.model.name in w.evicted,
        )
        if load > 0:
            w.measured_load_bps = w.spec.load_bps
        self.sequence += 1
        heapq.heappush(self.completions, (finish, self.sequence, w.spec.worker_id))

    @staticmethod
    def _fetch(w: _Worker, model: ModelSpec, now: float) -> tuple[float, float]:
        """Seconds to download and to load ``model`` on ``w`` (0 when present), evicting
        the least recently used model when every slot is taken."""
        download = load = 0.0
        # FIFO: the job that started a load has finished by now, so settle() put it in memory.
        if model.name in w.memory:
            w.memory.move_to_end(model.name)
            return download, load
        if model.name not in w.disk:
            download = model.size_bytes / w.spec.download_bps
            w.disk.add(model.name)
        load = model.size_bytes / w.spec.load_bps
        if len(w.memory) >= w.spec.slots:
            victim, _ = w.memory.popitem(last=False)
            w.evicted.add(victim)
        w.loading = (model.name, now + download + load)
        return download, load

    def _complete(self, now: float, worker_id: str) -> None:
        """``worker_id``'s running job is done: learn its service time, start the next."""
        w = self.by_id[worker_id]
        job = w.running
        assert job is not None
        w.settle(now)
        old = w.service_s.get(job.model.name)
        w.service_s[job.model.name] = _ewma(old, job.run_s)
        w.mean_service_s = _ewma(w.mean_service_s, job.run_s)
        w.running = None
        self.in_flight[worker_id] -= 1
        if w.queue:
            self._start(w, now)

    def _beat_until(self, until: float) -> None:
        while self.next_beat <= until:
            self._beat(self.next_beat)
            self.next_beat += self.fleet.heartbeat_s

    def _beat(self, now: float) -> None:
        """Every worker publishes a heartbeat; expired leases go; every pool is stale."""
        self.snapshot = [w.heartbeat(now, self.sizes) for w in self.workers]
        for model in list(self.leases):
            live = {h: v for h, v in self.leases[model].items() if v[1] > now}
            if live:
                self.leases[model] = live
            else:
                del self.leases[model]
        self.pools.clear()


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + EWMA_ALPHA * (new - old)
