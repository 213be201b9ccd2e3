"""What operators see: the fleet, its services and recent decisions, as plain data.

Shared by the admin HTTP API and the CLI so both always show the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from coordinator.core.heartbeat import Heartbeat
from coordinator.fleet.registry import Registry
from coordinator.routing.decisions import Decision


class WorkerView(BaseModel):
    """One worker as ``GET /api/admin/workers`` shows it (the design's fields)."""

    worker_id: str
    status: str
    tier: int | None
    tier_name: str
    specialization: str | None
    loaded_models: list[str]
    models_in_memory: list[str]
    active_requests: int
    in_flight: int
    current_load: float
    gpu_utilization: float | None
    available_memory: str | None
    services_status: dict[str, str]
    service_errors: dict[str, str]
    capabilities: list[str]
    queue: str | None
    last_seen: float | None


class ServiceView(BaseModel):
    """One service as ``GET /api/admin/services`` shows it."""

    name: str
    worker_count: int
    healthy_count: int
    workers: list[str]


def worker_view(heartbeat: Heartbeat, queue: str, in_flight: int = 0) -> WorkerView:
    """A heartbeat as operators read it, with the worker's queue (never the one it names)."""
    return WorkerView(
        worker_id=heartbeat.worker_id,
        status=heartbeat.status,
        tier=heartbeat.tier,
        tier_name=heartbeat.tier_name,
        specialization=heartbeat.specialization,
        loaded_models=list(heartbeat.models_on_disk),
        models_in_memory=list(heartbeat.models_in_memory),
        active_requests=heartbeat.active_requests,
        in_flight=in_flight,
        current_load=heartbeat.current_load,
        gpu_utilization=heartbeat.gpu_utilization,
        available_memory=heartbeat.available_memory,
        services_status=dict(heartbeat.services_status),
        service_errors=dict(heartbeat.service_errors),
        capabilities=list(heartbeat.capabilities),
        queue=queue,
        last_seen=heartbeat.timestamp,
    )


def workers(registry: Registry) -> list[WorkerView]:
    """Every live worker, by id."""
    snapshot, keys = registry.snapshot(), registry.keys
    return sorted(
        (
            worker_view(
                hb, keys.worker_queue(hb.worker_id), snapshot.in_flight.get(hb.worker_id, 0)
            )
            for hb in snapshot.heartbeats
        ),
        key=lambda w: w.worker_id,
    )


def services(heartbeats: Sequence[Heartbeat]) -> list[ServiceView]:
    """Which live workers offer each service, by service name."""
    offered: dict[str, list[Heartbeat]] = {}
    for hb in heartbeats:
        for service in hb.capabilities:
            offered.setdefault(service, []).append(hb)
    return [
        ServiceView(
            name=name,
            worker_count=len(hbs),
            healthy_count=sum(1 for hb in hbs if hb.services_status.get(name) == "healthy"),
            workers=sorted(hb.worker_id for hb in hbs),
        )
        for name, hbs in sorted(offered.items())
    ]


def decisions(registry: Registry, limit: int = 50) -> list[Decision]:
    """The newest ``limit`` routing decisions, newest first; unreadable entries skipped."""
    out = []
    for raw in registry.recent_decisions(limit):
        try:
            out.append(Decision.model_validate_json(raw))
        except ValueError:
            continue
    return out


def as_json(models: Sequence[BaseModel]) -> list[dict[str, Any]]:
    """JSON-ready dicts of ``models``."""
    return [m.model_dump(mode="json") for m in models]
