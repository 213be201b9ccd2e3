"""The fleet's worker: its tasks and runtime. ``celery -A worker_tasks worker`` runs it.

``worker_tasks.app`` is the worker app built from the environment (see docs/configuration.md)
the first time it is asked for; tests and tools pass their settings to
:func:`create_worker_app` instead. The model tasks (``generate``, ``ocr``, ``embed``) are in
:mod:`worker_tasks.tasks`.
"""

from __future__ import annotations

from typing import Any

from worker_tasks.worker_app import WorkerApp, create_worker_app, default_worker_app

__all__ = ["WorkerApp", "app", "create_worker_app"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the package (or its tasks) reads no environment: Celery's
    # ``-A worker_tasks`` looks up ``worker_tasks.app``, which lands here.
    if name == "app":
        return default_worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
