"""The fleet's worker: its runtime and the built-in tasks. ``celery -A worker_tasks worker``
runs it.

``worker_tasks.app`` is the fleet app built from the environment (see
docs/configuration.md) the first time it is asked for; tests and tools pass their settings
to :func:`coordinator.dispatch.app.create_app` instead, and an application's own app joins
the fleet through :func:`coordinator.install`. The built-in model tasks (``generate``,
``ocr``, ``embed``) are in :mod:`worker_tasks.tasks`; an application's own model tasks take
:class:`ModelTask` as their base for the same retries, rerouting and model server access.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery

from coordinator.core.errors import ConfigError
from coordinator.core.settings import CoordinatorSettings, load_settings
from coordinator.dispatch.app import create_app
from worker_tasks.model_task import ModelTask

__all__ = ["ModelTask", "app"]

_app: Celery | None = None
_app_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the package (or its tasks) reads no environment: Celery's
    # ``-A worker_tasks`` looks up ``worker_tasks.app``, which lands here.
    if name == "app":
        return _worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _worker_app() -> Celery:
    """The app built once from the environment (Celery's default in every thread)."""
    global _app
    with _app_lock:
        if _app is None:
            try:
                settings = load_settings(CoordinatorSettings)
            except ConfigError as exc:
                # One line, not a traceback out of Celery's app lookup.
                raise SystemExit(f"worker cannot start: {exc}") from None
            _app = create_app(settings)
        return _app
