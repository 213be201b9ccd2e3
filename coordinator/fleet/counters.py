"""Fleet counters kept in Redis by every router and broadcast, read by ``/metrics``.

Routers run in every publishing process (and inside workers, for chord bodies and chain
links), so their counters cannot live in one process's memory: each router adds its
increments to its batched registry write (:mod:`coordinator.fleet.claims`), and the admin
API turns the hashes into Prometheus metrics (:mod:`coordinator.ops.metrics`).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from coordinator.core.keys import Keys

if TYPE_CHECKING:
    from coordinator.fleet.registry import Registry

LATENCY_BUCKETS_S: Final = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 2.5e-2, math.inf)
SEP: Final = "|"
"""Joins the two label values of a counter in its hash field."""

Count = tuple[str, str, float]
"""(hash key, field, increment)"""


def bucket_label(edge: float) -> str:
    """A latency bucket's field name: its upper edge, ``+Inf`` for the last."""
    return "+Inf" if math.isinf(edge) else repr(edge)


_LABELS: Final = tuple(bucket_label(edge) for edge in LATENCY_BUCKETS_S)


@functools.cache
def _metric_keys(keys: Keys) -> tuple[str, str, str, str]:
    # Every routed task counts under these: built once per namespace, not per task.
    m = keys.metrics
    return m("routed"), m("model"), m("latency"), m("fallback")


def routed(
    keys: Keys, worker_id: str, service: str, model_hit: bool | None, latency_s: float
) -> list[Count]:
    """The counters one routed decision adds."""
    routed_key, model_key, latency_key, _ = _metric_keys(keys)
    counts = [(routed_key, f"{worker_id}{SEP}{service}", 1.0)]
    if model_hit is not None:
        counts.append((model_key, "hit" if model_hit else "miss", 1.0))
    return counts + _latency(latency_key, latency_s)


def fell_back(keys: Keys, service: str, reason: str, latency_s: float) -> list[Count]:
    """The counters one decision for a shared queue adds."""
    _, _, latency_key, fallback_key = _metric_keys(keys)
    return [(fallback_key, f"{service}{SEP}{reason}", 1.0), *_latency(latency_key, latency_s)]


def _latency(key: str, seconds: float) -> list[Count]:
    label = _LABELS[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)]
    return [(key, label, 1.0), (key, "sum", seconds), (key, "count", 1.0)]


def record_broadcast(registry: Registry, job_type: str, statuses: Iterable[str]) -> None:
    """Count a finished broadcast's worker outcomes (best effort, one round trip)."""
    key = registry.keys.metrics("broadcast")
    pipe = registry.client.pipeline(transaction=False)
    for status in statuses:
        pipe.hincrbyfloat(key, f"{job_type}{SEP}{status}", 1)
    pipe.execute()
