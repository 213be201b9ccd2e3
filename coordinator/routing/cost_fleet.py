"""What one ``prepare`` of the ``cost`` policy knows about the fleet beyond a single worker:
model sizes and run times, demand, and how busy that demand should keep each worker."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from coordinator.core.heartbeat import TIER_CPU, TIER_GPU, TIER_STORAGE, Heartbeat, is_eligible
from coordinator.routing.interface import Leases

GB: Final = 1_000_000_000
TIER_SLOWDOWN: Final = {TIER_GPU: 1.0, TIER_CPU: 4.0, TIER_STORAGE: 8.0}
"""How much longer a task runs on each tier than on a GPU, until the worker has measured its
own times: a prior, replaced by measurements as they arrive. A 3B model generates about 4x
slower on a server CPU than on a mid-range GPU; a storage host's CPU is weaker still."""


MIN_BALANCED_WORK: Final = 1.0
"""Workers' worth of demand below which the fleet is too idle for how evenly it is busy to
matter: a burst of a few requests for one model must not call for copies everywhere."""


def slowdown(hb: Heartbeat) -> float:
    """The worker's tier prior (:data:`TIER_SLOWDOWN`); an unknown tier counts as a GPU."""
    return TIER_SLOWDOWN.get(hb.tier, 1.0) if hb.tier is not None else 1.0


@dataclass(frozen=True, slots=True)
class CostFleetView:
    """The fleet as one ``prepare`` sees it; every figure is computed once, on first use."""

    heartbeats: Sequence[Heartbeat]
    service: str
    copies: Mapping[str, int]
    """Workers holding each model in memory."""
    demand: Mapping[str, float] | None
    leases: Leases
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
    _busy: dict[str, float] = field(default_factory=dict)
    _speed: dict[str, float] = field(default_factory=dict)
    """Per model, the summed speed (1 / slowdown) of the workers holding or loading it."""
    _fleet: dict[str, float] = field(default_factory=dict)
    """Fleet-wide figures every candidate asks for: computed once, not once per worker."""

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

    def total_wanted(self) -> float:
        """Workers' worth of demand for every model."""
        total = self._fleet.get("wanted")
        if total is None:
            demand = self.demand
            total = self._fleet["wanted"] = sum(map(self.wanted, demand)) if demand else 0.0
        return total

    def share(self, model: str) -> float:
        """``model``'s share of the fleet's demand, in work; 0 when the fleet has less than
        :data:`MIN_BALANCED_WORK` to do."""
        total = self.total_wanted()
        return self.wanted(model) / total if total >= MIN_BALANCED_WORK else 0.0

    def excess(self, hb: Heartbeat, adding: str | None = None) -> float | None:
        """How much busier than the fleet's mean the demand for the models ``hb`` holds
        (and ``adding``, were it loaded there) should keep it: 0.5 is half as busy again,
        -1 idle; ``None`` with less demand than :data:`MIN_BALANCED_WORK`.

        Each model's demand is taken to be split between its holders in proportion to
        their speed, which keeps them equally busy: how the ``cost`` policy spreads a
        model's queue once it builds, and what the balance term steers toward when it
        does not."""
        busy = self._expected_busy()
        mean = self._fleet.get("mean_busy")
        if mean is None:
            mean = self._fleet["mean_busy"] = sum(busy.values()) / len(busy) if busy else 0.0
        mine = busy.get(hb.worker_id)
        if mine is None or mean <= 0:
            return None
        if adding is not None:
            mine += self.wanted(adding) / (self._speed.get(adding, 0.0) + 1.0 / slowdown(hb))
        return (mine / mean - 1.0) * self.idle_share()

    def idle_share(self) -> float:
        """The share of the fleet's capacity its demand leaves idle: queues spread the work
        of a busy fleet by themselves; only an idle-ish one needs steering."""
        idle = self._fleet.get("idle")
        if idle is None:
            capacity = sum(
                1.0 / slowdown(hb) for hb in self.heartbeats if is_eligible(hb, self.service)
            )
            idle = max(0.0, 1.0 - self.total_wanted() / capacity) if capacity > 0 else 0.0
            self._fleet["idle"] = idle
        return idle

    def _expected_busy(self) -> dict[str, float]:
        """Per eligible worker, the share of its time the demand should keep it busy."""
        if self._busy or self.total_wanted() < MIN_BALANCED_WORK:
            return self._busy
        eligible = {hb.worker_id: hb for hb in self.heartbeats if is_eligible(hb, self.service)}
        held: dict[str, set[str]] = {}
        for hb in eligible.values():
            for model in hb.models_in_memory:
                held.setdefault(model, set()).add(hb.worker_id)
        for model, loading in self.leases.items():
            held.setdefault(model, set()).update(w for w in loading if w in eligible)
        busy = dict.fromkeys(eligible, 0.0)
        for model, workers in held.items():
            speed = self._speed[model] = sum(1.0 / slowdown(eligible[w]) for w in workers)
            each = self.wanted(model) / speed if speed > 0 else 0.0
            for w in workers:
                busy[w] += each
        self._busy.update(busy)
        return self._busy
