"""Model-aware routing of AI tasks over Celery + Redis.

The routing policies (:mod:`coordinator.policies`, the design's table in
:mod:`coordinator.scoring`) are pure; the registry, router and broadcast are thin layers
around them.
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
