"""What the reaper did with one dead worker's messages (or one scan of Celery's queue)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.dispatch.app import Fleet
from coordinator.dispatch.route import Route


@dataclass
class ReapReport:
    """What happened to one dead worker's messages."""

    worker_id: str
    moved: dict[str, int] = field(default_factory=dict)
    """Target queue -> messages moved there."""
    dropped: list[str] = field(default_factory=list)
    """Task ids of replicated broadcast jobs addressed to the dead worker."""
    lost_race: int = 0
    """Messages another reaper (or the worker itself) took first."""

    def record(self, headers: Mapping[str, Any], target: Route | None, fleet: Fleet) -> None:
        """Note a message moved to ``target`` (``None``: dropped), and count its claim: the
        message is where the route says now."""
        if target is None:
            self.dropped.append(str(headers.get("id")))
            return
        fleet.router.confirm(target.claim_id)
        self.moved[target.queue] = self.moved.get(target.queue, 0) + 1
