"""The worker's Celery app: the fleet app plus the task modules and the worker's hooks.

Configuration is passed in (:func:`create_worker_app`); only :func:`default_worker_app`, which
``celery -A worker_tasks worker`` reaches through ``worker_tasks.app``, reads the environment,
and it does so when first asked, not when the package is imported.
"""

from __future__ import annotations

import threading

from coordinator.core.errors import ConfigError
from coordinator.core.settings import CoordinatorSettings, load_settings
from coordinator.dispatch.app import FleetApp
from worker_tasks import control  # noqa: F401 - registers the remote-control commands
from worker_tasks.lifecycle import WorkerRuntime, install

TASK_MODULES = ("worker_tasks.tasks", "worker_tasks.job_handlers")


class WorkerApp(FleetApp):
    """A fleet app that can run the fleet's tasks in a ``celery worker``."""

    runtime: WorkerRuntime | None = None
    """Set in a started worker's processes; ``None`` where tasks are only sent."""
    queues_chosen: bool = False
    """Whether ``celery worker -Q`` named the queues (else the worker picks its own)."""


def create_worker_app(settings: CoordinatorSettings, *, main: str = "worker_tasks") -> WorkerApp:
    """The app a worker runs for ``settings``: tasks registered, start-up and shutdown hooked."""
    app = WorkerApp.from_settings(settings, main=main)
    app.conf.imports = TASK_MODULES
    install(app)
    return app


_default: WorkerApp | None = None
_default_lock = threading.Lock()


def default_worker_app() -> WorkerApp:
    """The app built once from the environment (Celery's default in every thread)."""
    global _default
    with _default_lock:
        if _default is None:
            try:
                settings = load_settings(CoordinatorSettings)
            except ConfigError as exc:
                # One line, not a traceback out of Celery's app lookup.
                raise SystemExit(f"worker cannot start: {exc}") from None
            _default = create_worker_app(settings)
        return _default
