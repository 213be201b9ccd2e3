"""Configuration from environment variables (pydantic-settings); see docs/configuration.md."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal, Self, TypeVar
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from coordinator.core.errors import ConfigError
from coordinator.core.keys import Keys
from coordinator.core.score_weights import Weights

_NAME = r"^[A-Za-z0-9_.@:-]+$"

REDIS_SCHEMES: Final = ("redis", "rediss", "unix", "redis+socket")
"""What a Redis URL may start with: redis-py's schemes, and kombu's for a Unix socket."""
AMQP_SCHEMES: Final = ("amqp", "amqps", "pyamqp")
"""What a RabbitMQ URL may start with (kombu's py-amqp transport)."""

ServerApi = Literal["ollama", "openai", "tei", "auto"]
"""The API a model server speaks: Ollama's, the OpenAI-compatible one (vLLM, SGLang,
llama.cpp's llama-server), Hugging Face TEI's, or ``auto``: detected by probing."""

POLICY_NAMES: Final = ("random", "round_robin", "least_loaded", "p2c", "seed", "affinity", "cost")
"""Every ``ROUTING_POLICY``; :data:`coordinator.routing.POLICIES` has a class for each (tested),
named here so that the settings need not import the policies."""


class CoordinatorSettings(BaseSettings):
    """What every process of the fleet needs: clients, routers and workers."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    redis_url: str = Field(default="redis://localhost:6379/0", min_length=1)
    broker_url: str | None = Field(
        default=None, description="the broker when not REDIS_URL: amqp://user:pass@host/vhost"
    )
    registry_url: str | None = Field(
        default=None, description="Redis of the registry when it is not REDIS_URL"
    )
    namespace: str = Field(default="aiq", min_length=1, max_length=64, pattern=_NAME)
    # Within what a heartbeat may state (coordinator/core/heartbeat.py).
    heartbeat_interval_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    heartbeat_ttl_s: float | None = Field(default=None, gt=0.0, le=86_400.0)
    routing_policy: str = Field(default="cost", description="see coordinator.routing")
    score_weights: Weights = Field(default_factory=Weights)
    routing_seed: int | None = None
    registry_refresh_s: float = Field(default=1.0, ge=0.0)
    redis_timeout_s: float = Field(default=1.0, gt=0.0)
    decisions_kept: int = Field(default=1000, ge=0)
    decisions_per_s: float = Field(default=100.0, ge=0.0, description="kept per router")
    chromadb_url: str = Field(default="http://localhost:8000", description="shared ChromaDB")
    visibility_timeout_s: float = Field(default=3600.0, gt=0.0)
    result_expires_s: float = Field(default=86_400.0, gt=0.0, description="results kept")
    plain_celery_queue: str = Field(
        default="celery",
        max_length=128,
        pattern=r"^[A-Za-z0-9_.@:-]*$",
        description="where apps without the fleet router send; the reaper routes the fleet's"
        " tasks out of it ('': not)",
    )
    reaper_grace_s: float | None = Field(
        default=None, ge=0.0, description="default: min(1 s, the worker's own interval)"
    )
    reaper_interval_s: float = Field(default=1.0, gt=0.0, le=60.0)
    # SecretStr: never in a repr, a log line or an error message.
    coordinator_api_token: SecretStr | None = None

    @field_validator("broker_url", mode="before")
    @classmethod
    def _empty_broker_is_redis(cls, value: Any) -> Any:
        # compose passes ${BROKER_URL:-}: empty means the default, REDIS_URL.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_url", "registry_url", "broker_url", mode="after")
    @classmethod
    def _url_scheme(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Caught here, with the variable named, rather than as a traceback from the first
        # client that parses it.
        if value is None:
            return None
        scheme, separator, _ = value.partition("://")
        amqp_too = info.field_name == "broker_url"
        if amqp_too and scheme in AMQP_SCHEMES:
            return value
        if not separator or scheme not in REDIS_SCHEMES:
            schemes = ", ".join(f"{s}://" for s in (*REDIS_SCHEMES, *(AMQP_SCHEMES * amqp_too)))
            raise ValueError(f"expected a URL such as redis://host:6379/0 ({schemes})")
        query = parse_qs(urlsplit(value).query)
        if "password" in query or "username" in query:
            # redis-py reads them there, kombu (the broker) fails on them: one rule for both.
            raise ValueError(
                "credentials go in the URL's user part, redis://user:password@host:6379/0,"
                " not in ?password= or ?username="
            )
        return value

    @field_validator("routing_policy", mode="after")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICY_NAMES:
            raise ValueError(f"expected one of {', '.join(POLICY_NAMES)}")
        return value

    @model_validator(mode="after")
    def _ttl_outlives_interval(self) -> Self:
        if self.heartbeat_ttl_s is None:
            object.__setattr__(self, "heartbeat_ttl_s", 3 * self.heartbeat_interval_s)
        elif self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"HEARTBEAT_TTL_S={self.heartbeat_ttl_s!r} must be longer than "
                f"HEARTBEAT_INTERVAL_S={self.heartbeat_interval_s!r}, or every worker "
                "would drop out between two heartbeats"
            )
        return self

    @property
    def ttl_s(self) -> float:
        """The heartbeat TTL, resolved."""
        assert self.heartbeat_ttl_s is not None  # set by the validator
        return self.heartbeat_ttl_s

    @property
    def keys(self) -> Keys:
        """Key and queue names of this namespace."""
        return Keys(self.namespace)

    @property
    def broker(self) -> str:
        """The broker's URL: ``BROKER_URL``, else ``REDIS_URL``."""
        return self.broker_url or self.redis_url

    @property
    def broker_is_redis(self) -> bool:
        """Whether the broker is Redis (kombu's Redis transport), not RabbitMQ."""
        return self.broker.partition("://")[0] in REDIS_SCHEMES

    @property
    def registry_redis_url(self) -> str:
        """Where the registry lives."""
        return self.registry_url or self.redis_url


class WorkerSettings(CoordinatorSettings):
    """What a worker host adds: who it is and where its model services are."""

    worker_id: str = Field(
        default_factory=socket.gethostname, min_length=1, max_length=128, pattern=_NAME
    )
    worker_tier: Literal["gpu", "cpu", "storage"] | None = Field(
        default=None, description="detected when unset: gpu when NVML sees a device"
    )
    worker_specialization: str | None = None
    worker_capabilities: Annotated[list[str] | None, NoDecode] = None
    ollama_url: str = "http://localhost:11434"
    # Each service's server: its URL (default: OLLAMA_URL), its API (default: detected)
    # and an optional key sent as a bearer token.
    vllm_url: str | None = None
    vllm_api: ServerApi = "auto"
    vllm_api_key: SecretStr | None = None
    embeddings_url: str | None = None
    embeddings_api: ServerApi = "auto"
    embeddings_api_key: SecretStr | None = None
    ocr_url: str | None = None
    ocr_api: ServerApi = "auto"
    ocr_api_key: SecretStr | None = None
    probe_timeout_s: float = Field(default=2.0, gt=0.0)
    model_timeout_s: float = Field(default=300.0, gt=0.0)
    enable_chromadb: bool = Field(default=False, description="serve ChromaDB (storage tier)")
    chromadb_path: str = Field(default="./chroma-data", min_length=1)
    chromadb_host: str = Field(default="0.0.0.0", min_length=1)  # noqa: S104 - served to the fleet
    chromadb_port: int = Field(default=8000, ge=1, le=65535)
    worker_model_slots: int | None = Field(
        default=None, ge=1, le=1024, description="models held in memory at once"
    )
    worker_download_bps: float | None = Field(
        default=None, gt=0.0, description="bytes/s a model download is expected to reach"
    )
    work_stealing: bool = Field(
        default=True, description="an idle worker takes waiting tasks from a busy peer's queue"
    )
    work_stealing_interval_s: float = Field(
        default=0.25, ge=0.05, le=10.0, description="how often an idle worker looks for them"
    )

    def endpoint(self, service: str) -> Endpoint:
        """Where ``service`` (``vllm``, ``embeddings`` or ``ocr``) is served on this host."""
        prefix = service.upper()
        url = getattr(self, f"{service}_url", None)
        key: SecretStr | None = getattr(self, f"{service}_api_key", None)
        return Endpoint(
            service=service,
            url=(url or self.ollama_url).rstrip("/"),
            api=getattr(self, f"{service}_api", "auto"),
            api_key=key.get_secret_value() if key is not None else None,
            setting=f"{prefix}_URL" if url else "OLLAMA_URL",
        )

    @property
    def served_chromadb_url(self) -> str | None:
        """Where this worker's own ChromaDB answers, when it serves one."""
        if not self.enable_chromadb:
            return None
        host = "127.0.0.1" if self.chromadb_host in ("0.0.0.0", "::") else self.chromadb_host  # noqa: S104
        return f"http://{host}:{self.chromadb_port}"

    @field_validator("worker_capabilities", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()] or None
        return value

    @field_validator("worker_specialization", "worker_tier", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("worker_tier", mode="before")
    @classmethod
    def _tier_any_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One service's model server as configured: ``api`` ``auto`` is detected by probing."""

    service: str
    url: str
    api: ServerApi
    api_key: str | None = field(default=None, repr=False)
    setting: str = "OLLAMA_URL"
    """The variable the URL came from, for error messages."""


def redact_url(url: str) -> str:
    """``url`` without its password (in the authority or a ``password=`` query), for logs
    and error messages."""
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    if "password=" in parts.query:
        parts = parts._replace(query=re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query))
    return parts.geturl()


S = TypeVar("S", bound=CoordinatorSettings)


def load_settings(cls: type[S]) -> S:
    """Read settings from the environment, turning validation errors into :class:`ConfigError`.

    The message names each variable and the value it had, e.g.
    ``WORKER_TIER='tpu': Input should be 'gpu', 'cpu' or 'storage'``.
    """
    try:
        return cls()
    except SettingsError as exc:
        # Raised before validation when a JSON-valued variable is not JSON.
        match = re.search(r'field "(\w+)"', str(exc))
        name = match.group(1).upper() if match else "?"
        value = next((v for k, v in os.environ.items() if k.upper() == name), None)
        raise ConfigError(f"invalid configuration: {name}={value!r}: not valid JSON") from None
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            if not err["loc"]:
                problems.append(err["msg"].removeprefix("Value error, "))
                continue
            name = str(err["loc"][0]).upper()
            inner = "".join(f"[{part!r}]" for part in err["loc"][1:])
            message = err["msg"].removeprefix("Value error, ")
            shown = err.get("input")
            if isinstance(shown, str) and "://" in shown:  # a URL's password stays out of logs
                shown = redact_url(shown)
            problems.append(f"{name}{inner}={shown!r}: {message}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
