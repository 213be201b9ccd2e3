"""The coordinator API's endpoints, one :class:`~fastapi.APIRouter` per concern.

:func:`coordinator.ops.api.create_api` mounts them: :func:`health_router` open to all, the
others behind the token (when there is one). Each builder takes only what its endpoints read,
and builds fresh state (a metrics registry, a broadcast semaphore) per API it is mounted on.
"""

from __future__ import annotations

import threading
from typing import Annotated, Any

import redis
from celery import Celery
from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from coordinator.broadcast.client import BroadcastResult, broadcast
from coordinator.core.errors import JobError
from coordinator.dispatch.app import Fleet, fleet_of
from coordinator.ops import admin
from coordinator.ops.admin import ServiceView, WorkerView
from coordinator.ops.metrics import FleetCollector
from coordinator.routing.decisions import Decision

MAX_CONCURRENT_BROADCASTS = 8
"""Broadcasts waiting at once; each holds one of the server's threads until it returns."""


class WorkersResponse(BaseModel):
    """``GET /api/admin/workers``."""

    workers: list[WorkerView]


class ServicesResponse(BaseModel):
    """``GET /api/admin/services``."""

    services: list[ServiceView]


class DecisionsResponse(BaseModel):
    """``GET /api/admin/decisions``: newest first, each with its policy and the best
    candidates' breakdowns."""

    decisions: list[Decision]


class BroadcastRequest(BaseModel):
    """``POST /api/coordinator/broadcast-job``: :func:`coordinator.broadcast.client.broadcast`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    job_type: str = Field(min_length=1, examples=["ping"])
    job_data: dict[str, Any] = Field(examples=[{}])
    required_capability: str | None = Field(default=None, min_length=1)
    timeout_s: float = Field(default=300.0, gt=0.0, le=3600.0)


def health_router(fleet: Fleet) -> APIRouter:
    """``/healthz``, the one endpoint a load balancer may call without the token."""
    router = APIRouter()

    @router.get("/healthz", tags=["health"], responses={503: {"description": "Redis is down"}})
    def healthz() -> JSONResponse:
        """``{"status": "ok", "redis": true}``; 503 ``unavailable`` when the registry's
        Redis does not answer. Never needs the token."""
        try:
            up = bool(fleet.registry.client.ping())
        except redis.RedisError:
            up = False
        return JSONResponse(
            {"status": "ok" if up else "unavailable", "redis": up},
            status_code=status.HTTP_200_OK if up else status.HTTP_503_SERVICE_UNAVAILABLE,
        )

    return router


def admin_router(fleet: Fleet) -> APIRouter:
    """The fleet views the CLI shows (:mod:`coordinator.ops.admin`), as JSON."""
    router = APIRouter()

    @router.get("/api/admin/workers", response_model=WorkersResponse, tags=["admin"])
    def workers() -> dict[str, Any]:
        """Every live worker (its last heartbeat and in-flight count), by id."""
        return {"workers": admin.as_json(admin.workers(fleet.registry))}

    @router.get("/api/admin/services", response_model=ServicesResponse, tags=["admin"])
    def services() -> dict[str, Any]:
        """Each service offered by a live worker, with its workers, by name."""
        return {"services": admin.as_json(admin.services(fleet.registry.live_workers()))}

    @router.get("/api/admin/decisions", response_model=DecisionsResponse, tags=["admin"])
    def decisions(limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict[str, Any]:
        """The newest ``limit`` routing decisions, newest first."""
        return {"decisions": admin.as_json(admin.decisions(fleet.registry, limit))}

    return router


def broadcast_router(app: Celery) -> APIRouter:
    """``POST /api/coordinator/broadcast-job``, at most ``MAX_CONCURRENT_BROADCASTS`` at once."""
    fleet_of(app)  # a fleet app, or a clear error now rather than at the first broadcast
    router = APIRouter()
    in_flight = threading.BoundedSemaphore(MAX_CONCURRENT_BROADCASTS)

    @router.post(
        "/api/coordinator/broadcast-job",
        response_model=BroadcastResult,
        tags=["coordinator"],
        responses={422: {"description": "unknown job type, invalid job_data, no recipient"}},
    )
    def broadcast_job(body: BroadcastRequest) -> BroadcastResult:
        """Run a job on every capable live worker and wait (at most ``timeout_s``) for the
        aggregated answer. A plain ``def``: FastAPI runs the blocking wait in its threadpool,
        and at most ``MAX_CONCURRENT_BROADCASTS`` waits hold its threads (429 beyond)."""
        if not in_flight.acquire(blocking=False):
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                detail=f"{MAX_CONCURRENT_BROADCASTS} broadcasts are already running",
            )
        try:
            return broadcast(
                body.job_type,
                body.job_data,
                body.required_capability,
                timeout_s=body.timeout_s,
                app=app,
            )
        except JobError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
        finally:
            in_flight.release()

    return router


def metrics_router(fleet: Fleet) -> APIRouter:
    """``/metrics`` for Prometheus, from a registry of its own (not the process-wide one)."""
    metrics = CollectorRegistry(auto_describe=False)
    metrics.register(FleetCollector(fleet.registry))
    router = APIRouter()

    @router.get("/metrics", tags=["metrics"], response_class=Response)
    def prometheus_metrics() -> Response:
        """The fleet's counters and live workers, in Prometheus' text format."""
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    return router
