"""Model-aware routing of AI tasks over Celery: the coordinator's public API.

The package is in layers, each importing only those below it (docs/architecture.md):
``core`` (errors, keys, heartbeat, settings, task specs), ``routing`` (the pure policies),
``fleet`` (the fleet's state in Redis), ``dispatch`` (the Celery app and router),
``broadcast``, ``recovery`` (the reaper), ``ops`` (admin API, metrics), ``sim`` (simulator,
demo, simulated model servers) and ``cli``.

The names below are loaded when first used, so ``import coordinator.routing`` (the pure
policies, the simulator) does not bring in Redis, Celery or Prometheus.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coordinator.core.errors import (
        ConfigError,
        CoordinatorError,
        HeartbeatError,
        JobError,
        ServiceError,
    )
    from coordinator.core.heartbeat import Heartbeat, parse_heartbeat
    from coordinator.core.score_weights import Weights
    from coordinator.core.settings import CoordinatorSettings, WorkerSettings, load_settings
    from coordinator.core.task_spec import TaskSpec
    from coordinator.dispatch.app import Fleet, create_app, fleet_of, install
    from coordinator.dispatch.router import FleetRouter
    from coordinator.fleet.registry import Registry
    from coordinator.routing.seed import (
        ScoreBreakdown,
        rank_workers,
        score_worker,
        select_best_worker,
    )

_EXPORTS = {
    "ConfigError": "coordinator.core.errors",
    "CoordinatorError": "coordinator.core.errors",
    "HeartbeatError": "coordinator.core.errors",
    "JobError": "coordinator.core.errors",
    "ServiceError": "coordinator.core.errors",
    "Heartbeat": "coordinator.core.heartbeat",
    "parse_heartbeat": "coordinator.core.heartbeat",
    "Weights": "coordinator.core.score_weights",
    "CoordinatorSettings": "coordinator.core.settings",
    "WorkerSettings": "coordinator.core.settings",
    "load_settings": "coordinator.core.settings",
    "TaskSpec": "coordinator.core.task_spec",
    "Fleet": "coordinator.dispatch.app",
    "create_app": "coordinator.dispatch.app",
    "fleet_of": "coordinator.dispatch.app",
    "install": "coordinator.dispatch.app",
    "FleetRouter": "coordinator.dispatch.router",
    "Registry": "coordinator.fleet.registry",
    "ScoreBreakdown": "coordinator.routing.seed",
    "rank_workers": "coordinator.routing.seed",
    "score_worker": "coordinator.routing.seed",
    "select_best_worker": "coordinator.routing.seed",
}

__all__ = [
    "ConfigError",
    "CoordinatorError",
    "CoordinatorSettings",
    "Fleet",
    "FleetRouter",
    "Heartbeat",
    "HeartbeatError",
    "JobError",
    "Registry",
    "ScoreBreakdown",
    "ServiceError",
    "TaskSpec",
    "Weights",
    "WorkerSettings",
    "create_app",
    "fleet_of",
    "install",
    "load_settings",
    "parse_heartbeat",
    "rank_workers",
    "score_worker",
    "select_best_worker",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(module), name)
