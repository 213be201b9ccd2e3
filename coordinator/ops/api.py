"""The coordinator's HTTP API: fleet views for operators, broadcast jobs, Prometheus metrics.

Every endpoint reads Redis through the app's registry; the views are the ones the CLI shows
(:mod:`coordinator.ops.admin`). With a token, every endpoint but ``/healthz`` and the API's
own documentation wants ``Authorization: Bearer <token>``; without one, :func:`serve` binds
to a loopback address only. The endpoints themselves are in
:mod:`coordinator.ops.api_routes`; this module assembles them with the token and body-size
gate (:mod:`coordinator.ops.request_gate`) and the error handlers.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
from collections.abc import Callable
from typing import Annotated
from urllib.parse import parse_qs, urlsplit

import redis
import uvicorn
from celery import Celery
from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.params import Depends as DependsParam
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from kombu.exceptions import OperationalError

from coordinator.core.errors import ConfigError
from coordinator.core.settings import CoordinatorSettings, redact_url
from coordinator.dispatch.app import create_app, fleet_of
from coordinator.ops.api_routes import (
    MAX_CONCURRENT_BROADCASTS,
    BroadcastRequest,
    DecisionsResponse,
    ServicesResponse,
    WorkersResponse,
    admin_router,
    broadcast_router,
    health_router,
    metrics_router,
)
from coordinator.ops.request_gate import RequestGate
from coordinator.recovery.reaper import Reaper

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_CONCURRENT_BROADCASTS",
    "BroadcastRequest",
    "DecisionsResponse",
    "ServicesResponse",
    "TokenGuard",
    "WorkersResponse",
    "create_api",
    "is_loopback",
    "serve",
]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024


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


def create_api(app: Celery, *, token: str | None) -> FastAPI:
    """The HTTP API over ``app``'s registry and broker; docs at ``/docs``.

    ``token`` ``None`` leaves every endpoint open (:func:`serve` then binds to loopback).
    """
    if token is not None and not token.strip():
        raise ConfigError("COORDINATOR_API_TOKEN is empty: set a real token or leave it unset")
    # The documentation (/docs, /redoc, /openapi.json and their scripts, served from the
    # package rather than a CDN) stays open: it describes the code, which is public, and holds
    # nothing of the fleet; a browser opens it and sends the token through "Authorize".
    api = FastAPIOffline(
        title="ai-task-coordinator",
        summary="Fleet views, broadcast jobs and metrics of a Celery + Redis AI task router",
    )
    # Before anything reads a body: the token from the headers, then the body's size as it
    # streams (the route's token dependency below only documents it in the OpenAPI).
    api.add_middleware(RequestGate, token=token, max_body_bytes=MAX_BODY_BYTES)
    fleet = fleet_of(app)
    _install_error_handlers(api, fleet.settings)
    api.include_router(health_router(fleet))
    guard = _token_dependencies(token)
    for router in (admin_router(fleet), broadcast_router(app), metrics_router(fleet)):
        api.include_router(router, dependencies=guard)
    return api


def _token_dependencies(token: str | None) -> list[DependsParam]:
    """What every guarded route depends on: the token check, or nothing without a token."""
    return [Depends(TokenGuard(token))] if token else []


def _install_error_handlers(api: FastAPI, settings: CoordinatorSettings) -> None:
    """Answer a bad request with a 422 that never echoes its input, and a Redis or broker
    outage with a 503 naming the (redacted) URL instead of a bare 500."""
    api.exception_handler(RequestValidationError)(_invalid_request)
    api.exception_handler(redis.RedisError)(_unreachable("registry", settings.registry_redis_url))
    api.exception_handler(OperationalError)(_unreachable("broker", settings.broker))


def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
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


def _unreachable(what: str, url: str) -> Callable[[Request, Exception], JSONResponse]:
    """A handler answering 503 ``<what> unreachable`` (no password) for Redis or broker errors."""

    def handler(request: Request, exc: Exception) -> JSONResponse:
        detail = _detail(what, url, exc)
        log.warning("%s %s: %s", request.method, request.url.path, detail)
        return JSONResponse({"detail": detail}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

    return handler


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
        target=Reaper(app, settings.reaper_grace_s).run,
        args=(settings.reaper_interval_s, stop),
        name="reaper",
        daemon=True,
    )
    reaper.start()
    try:
        uvicorn.run(create_api(app, token=token), host=host, port=port)
    finally:
        stop.set()
        fleet_of(app).close()
