"""Model-aware routing of AI tasks over Celery + Redis.

The policy (:mod:`coordinator.scoring`) is pure; the registry, router and (later) broadcast
are thin layers around it.
"""

from coordinator.catalog import detect_required_model
from coordinator.errors import ConfigError, CoordinatorError, HeartbeatError, ServiceError
from coordinator.heartbeat import Heartbeat, parse_heartbeat
from coordinator.registry import Registry
from coordinator.router import FleetRouter
from coordinator.scoring import (
    ScoreBreakdown,
    Weights,
    rank_workers,
    score_worker,
    select_best_worker,
)
from coordinator.settings import CoordinatorSettings, WorkerSettings, load_settings

__all__ = [
    "ConfigError",
    "CoordinatorError",
    "CoordinatorSettings",
    "FleetRouter",
    "Heartbeat",
    "HeartbeatError",
    "Registry",
    "ScoreBreakdown",
    "ServiceError",
    "Weights",
    "WorkerSettings",
    "detect_required_model",
    "load_settings",
    "parse_heartbeat",
    "rank_workers",
    "score_worker",
    "select_best_worker",
]
