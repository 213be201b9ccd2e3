"""The coordinator's HTTP API: fleet views for operators, broadcast jobs, Prometheus metrics.

Every endpoint reads Redis through the app's registry; the views are the ones the CLI shows
(:mod:`coordinator.ops.admin`). With a token, every endpoint but ``/healthz`` (the API docs
included) wants ``Authorization: Bearer <token>``; without one, :func:`serve` binds to a
loopback address only.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

import redis
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from kombu.exceptions import OperationalError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from coordinator.broadcast.client import BroadcastResult, broadcast
from coordinator.core.errors import ConfigError, JobError
from coordinator.core.settings import CoordinatorSettings
from coordinator.dispatch.app import FleetApp, create_app
from coordinator.fleet.registry import redact_url
from coordinator.ops import admin
from coordinator.ops.admin import ServiceView, WorkerView
from coordinator.ops.metrics import FleetCollector
from coordinator.recovery.reaper import Reaper
from coordinator.routing.decisions import Decision

log = logging.getLogger(__name__)

OPENAPI_URL = "/openapi.json"
MAX_BODY_BYTES = 32 * 1024 * 1024
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


def _detail(what: str, url: str, exc: Exception) -> str:
    """``<what> unreachable: <url>: <error>`` with the URL's password blanked everywhere."""
    message = str(exc)
    parts = urlsplit(url)
    for secret in [parts.password or "", *parse_qs(parts.query).get("password", [])]:
        if secret:
            message = message.replace(secret, "***")
    return f"{what} unreachable: {redact_url(url)}: {message}"


BEARER = HTTPBearer(auto_error=False, description="COORDINATOR_API_TOKEN")


class TokenGuard:
    """A dependency that refuses requests without ``Authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    def __repr__(self) -> str:
        return "TokenGuard(***)"

    def __call__(
        self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
    ) -> None:
        # Bytes on both sides: compare_digest refuses non-ASCII str, and a header may hold any.
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, self._expected):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="missing or invalid bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )


def create_api(app: FleetApp, *, token: str | None) -> FastAPI:
    """The HTTP API over ``app``'s registry and broker; docs at ``/docs``.

    ``token`` ``None`` leaves every endpoint open (:func:`serve` then binds to loopback).
    """
    if token is not None and not token.strip():
        raise ConfigError("COORDINATOR_API_TOKEN is empty: set a real token or leave it unset")
    settings = app.settings
    metrics = CollectorRegistry(auto_describe=False)
    metrics.register(FleetCollector(app.registry))

    api = FastAPI(
        title="ai-task-coordinator",
        summary="Fleet views, broadcast jobs and metrics of a Celery + Redis AI task router",
        docs_url=None,  # served below, behind the token
        redoc_url=None,
        openapi_url=None,
    )
    guarded = APIRouter(dependencies=[Depends(TokenGuard(token))] if token else [])

    @api.middleware("http")
    async def _limit_body(request: Request, call_next: Any) -> Any:
        # Refused before it is read: a body this size is a mistake or an attack.
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return JSONResponse(
                {"detail": f"request body over {MAX_BODY_BYTES} bytes (content-length {length!r})"},
                status_code=status.HTTP_413_CONTENT_TOO_LARGE,
            )
        return await call_next(request)

    @api.exception_handler(RequestValidationError)
    def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input back, and a NaN or a lone surrogate in it
        # makes the answer itself fail (a 500). Name the field and the problem only.
        detail = [
            {
                "loc": [_printable(part) for part in err.get("loc", ())],
                "msg": _printable(err.get("msg", "")),
                "type": err.get("type", ""),
            }
            for err in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @api.exception_handler(redis.RedisError)
    def _registry_down(request: Request, exc: Exception) -> JSONResponse:
        detail = _detail("registry", settings.registry_redis_url, exc)
        log.warning("%s %s: %s", request.method, request.url.path, detail)
        return JSONResponse({"detail": detail}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

    @api.exception_handler(OperationalError)
    def _broker_down(request: Request, exc: Exception) -> JSONResponse:
        detail = _detail("broker", settings.redis_url, exc)
        log.warning("%s %s: %s", request.method, request.url.path, detail)
        return JSONResponse({"detail": detail}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

    @api.get("/healthz", tags=["health"], responses={503: {"description": "Redis is down"}})
    def healthz() -> JSONResponse:
        """``{"status": "ok", "redis": true}``; 503 ``unavailable`` when the registry's
        Redis does not answer. Never needs the token."""
        try:
            up = bool(app.registry.client.ping())
        except redis.RedisError:
            up = False
        return JSONResponse(
            {"status": "ok" if up else "unavailable", "redis": up},
            status_code=status.HTTP_200_OK if up else status.HTTP_503_SERVICE_UNAVAILABLE,
        )

    @guarded.get("/api/admin/workers", response_model=WorkersResponse, tags=["admin"])
    def workers() -> dict[str, Any]:
        """Every live worker (its last heartbeat and in-flight count), by id."""
        return {"workers": admin.as_json(admin.workers(app.registry))}

    @guarded.get("/api/admin/services", response_model=ServicesResponse, tags=["admin"])
    def services() -> dict[str, Any]:
        """Each service offered by a live worker, with its workers, by name."""
        return {"services": admin.as_json(admin.services(app.registry.live_workers()))}

    @guarded.get("/api/admin/decisions", response_model=DecisionsResponse, tags=["admin"])
    def decisions(limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict[str, Any]:
        """The newest ``limit`` routing decisions, newest first."""
        return {"decisions": admin.as_json(admin.decisions(app.registry, limit))}

    in_flight = threading.BoundedSemaphore(MAX_CONCURRENT_BROADCASTS)

    @guarded.post(
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

    @guarded.get("/metrics", tags=["metrics"], response_class=Response)
    def prometheus_metrics() -> Response:
        """The fleet's counters and live workers, in Prometheus' text format."""
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @guarded.get(OPENAPI_URL, include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(api.openapi())

    @guarded.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=OPENAPI_URL, title=f"{api.title} - docs")

    api.include_router(guarded)
    return api


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def _printable(value: object) -> str | int:
    if isinstance(value, int):
        return value
    return str(value).encode("utf-8", "replace").decode("utf-8")


def serve(settings: CoordinatorSettings, *, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Run the API with uvicorn until interrupted (blocking).

    Raises:
        ConfigError: no ``COORDINATOR_API_TOKEN`` and ``host`` is not a loopback address.
    """
    secret = settings.coordinator_api_token
    token = (secret.get_secret_value() if secret is not None else "") or None
    if token is None:
        if not is_loopback(host):
            raise ConfigError(
                f"refusing to serve the coordinator API on {host!r} without a token: "
                "set COORDINATOR_API_TOKEN, or bind to 127.0.0.1"
            )
        log.warning("serving without a token, loopback only (%s:%d)", host, port)
    app = create_app(settings)
    # The reaper runs beside the API, so a fleet with an admin API recovers dead workers'
    # tasks without one more process to deploy.
    stop = threading.Event()
    reaper = threading.Thread(
        target=Reaper(app, settings.grace_s).run,
        args=(settings.heartbeat_interval_s, stop),
        name="reaper",
        daemon=True,
    )
    reaper.start()
    try:
        uvicorn.run(create_api(app, token=token), host=host, port=port)
    finally:
        stop.set()
        app.close()
