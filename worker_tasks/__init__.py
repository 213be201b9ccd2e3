"""Celery tasks and worker runtime of the fleet: ``celery -A worker_tasks worker``.

``app`` is built from the environment (see the README's configuration table); tests and
tools build their own with :func:`worker_tasks.app.create_app`.
"""

from coordinator.settings import CoordinatorSettings, load_settings
from worker_tasks.app import FleetApp, create_app

app: FleetApp = create_app(load_settings(CoordinatorSettings))

__all__ = ["FleetApp", "app", "create_app"]
