"""How the registry reads the entries it finds in Redis: leniently, so that a bad entry
(written by an older version, or by anyone with access to Redis) costs only itself."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from coordinator.core.heartbeat import MAX_ACTIVE, Heartbeat

Marks = Mapping[str, Sequence[tuple[str, str]]]
"""worker_id -> (service, "marked_at until why") for each service a task found unreachable."""


@dataclass(frozen=True, slots=True)
class FleetRead:
    """What one read of the registry found (:meth:`Registry.read`)."""

    seq: int
    """The fleet's change counter when read."""
    heartbeats: dict[str, tuple[Heartbeat, float | None]]
    """worker_id -> its heartbeat and the seconds its key has to live (``None``: no TTL, or
    a heartbeat renewed without moving the change counters, by an older worker)."""
    unusable: frozenset[str]
    """Workers whose heartbeat is there but malformed or refused: not routable."""
    gone: tuple[str, ...]
    """Workers read whose heartbeat is gone."""
    in_flight: dict[str, int]
    """worker_id -> in-flight count, zero included, for every worker read."""
    marks: dict[str, list[tuple[str, str]]]
    leases: dict[str, dict[str, float]] = field(default_factory=dict)
    demand: dict[str, tuple[float, float]] = field(default_factory=dict)
    """model -> (requests per second, unix time it was last updated)."""


def with_marks(heartbeat: Heartbeat, services: Mapping[str, str] | None) -> Heartbeat:
    """``heartbeat`` with ``services`` (service -> why) counted unhealthy: newer news than
    the heartbeat, since a task could not reach them."""
    if not services:
        return heartbeat
    status = {**heartbeat.services_status, **dict.fromkeys(services, "unhealthy")}
    errors = {**heartbeat.service_errors, **services}
    return heartbeat.model_copy(update={"services_status": status, "service_errors": errors})


def marks_from(flat: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """The script's flat ``id, service, value`` triples by worker."""
    marks: dict[str, list[tuple[str, str]]] = {}
    for worker_id, service, value in zip(flat[::3], flat[1::3], flat[2::3], strict=True):
        marks.setdefault(str(worker_id), []).append((str(service), str(value)))
    return marks


def demand_from(flat: Sequence[str]) -> dict[str, tuple[float, float]]:
    """model -> (rate, at) from the demand hash; a bad entry is skipped."""
    demand = {}
    for model, value in zip(flat[::2], flat[1::2], strict=True):
        rate, _, at = str(value).partition(" ")
        r, t = seconds_from(rate), seconds_from(at)
        if math.isfinite(r) and math.isfinite(t) and r > 0:
            demand[str(model)] = (r, t)
    return demand


def lease_field(model: str, worker_id: str) -> str:
    """The leases hash field of ``worker_id`` loading ``model`` (:mod:`coordinator.core.keys`)."""
    return json.dumps([model, worker_id], separators=(",", ":"))


def leases_from(flat: Sequence[str], now: float) -> dict[str, dict[str, float]]:
    leases: dict[str, dict[str, float]] = {}
    for key, value in zip(flat[::2], flat[1::2], strict=True):
        # Only routers write here, but a bad entry must cost its own lease, not routing.
        try:
            model, worker_id = json.loads(key) if key.startswith("[") else (None, None)
            ready_text, expires_text = value.split()
            ready_at, expires_at = float(ready_text), float(expires_text)
        except (ValueError, TypeError):
            continue
        if (
            isinstance(model, str)
            and isinstance(worker_id, str)
            and math.isfinite(ready_at)
            and expires_at > now
        ):
            leases.setdefault(model, {})[worker_id] = ready_at
    return leases


def ready_at_from(text: str, now: float) -> float:
    try:
        ready_at = float(text)
    except ValueError:
        return now
    return ready_at if math.isfinite(ready_at) else now


def unreachable_from(marks: Marks, now: float) -> dict[str, dict[str, str]]:
    """worker_id -> {service: why} for services marked unreachable and not yet back."""
    out: dict[str, dict[str, str]] = {}
    for worker_id, pairs in marks.items():
        for service, value in pairs:
            _, until, why = (*value.split(" ", 2), "", "")[:3]  # "marked_at until why"
            if seconds_from(until) > now:
                out.setdefault(worker_id, {})[service] = why or "unreachable from a task"
    return out


def seconds_from(text: str) -> float:
    """A number written by this module; anything else (a hand-made entry) reads as 0."""
    try:
        return float(text)
    except ValueError:
        return 0.0


def count_from(value: str) -> int:
    # Only this project writes these counts, but a bad value must not break routing.
    try:
        return min(max(int(value), 0), MAX_ACTIVE)
    except ValueError:
        return 0


@dataclass(frozen=True, slots=True)
class KnownWorker:
    """What the registry keeps of a worker beside its heartbeat, for the reaper: how often it
    heartbeats, its TTL, and which start of it heartbeated last (``None``: not said)."""

    interval_s: float | None = None
    ttl_s: float | None = None
    incarnation: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {"interval_s": self.interval_s, "ttl_s": self.ttl_s, "incarnation": self.incarnation}
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> KnownWorker:
        """Tolerant: an older entry (the worker's queue) or a bad one says nothing."""
        try:
            data = json.loads(raw)
        except ValueError:
            return cls()
        if not isinstance(data, dict):
            return cls()
        return cls(
            _positive(data.get("interval_s")),
            _positive(data.get("ttl_s")),
            data["incarnation"] if isinstance(data.get("incarnation"), str) else None,
        )


def _positive(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 < value < math.inf else None
