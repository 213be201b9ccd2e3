"""Moving messages on the Redis broker, where kombu keeps a queue as a list and what was
delivered and not acknowledged in a hash (``{ns}.unacked``).

Each message moves in one Lua call that removes exactly that message from where it was and
pushes the rewritten one where it goes, so a reaper that dies halfway loses or doubles
nothing, and two reapers never both move one message. The rewrite points the message's
delivery info at its new queue (a later restore sends it there, not back) and its claim
header at its new worker.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Final

from coordinator.dispatch.app import Fleet
from coordinator.dispatch.route import Route
from coordinator.fleet.claims import CLAIM_HEADER, claim_header
from coordinator.fleet.lua import lua_script
from coordinator.recovery.report import ReapReport
from coordinator.recovery.targets import Targets, protocol_2_arguments

log = logging.getLogger(__name__)

PLAIN_SCANNED: Final = 200
"""Messages at the consuming end of Celery's default queue looked at per scan."""


@dataclass
class RedisMessages:
    """A dead worker's messages, and the fleet's in Celery's default queue, on Redis."""

    fleet: Fleet
    targets: Targets
    move_delay_s: float = 0.0
    """Pause between two moves; only tests use it, to kill a reaper halfway."""
    _plain_offset: int = field(default=0, init=False)
    """Where the next scan of Celery's default queue starts, from its consuming end."""

    def __post_init__(self) -> None:
        client = self.fleet.registry.client
        self._move_queued = client.register_script(lua_script("move_queued"))
        self._move_unacked = client.register_script(lua_script("move_unacked"))

    def reap(self, report: ReapReport, queue: str) -> None:
        """Move the unacknowledged messages taken from ``queue``, then what waits in it."""
        client = self.fleet.registry.client
        for tag, entry in client.hscan_iter(self.fleet.keys.unacked):
            try:
                payload, _, routing_key = json.loads(entry)
            except (ValueError, TypeError):
                continue
            if routing_key == queue:
                self._move(report, payload, old=str(entry), tag=str(tag))
        # Oldest first: kombu pushes on the left and consumers pop on the right.
        for raw in reversed(client.lrange(queue, 0, -1)):
            try:
                payload = json.loads(raw)
            except ValueError:
                log.warning("reaper: unreadable message in %s left in place", queue)
                continue
            self._move(report, payload, old=str(raw), source=queue)

    def reroute_plain(self, report: ReapReport, queue: str) -> None:
        """Route the fleet's tasks out of ``queue``; other apps' tasks stay in place. Each
        scan reads the next :data:`PLAIN_SCANNED` messages from the consuming end, so the
        fleet's tasks behind many of another app's are reached too."""
        client = self.fleet.registry.client
        end = -1 - self._plain_offset
        raws = client.lrange(queue, end - PLAIN_SCANNED + 1, end)
        self._plain_offset = self._plain_offset + len(raws) if len(raws) == PLAIN_SCANNED else 0
        for raw in reversed(raws):  # kombu pushes left and pops right: oldest first
            try:
                payload = json.loads(raw)
            except ValueError:
                continue
            task = str((payload.get("headers") or {}).get("task", ""))
            if self.fleet.router.task_spec(task) is not None:
                self._move(report, payload, old=str(raw), source=queue)

    def retire(self, queue: str) -> None:
        """Nothing to do: Redis deletes an empty list by itself."""

    def _move(
        self,
        report: ReapReport,
        payload: dict[str, Any],
        *,
        old: str,
        source: str = "",
        tag: str | None = None,
    ) -> None:
        """Move one message found in list ``source`` or under unacked delivery ``tag``."""
        target = self.targets.target(payload.get("headers") or {}, *_arguments(payload))
        queue, new = (target.queue if target else ""), _rewrite(payload, target)
        if self.move_delay_s:
            time.sleep(self.move_delay_s)
        if tag is not None:
            keys = self.fleet.keys
            moved = self._move_unacked(
                keys=[keys.unacked, keys.unacked_index, queue], args=[tag, old, new]
            )
        else:
            moved = self._move_queued(keys=[source, queue], args=[old, new])
        if moved != 1:
            report.lost_race += 1  # not ours to move after all: its claim is never confirmed
            return
        report.record(payload.get("headers") or {}, target, self.fleet)


def requeue_unacked(fleet: Fleet, queue: str, delivered_before: float) -> int:
    """Give ``queue`` back the messages a previous run of its worker took from it before
    ``delivered_before`` (unix s: this run's start) and never acknowledged, and return how
    many: for a worker restarted under its id, so they run now rather than after
    ``VISIBILITY_TIMEOUT_S``, and before the reaper, which sees the id alive again, would
    act. Redis broker only: RabbitMQ gives them back itself when the connection dies."""
    client, keys = fleet.registry.client, fleet.keys
    move = client.register_script(lua_script("move_unacked"))
    moved = 0
    for tag, entry in client.hscan_iter(keys.unacked):
        try:
            payload, _, routing_key = json.loads(entry)
        except (ValueError, TypeError):
            continue
        if routing_key != queue:
            continue  # another queue's: no delivery time to look up
        delivered_at = client.zscore(keys.unacked_index, tag)
        if delivered_at is not None and delivered_at < delivered_before:
            args = [str(tag), str(entry), json.dumps(payload)]
            moved += int(move(keys=[keys.unacked, keys.unacked_index, queue], args=args))
    return moved


def _arguments(payload: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """A kombu Redis envelope's task arguments (its body may be base64)."""
    body = payload.get("body", "")
    if payload.get("properties", {}).get("body_encoding") == "base64":
        try:
            body = base64.b64decode(body)
        except ValueError:
            return [], {}
    return protocol_2_arguments(body)


def _rewrite(payload: dict[str, Any], target: Route | None) -> str:
    """The message pointed at its new queue and worker; '' when it is dropped."""
    if target is None:
        return ""
    moved = json.loads(json.dumps(payload))
    headers = moved.setdefault("headers", {})
    headers.pop(CLAIM_HEADER, None)
    if target.claim is not None:
        headers[CLAIM_HEADER] = claim_header(target.claim)
    properties = moved.setdefault("properties", {})
    properties["delivery_info"] = {"exchange": target.queue, "routing_key": target.queue}
    return json.dumps(moved)
