"""``/metrics``: a Prometheus collector over the fleet's counters and registry in Redis.

The counters are written by every router and broadcast (:mod:`coordinator.fleet.counters`),
so one scrape of one API shows the whole fleet's publishers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from coordinator.core.heartbeat import TIER_NAMES
from coordinator.fleet.counters import LATENCY_BUCKETS_S, SEP, bucket_label
from coordinator.fleet.registry import Registry

COUNTERS = ("routed", "fallback", "model", "latency", "broadcast")

Counts = dict[str, float]


class FleetCollector(Collector):
    """Prometheus collector reading the fleet's counters and registry from Redis."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        """One pipeline of ``HGETALL`` plus a registry snapshot per scrape."""
        data = self._counters()
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
        yield from _model_hits(data["model"])
        yield _latency(data["latency"])
        yield _pairs(
            "aiq_broadcast_worker_outcomes",
            "Broadcast answers per worker",
            data["broadcast"],
            "job_type",
            "status",
        )
        yield self._live_workers()

    def _counters(self) -> dict[str, Counts]:
        keys = self.registry.keys
        pipe = self.registry.client.pipeline(transaction=False)
        for name in COUNTERS:
            pipe.hgetall(keys.metrics(name))
        hashes = dict(zip(COUNTERS, pipe.execute(), strict=True))
        return {
            name: {str(k): float(v) for k, v in values.items()} for name, values in hashes.items()
        }

    def _live_workers(self) -> Metric:
        live = GaugeMetricFamily(
            "aiq_live_workers", "Workers with a live heartbeat", labels=["tier"]
        )
        tiers = dict.fromkeys([*TIER_NAMES.values(), "unknown"], 0)
        for heartbeat in self.registry.live_workers():
            tiers[heartbeat.tier_name] += 1
        for tier, count in tiers.items():
            live.add_metric([tier], count)
        return live


def _model_hits(model: Counts) -> Iterator[Metric]:
    hits, misses = model.get("hit", 0.0), model.get("miss", 0.0)
    counter = CounterMetricFamily(
        "aiq_routing_model_loaded", "Routed tasks whose worker had the model", labels=["result"]
    )
    counter.add_metric(["hit"], hits)
    counter.add_metric(["miss"], misses)
    yield counter
    yield GaugeMetricFamily(
        "aiq_routing_model_hit_ratio",
        "Share of routed model tasks sent to a worker that had the model",
        value=hits / (hits + misses) if hits + misses else math.nan,
    )


def _latency(latency: Counts) -> Metric:
    cumulative, buckets = 0.0, []
    for edge in LATENCY_BUCKETS_S:
        label = bucket_label(edge)
        cumulative += latency.get(label, 0.0)
        buckets.append((label, cumulative))
    return HistogramMetricFamily(
        "aiq_routing_decision_seconds",
        "Time the router takes per decision",
        buckets=buckets,
        sum_value=latency.get("sum", 0.0),
    )


def _pairs(name: str, documentation: str, counts: Counts, *labels: str) -> Metric:
    """A counter whose hash fields are its two label values joined by ``SEP``."""
    family = CounterMetricFamily(name, documentation, labels=list(labels))
    for field, value in sorted(counts.items()):
        family.add_metric(field.split(SEP, 1), value)
    return family
