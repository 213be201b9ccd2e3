"""The heartbeat a worker writes into Redis, and its strict parser."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coordinator.core.errors import HeartbeatError
from coordinator.core.task_spec import normalize_model

MAX_HEARTBEAT_BYTES: Final = 64 * 1024
"""A heartbeat larger than this is refused unparsed: no honest worker sends one."""

TIER_GPU: Final = 1
TIER_CPU: Final = 2
TIER_STORAGE: Final = 3
TIER_BY_NAME: Final = {"gpu": TIER_GPU, "cpu": TIER_CPU, "storage": TIER_STORAGE}
TIER_NAMES: Final = {number: name for name, number in TIER_BY_NAME.items()}

WorkerStatus = Literal["healthy", "degraded", "unhealthy", "draining"]
ROUTABLE_STATUSES: Final = frozenset({"healthy", "degraded"})
"""The statuses in which a worker is sent tasks."""
ServiceStatus = Literal["healthy", "unhealthy"]
WorkerId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.@:-]+$")]
Name = Annotated[str, Field(min_length=1, max_length=128)]
MAX_REASON: Final = 300
"""Characters kept of a service's error: enough for its URL and the first line of why."""
MAX_MODELS = 256
"""With names of at most 128 characters, a full heartbeat stays below the size limit."""
MAX_ACTIVE = 1_000_000
Bytes = Annotated[int, Field(ge=0, le=2**50, strict=True)]
Seconds = Annotated[float, Field(ge=0.0, le=86_400.0, strict=True)]


class ServerLoad(BaseModel):
    """The load a model server publishes on ``/metrics``: every client's requests, not only
    the fleet's (see ``worker_tasks/model_servers/server_metrics.py``)."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    waiting: int = Field(default=0, ge=0, le=MAX_ACTIVE, strict=True)
    running: int = Field(default=0, ge=0, le=MAX_ACTIVE, strict=True)
    kv_cache_usage: float | None = Field(default=None, ge=0.0, le=1.0, strict=True)


class Heartbeat(BaseModel):
    """One worker's state as last reported; the router's only view of the fleet.

    The fields of the design document parse as they are. Its ``loaded_models`` lists every
    model the worker has on disk, those in memory included (Ollama's ``/api/tags``), so in
    code it is :attr:`models_on_disk`; ``models_in_memory`` is Ollama's ``/api/ps``.
    ``tier``, ``capabilities``, ``queue``, ``timestamp`` and the cost-aware routing fields
    (``model_bytes`` .. ``download_bps``) are additions. Unknown fields are
    ignored so that newer workers can talk to older coordinators.
    """

    model_config = ConfigDict(
        frozen=True, extra="ignore", allow_inf_nan=False, populate_by_name=True
    )

    worker_id: WorkerId
    status: WorkerStatus = "healthy"
    # Numbers are strict: a heartbeat saying ``true`` or ``"1"`` where a number belongs is
    # broken, not 1.
    current_load: float = Field(default=0.0, ge=0.0, le=1.0, strict=True, description="0-1")
    available_memory: str | None = None
    gpu_utilization: float | None = Field(default=None, ge=0.0, le=100.0, strict=True)
    active_requests: int = Field(default=0, ge=0, le=MAX_ACTIVE, strict=True)
    # The JSON keeps the design's name; populate_by_name lets code say what it means.
    models_on_disk: tuple[Name, ...] = Field(
        default=(), max_length=MAX_MODELS, alias="loaded_models"
    )
    models_in_memory: tuple[Name, ...] = Field(default=(), max_length=MAX_MODELS)
    specialization: Name | None = None
    services_status: dict[Name, ServiceStatus] = Field(default_factory=dict, max_length=64)
    service_errors: dict[Name, str] = Field(
        default_factory=dict, max_length=64, description="why an unhealthy service is down"
    )
    server_load: dict[Name, ServerLoad] = Field(
        default_factory=dict, max_length=64, description="per service, its server's load"
    )
    tier: int | None = Field(default=None, ge=TIER_GPU, le=TIER_STORAGE, strict=True)
    capabilities: tuple[Name, ...] = Field(default=(), max_length=64)
    queue: Name | None = Field(
        default=None, description="reported, never trusted: the queue is the worker id's"
    )
    timestamp: float | None = Field(default=None, ge=0.0, strict=True, description="unix s")
    # How the worker heartbeats, and which start of it this is (issue 13): the reaper reads
    # them rather than assuming its own settings hold for every worker.
    interval_s: float | None = Field(default=None, gt=0.0, le=3600.0, strict=True)
    ttl_s: float | None = Field(default=None, gt=0.0, le=86_400.0, strict=True)
    incarnation: Name | None = Field(default=None, description="one id per worker start")
    started_at: float | None = Field(default=None, ge=0.0, strict=True, description="unix s")
    host: Name | None = Field(default=None, description="where the worker process runs")
    pid: int | None = Field(default=None, ge=1, le=2**31, strict=True)
    # What the cost-aware policy reads (issue 6); absent from older workers' heartbeats.
    model_bytes: dict[Name, Bytes] = Field(
        default_factory=dict, max_length=MAX_MODELS, description="size of each model known"
    )
    service_s: dict[Name, Seconds] = Field(
        default_factory=dict, max_length=MAX_MODELS, description="recent mean task seconds"
    )
    mean_service_s: Seconds | None = Field(
        default=None, description="recent mean task seconds, over all tasks"
    )
    model_slots: int | None = Field(default=None, ge=1, le=1024, strict=True)
    would_evict: Name | None = Field(default=None, description="evicted by the next load")
    load_bps: float | None = Field(default=None, gt=0.0, strict=True, description="disk->memory")
    download_bps: float | None = Field(default=None, gt=0.0, strict=True)

    @field_validator("tier", mode="before")
    @classmethod
    def _tier_by_name(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in TIER_BY_NAME:
            return TIER_BY_NAME[value.lower()]
        return value

    @field_validator("service_errors", mode="after")
    @classmethod
    def _short_reasons(cls, value: dict[str, str]) -> dict[str, str]:
        return {service: reason[:MAX_REASON] for service, reason in value.items()}

    @field_validator("models_on_disk", "models_in_memory", mode="after")
    @classmethod
    def _normalize_models(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = (normalize_model(name) for name in value)
        return tuple(dict.fromkeys(name for name in names if name))

    @field_validator("model_bytes", "service_s", mode="after")
    @classmethod
    def _normalize_model_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        return {normalize_model(name): v for name, v in value.items() if normalize_model(name)}

    @field_validator("would_evict", mode="after")
    @classmethod
    def _normalize_victim(cls, value: str | None) -> str | None:
        return normalize_model(value) or None if value is not None else None

    @model_validator(mode="after")
    def _capabilities_from_services(self) -> Heartbeat:
        # The design's heartbeat has no capability list: the services it reports are them.
        if not self.capabilities and self.services_status:
            object.__setattr__(self, "capabilities", tuple(self.services_status))
        return self

    @property
    def tier_name(self) -> str:
        """``gpu``, ``cpu``, ``storage`` or ``unknown``."""
        return TIER_NAMES.get(self.tier, "unknown") if self.tier is not None else "unknown"

    def to_json(self) -> str:
        """The JSON written to Redis."""
        return self.model_dump_json(exclude_none=True, by_alias=True)


def parse_heartbeat(raw: str | bytes, worker_id: str | None = None) -> Heartbeat:
    """Parse and validate one heartbeat.

    ``worker_id`` is where the payload was found (its Redis key); a payload that claims to
    be another worker is refused, so one entry can never impersonate another in routing.

    Raises:
        HeartbeatError: naming the worker, for oversized, non-JSON or invalid payloads.
    """
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode(errors="replace"))
    if size > MAX_HEARTBEAT_BYTES:
        raise HeartbeatError(worker_id, f"{size} bytes is over {MAX_HEARTBEAT_BYTES}")
    try:
        # pydantic's own JSON parser: no recursion limit to hit, NaN refused, one pass.
        heartbeat = Heartbeat.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0] if errors else None
        if first is not None and first["type"] == "json_invalid":
            raise HeartbeatError(worker_id, f"not JSON ({first['msg']}): {raw[:80]!r}") from None
        if first is not None and first["type"] == "model_type" and not first["loc"]:
            got = type(first["input"]).__name__
            raise HeartbeatError(worker_id, f"expected a JSON object, got {got}") from None
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}={err.get('input')!r:.200}: "
            f"{err['msg']}"
            for err in errors[:5]
        )
        raise HeartbeatError(worker_id or _claimed_id(raw), problems) from None
    if worker_id is not None and heartbeat.worker_id != worker_id:
        raise HeartbeatError(worker_id, f"claims to be worker {heartbeat.worker_id!r}")
    return heartbeat


def _claimed_id(raw: str | bytes) -> str | None:
    """The worker id a payload that failed validation claims, for the error message."""
    text = raw if isinstance(raw, str) else raw.decode(errors="replace")
    match = re.search(r'"worker_id"\s*:\s*("(?:[^"\\]|\\.){1,1024}")', text)
    if match is None:
        return None
    try:
        claimed = json.loads(match.group(1))
    except ValueError:
        return None
    return claimed if isinstance(claimed, str) else None


def is_eligible(heartbeat: Heartbeat, service: str) -> bool:
    """Whether the worker may receive a task of ``service`` at all."""
    return (
        heartbeat.status in ROUTABLE_STATUSES
        and service in heartbeat.capabilities
        and heartbeat.services_status.get(service) != "unhealthy"
    )
