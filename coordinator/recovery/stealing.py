"""Work stealing on the Redis broker: the moves behind an idle worker taking waiting tasks
from a busy peer's own queue (the worker decides when, and what it can run:
``worker_tasks/work_stealing.py``).

The router commits each task to one worker's queue when it is sent, so the tail of a burst
can leave one worker idle while others still have queues. Each worker posts how many
messages wait in its own queue on a backlog board (``Keys.backlog``, a sorted set), one
call per interval that also tells an idle worker the longest backlogs
(``fleet/lua/steal_look.lua``): the cost is constant per worker, whatever the fleet's size.
An idle worker then reads the oldest messages of the longest backlog, keeps those it can
run, and moves up to half of that backlog (at most :data:`MAX_BATCH`) to the consuming end
of its own queue, one message per ``fleet/lua/steal_move.lua`` call, all in one round trip.
Each call removes exactly that message or nothing, so nothing is lost or doubled whoever
else (another thief, the owner's pop, the reaper) reaches it first.

The message is rewritten as the reaper rewrites one: its delivery info names the thief's
queue (a restore after a crash sends it there), and its claim (``aiq_claim``) moves to the
thief, in Redis and in the header, so the routers count it against the worker that runs it
and the thief's release at the end finds it.

RabbitMQ is not covered: :func:`supported` says so, and the worker does not steal there.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import redis

from coordinator.core.keys import Keys
from coordinator.core.settings import CoordinatorSettings
from coordinator.fleet.claims import CLAIM_HEADER, Claim, claim_header, parse_claim
from coordinator.fleet.lua import lua_script
from coordinator.recovery.targets import protocol_2_arguments

log = logging.getLogger(__name__)

MAX_BATCH: Final = 16
"""Messages moved per steal at most: enough that a thief of short tasks is not idle between
two looks, few enough that the owner is not left idle in turn (it would steal back)."""
SCANNED: Final = 64
"""Messages read from the consuming end of a victim's queue per steal."""
CANDIDATES: Final = 3
"""Backlogs an idle worker reads per look, longest first; it steals from the first that
holds a message it can run."""
BOARD_KEPT_MS: Final = 60_000
"""The board outlives its last post by this much, then goes."""
TOMBSTONE_S: Final = 300.0
"""As the registry's releases: a tombstone bridges the time a claim waits in its router's
buffer."""

Wanted = Callable[[str, list[Any], dict[str, Any], Mapping[str, Any]], bool]
"""Whether the thief runs a message: (task name, args, kwargs, headers) -> yes or no."""


def supported(settings: CoordinatorSettings) -> bool:
    """Whether work stealing can run: the broker is Redis, the same Redis as the registry
    (a message and its claim move in one script, so both must live in one server)."""
    return settings.broker_is_redis and settings.broker == settings.registry_redis_url


@dataclass(frozen=True, slots=True)
class Look:
    """What one look found."""

    waiting: int
    """Messages waiting in the looking worker's own queue."""
    backlogs: tuple[tuple[str, int], ...]
    """Other workers with messages waiting -> how many, longest first (idle looks only)."""


@dataclass(frozen=True, slots=True)
class _Move:
    old: str
    new: str
    claim: Claim


@dataclass
class RedisStealing:
    """One worker's side of work stealing on Redis: posting its backlog, reading others',
    moving messages into its own queue."""

    client: redis.Redis
    keys: Keys
    worker_id: str
    claim_lapse_s: float = 3600.0
    """How long a moved claim counts if nothing releases it (the router's lapse)."""

    def __post_init__(self) -> None:
        self._look = self.client.register_script(lua_script("steal_look"))
        self._move = self.client.register_script(lua_script("steal_move"))

    @property
    def queue(self) -> str:
        """This worker's own queue."""
        return self.keys.worker_queue(self.worker_id)

    def look(self, *, idle: bool) -> Look:
        """Post this worker's backlog and, when ``idle`` and its queue is empty, read the
        longest backlogs of the others."""
        # The script reads the board only after taking this worker off it (queue empty).
        waiting, flat = self._look(
            keys=[self.queue, self.keys.backlog],
            args=[self.worker_id, CANDIDATES if idle else 0, BOARD_KEPT_MS],
        )
        pairs = zip(flat[::2], flat[1::2], strict=True)
        return Look(int(waiting), tuple((str(w), int(float(n))) for w, n in pairs))

    def leave(self) -> None:
        """Take this worker off the board (it stops)."""
        self.client.zrem(self.keys.backlog, self.worker_id)

    def steal(self, victim: str, waiting: int, wanted: Wanted) -> int:
        """Move up to half of ``victim``'s ``waiting`` messages (at most :data:`MAX_BATCH`)
        that ``wanted`` accepts, oldest first, to the consuming end of this worker's queue,
        in their order; returns how many moved."""
        source = self.keys.worker_queue(victim)
        raws = [str(raw) for raw in self.client.lrange(source, -SCANNED, -1)]
        if not raws:  # drained, or a stale post of a worker that died: off the board
            self.client.zrem(self.keys.backlog, victim)
            return 0
        known = len(raws) if len(raws) < SCANNED else max(waiting, len(raws))
        limit = min(MAX_BATCH, (known + 1) // 2)
        chosen: list[_Move] = []
        for raw in reversed(raws):  # kombu pushes left and pops right: oldest first
            move = self._prepared(raw, wanted)
            if move is not None:
                chosen.append(move)
                if len(chosen) >= limit:
                    break
        if not chosen:
            return 0
        pipe = self.client.pipeline(transaction=False)
        # Newest first: each is pushed at the consuming end, so the oldest is popped first.
        for move in reversed(chosen):
            self._push(pipe, source, move)
        return sum(int(moved) for moved in pipe.execute())

    def _push(self, pipe: redis.client.Pipeline, source: str, move: _Move) -> None:
        keys = self.keys
        owner, claim_id = move.claim
        now = time.time()
        script_keys = [
            source,
            self.queue,
            keys.claims(owner),
            keys.released(owner),
            keys.claims(self.worker_id),
        ]
        # Routers read only the workers changed since their last read: both counts moved.
        script_keys += [keys.seq, keys.changes]
        args: list[str | int | float] = [
            move.old,
            move.new,
            claim_id,
            owner,
            self.worker_id,
            repr(now + self.claim_lapse_s),
            max(int(self.claim_lapse_s * 1000), 1),
            repr(now + min(self.claim_lapse_s, TOMBSTONE_S)),
        ]
        self._move(keys=script_keys, args=args, client=pipe)

    def _prepared(self, raw: str, wanted: Wanted) -> _Move | None:
        """``raw`` rewritten for this worker, when it is a task it runs now; ``None``
        otherwise (unreadable, not a task, a countdown not due, or not ``wanted``)."""
        try:
            payload = json.loads(raw)
        except ValueError:
            return None
        headers = payload.get("headers") if isinstance(payload, dict) else None
        if not isinstance(headers, dict) or not isinstance(headers.get("task"), str):
            return None
        if headers.get("eta"):  # a retry's countdown: it could not run here any sooner
            return None
        claim = parse_claim(headers.get(CLAIM_HEADER))
        if claim is None:  # sent to this queue by its caller, not routed: the caller's choice
            return None
        args, kwargs = _arguments(payload)
        if not wanted(headers["task"], args, kwargs, headers):
            return None
        return _Move(raw, self._rewrite(payload, claim), claim)

    def _rewrite(self, payload: dict[str, Any], claim: Claim) -> str:
        """The message pointed at this worker's queue, its claim at this worker (``payload``
        was parsed for this move alone, so it is changed in place)."""
        payload["headers"][CLAIM_HEADER] = claim_header((self.worker_id, claim[1]))
        properties = payload.setdefault("properties", {})
        properties["delivery_info"] = {"exchange": self.queue, "routing_key": self.queue}
        return json.dumps(payload)


def _arguments(payload: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """A kombu Redis envelope's task arguments (its body may be base64)."""
    body = payload.get("body", "")
    properties = payload.get("properties")
    if isinstance(properties, dict) and properties.get("body_encoding") == "base64":
        try:
            body = base64.b64decode(body)
        except (ValueError, TypeError):
            return [], {}
    return protocol_2_arguments(body)
