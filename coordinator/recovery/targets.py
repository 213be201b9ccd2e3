"""Where a message taken from a dead worker (or from Celery's default queue) goes: the same
decision the router makes for a new one, whichever broker carried it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.broadcast.client import RUN_JOB, select_recipients
from coordinator.broadcast.job_types import JOB_TYPES
from coordinator.core.errors import TaskInputError
from coordinator.core.heartbeat import Heartbeat
from coordinator.dispatch.app import Fleet
from coordinator.dispatch.route import Route


@dataclass
class Targets:
    """Routes messages found on the way, with the live fleet as read at the start of a reap
    (:meth:`refresh`), for broadcast shards."""

    fleet: Fleet
    live: list[Heartbeat] = field(default_factory=list)

    def refresh(self) -> None:
        """Read the fleet afresh: the router's snapshot may be older than a heartbeat's
        expiry and could still list the dead worker, sending its messages straight back."""
        self.fleet.router.refresh()
        self.live = self.fleet.registry.live_workers()

    def target(
        self, headers: Mapping[str, Any], args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Route | None:
        """Where a message goes; ``None`` drops it (a replicated broadcast job for a dead
        worker: its broadcast reports ``timeout`` for that worker)."""
        task = str(headers.get("task", ""))
        keys = self.fleet.keys
        spec = self.fleet.router.task_spec(task)
        if spec is not None:
            try:
                model = spec.model(args, kwargs)
            except TaskInputError:  # not a model name: it fails, with that reason, where it runs
                return Route(keys.default_queue, None)
            return self.fleet.router.route(task, spec.service, model)
        if task == RUN_JOB:
            job = JOB_TYPES.get(args[0]) if args else None
            if job is None or job.mode == "replicated":
                return None
            capability = args[4] if len(args) > 4 else None
            live = select_recipients(self.live, capability)
            if not live:
                return Route(keys.default_queue, None)
            best = min(live, key=lambda hb: hb.active_requests)
            return Route(keys.worker_queue(best.worker_id), None)
        return Route(keys.default_queue, None)


def protocol_2_arguments(body: bytes | str) -> tuple[list[Any], dict[str, Any]]:
    """A Celery (protocol 2, JSON) message body's positional and keyword arguments; none for
    a body that is not one."""
    try:
        args, kwargs, _ = json.loads(body)
        return list(args), dict(kwargs)
    except (ValueError, TypeError):
        return [], {}
