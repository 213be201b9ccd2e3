"""Where the router finds what a task declares (:class:`~coordinator.core.task_spec.TaskSpec`):
on the task object in this process, else as the fleet's workers declared it in the registry,
for a task sent by name from a process without its code."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from coordinator.core.task_spec import TaskSpec
from coordinator.fleet.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class TaskLookup:
    """Task specs by name: each local task's read once, the fleet's re-read at most every
    ``refresh_s`` and not while Redis is failing (``retry_after_s``)."""

    registry: Registry
    local_task: Callable[[str], object] = lambda name: None
    """This process's task of that name, if any (:func:`coordinator.install` looks in the
    app): Celery passes no task to a router for ``send_task`` on an app not finalized."""
    refresh_s: float = 1.0
    retry_after_s: float = 2.0
    clock: Callable[[], float] = time.monotonic
    _local: dict[str, TaskSpec | None] = field(default_factory=dict, init=False, repr=False)
    _fleet: dict[str, TaskSpec] = field(default_factory=dict, init=False, repr=False)
    _fleet_read_at: float = field(default=float("-inf"), init=False, repr=False)

    def spec(self, name: str, task: object = None) -> TaskSpec | None:
        """What task ``name`` declares: on ``task`` (Celery passes the registered task) or this
        process's task of that name, else as the fleet's workers declared it; ``None``: a
        task the router leaves alone.

        Raises:
            ConfigError: the task declares a spec that is not one.
        """
        if name in self._local:
            return self._local[name]
        task = task if task is not None else self.local_task(name)
        if task is not None:
            spec = self._local[name] = TaskSpec.of(task)
            return spec
        now = self.clock()
        if now - self._fleet_read_at >= self.refresh_s:
            self._fleet_read_at = now
            try:
                self._fleet = self.registry.task_specs()
            except redis.RedisError as exc:  # sent unrouted: the worker that takes it routes it
                self._fleet_read_at = now + self.retry_after_s
                log.warning("task specs not read (%s): %s", type(exc).__name__, exc)
        return self._fleet.get(name)
