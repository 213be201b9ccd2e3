"""Fleet metrics: counters kept in Redis by every router and broadcast, read by ``/metrics``.

Routers run in every publishing process (and inside workers, for chord bodies and chain
links), so their counters cannot live in one process's memory: each router adds its
increments to its batched registry write, and the admin API turns the Redis hashes into
Prometheus metrics (see :class:`FleetCollector`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from coordinator.heartbeat import TIER_NAMES
from coordinator.keys import Keys

if TYPE_CHECKING:
    from coordinator.broadcast import BroadcastResult
    from coordinator.registry import Registry

LATENCY_BUCKETS_S: Final = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 2.5e-2, math.inf)
SEP: Final = "|"

Count = tuple[str, str, float]


def _bucket(seconds: float) -> str:
    edge = next(b for b in LATENCY_BUCKETS_S if seconds <= b)
    return "+Inf" if math.isinf(edge) else repr(edge)


def routed(
    keys: Keys, worker_id: str, service: str, model_hit: bool | None, latency_s: float
) -> list[Count]:
    """The counters one routed decision adds."""
    counts = [(keys.metrics("routed"), f"{worker_id}{SEP}{service}", 1.0)]
    if model_hit is not None:
        counts.append((keys.metrics("model"), "hit" if model_hit else "miss", 1.0))
    return counts + _latency(keys, latency_s)


def fell_back(keys: Keys, service: str, reason: str, latency_s: float) -> list[Count]:
    """The counters one decision for a shared queue adds."""
    return [(keys.metrics("fallback"), f"{service}{SEP}{reason}", 1.0), *_latency(keys, latency_s)]


def _latency(keys: Keys, seconds: float) -> list[Count]:
    key = keys.metrics("latency")
    return [(key, _bucket(seconds), 1.0), (key, "sum", seconds), (key, "count", 1.0)]


def record_broadcast(registry: Registry, result: BroadcastResult) -> None:
    """Count a finished broadcast's worker outcomes (best effort, one round trip)."""
    key = registry.keys.metrics("broadcast")
    pipe = registry.client.pipeline(transaction=False)
    for worker in result.workers:
        pipe.hincrbyfloat(key, f"{result.job_type}{SEP}{worker.status}", 1)
    pipe.execute()


class FleetCollector(Collector):
    """Prometheus collector reading the fleet's counters and registry from Redis."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        """One pipeline of ``HGETALL`` plus a registry snapshot per scrape."""
        keys = self.registry.keys
        names = ("routed", "fallback", "model", "latency", "broadcast")
        pipe = self.registry.client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(keys.metrics(name))
        hashes = dict(zip(names, pipe.execute(), strict=True))
        data = {
            name: {str(k): float(v) for k, v in values.items()} for name, values in hashes.items()
        }

        yield _pairs(
            "aiq_routing_decisions",
            "Tasks routed to a worker's queue",
            data["routed"],
            "worker",
            "service",
        )
        yield _pairs(
            "aiq_routing_fallbacks",
            "Tasks sent to a service's shared queue",
            data["fallback"],
            "service",
            "reason",
        )

        hits, misses = data["model"].get("hit", 0.0), data["model"].get("miss", 0.0)
        model = CounterMetricFamily(
            "aiq_routing_model_loaded", "Routed tasks whose worker had the model", labels=["result"]
        )
        model.add_metric(["hit"], hits)
        model.add_metric(["miss"], misses)
        yield model
        yield GaugeMetricFamily(
            "aiq_routing_model_hit_ratio",
            "Share of routed model tasks sent to a worker that had the model",
            value=hits / (hits + misses) if hits + misses else math.nan,
        )

        latency = data["latency"]
        cumulative, buckets = 0.0, []
        for edge in LATENCY_BUCKETS_S:
            label = "+Inf" if math.isinf(edge) else repr(edge)
            cumulative += latency.get(label, 0.0)
            buckets.append((label, cumulative))
        yield HistogramMetricFamily(
            "aiq_routing_decision_seconds",
            "Time the router takes per decision",
            buckets=buckets,
            sum_value=latency.get("sum", 0.0),
        )

        yield _pairs(
            "aiq_broadcast_worker_outcomes",
            "Broadcast answers per worker",
            data["broadcast"],
            "job_type",
            "status",
        )

        live = GaugeMetricFamily(
            "aiq_live_workers", "Workers with a live heartbeat", labels=["tier"]
        )
        tiers = dict.fromkeys([*TIER_NAMES.values(), "unknown"], 0)
        for heartbeat in self.registry.live_workers():
            tiers[heartbeat.tier_name] += 1
        for tier, count in tiers.items():
            live.add_metric([tier], count)
        yield live


def _pairs(name: str, documentation: str, counts: dict[str, float], *labels: str) -> Metric:
    """A counter whose hash fields are its two label values joined by ``SEP``."""
    family = CounterMetricFamily(name, documentation, labels=list(labels))
    for field, value in sorted(counts.items()):
        family.add_metric(field.split(SEP, 1), value)
    return family
