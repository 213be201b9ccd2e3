"""Batched in-flight claims: the router counts tasks locally and writes them in bulk.

A Redis round trip per task would cost a publisher a third of its rate on a slow host, so
claims (and the decisions kept for operators) are buffered and written in one command when
``max_batch`` accumulate, ``flush_s`` after the first one (a timer thread takes the tail of
a burst), and at exit. Other publishers see them at their next registry snapshot, which
they take every ``REGISTRY_REFRESH_S`` anyway.

Each routed message carries its claim in a header (:data:`CLAIM_HEADER`: the worker and a
claim id of its own), and whatever ends the message releases that claim by id
(``worker_tasks.outcomes``), exactly once: a second release changes nothing, and a release
that comes before the batch with its claim is written keeps the claim from being added
(``fleet/lua/release.lua``).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import redis

from coordinator.fleet.registry import Registry

log = logging.getLogger(__name__)

CLAIM_HEADER: Final = "aiq_claim"
"""Message header ``[worker_id, claim_id]``: whose in-flight count a routed message was added
to, under which id."""

Claim = tuple[str, str]
"""(worker_id, claim_id)"""


def new_claim_id() -> str:
    """A fresh claim id: one per routed message (a retry is a new message, a new claim).

    A random prefix of this process and a counter: unique without a system call per task
    (``os.urandom`` is one); a forked child draws a prefix of its own."""
    return f"{_ids.prefix}{next(_ids.counter):x}"


class _ClaimIds:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = os.urandom(12).hex() + "-"
        self.counter = itertools.count()


_ids = _ClaimIds()
os.register_at_fork(after_in_child=_ids.reset)


def claim_header(claim: Claim) -> list[str]:
    """The header value carrying ``claim``."""
    return [claim[0], claim[1]]


def parse_claim(value: object) -> Claim | None:
    """The claim a message's header carries; ``None`` for none or a malformed one."""
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, str) for v in value)
    ):
        return value[0], value[1]
    return None


MAX_UNWRITTEN_DECISIONS: Final = 10_000
RETRY_S: Final = 2.0
"""After a failed write, the next try waits this long (and the warning is not repeated)."""


@dataclass
class ClaimBuffer:
    """Claims and decisions waiting to be written to the registry."""

    registry: Registry
    decisions_kept: int = 1000
    lapse_s: float = 3600.0
    """A claim nothing releases (its message lost) stops counting after this long."""
    flush_s: float = 0.05
    max_batch: int = 256
    demand_tau_s: float = 60.0
    """Time constant of the fleet's demand rates (see :mod:`coordinator.routing.demand`)."""
    clock: Callable[[], float] = time.monotonic

    _claims: dict[str, list[str]] = field(default_factory=dict, init=False)
    _decisions: list[str] = field(default_factory=list, init=False)
    _counters: dict[tuple[str, str], float] = field(default_factory=dict, init=False)
    _asked: dict[str, int] = field(default_factory=dict, init=False)
    _count: int = field(default=0, init=False)
    """Claims and decisions buffered: a flush is due at ``max_batch``."""
    _first_at: float | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _timer: threading.Timer | None = field(default=None, init=False)
    _timer_pid: int = field(default=0, init=False)
    _failing: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        # A weak reference: a process that makes many routers must not keep them all alive.
        atexit.register(_flush_at_exit, weakref.ref(self))

    def add(
        self,
        claim: Claim | None,
        decision: str | None,
        counts: Iterable[tuple[str, str, float]] = (),
    ) -> None:
        """Count one message against its claim's worker (if any), keep ``decision`` and add
        ``counts`` (``(hash key, field, amount)`` metric increments); all written soon."""
        with self._lock:
            if claim is not None:
                self._claims.setdefault(claim[0], []).append(claim[1])
                self._count += 1
            counters = self._counters
            for key, name, amount in counts:
                counters[key, name] = counters.get((key, name), 0.0) + amount
            if decision is not None and self.decisions_kept > 0:
                self._decisions.append(decision)
                self._count += 1
                if len(self._decisions) > MAX_UNWRITTEN_DECISIONS:
                    del self._decisions[:-MAX_UNWRITTEN_DECISIONS]
            if self._first_at is None:
                self._first_at = self.clock()
            due = self._count >= self.max_batch
        if due:
            self.flush()
        else:
            self._arm_timer()

    def ask(self, model: str) -> None:
        """Count one request for ``model`` in the fleet's demand, written with the next
        batch (a request's claim follows it there, and the timer takes the tail)."""
        with self._lock:
            self._asked[model] = self._asked.get(model, 0) + 1

    def pending(self) -> dict[str, int]:
        """Claims not written yet, per worker."""
        with self._lock:
            return {worker_id: len(ids) for worker_id, ids in self._claims.items()}

    def flush(self) -> dict[str, int] | None:
        """Write everything buffered in one command; returns the written workers' counts.

        On a Redis error the claims stay buffered for the next flush; ``None`` is returned.
        """
        with self._lock:
            claims, decisions, counters = self._claims, self._decisions, self._counters
            asked, self._asked, self._count = self._asked, {}, 0
            self._claims, self._decisions, self._counters, self._first_at = {}, [], {}, None
        if not claims and not decisions and not counters and not asked:
            return {}
        try:
            written = self.registry.claim_many(
                claims,
                decisions,
                self.decisions_kept,
                counters,
                self.lapse_s,
                asked,
                self.demand_tau_s,
            )
        except redis.RedisError as exc:
            if not self._failing:
                log.warning("in-flight claims not written, kept for later: %s", exc)
            self._failing = True
            with self._lock:
                for worker_id, ids in claims.items():
                    self._claims.setdefault(worker_id, [])[:0] = ids
                for key, amount in counters.items():
                    self._counters[key] = self._counters.get(key, 0.0) + amount
                for model, requests in asked.items():
                    self._asked[model] = self._asked.get(model, 0) + requests
                self._count += sum(map(len, claims.values())) + len(decisions)
                self._decisions[:0] = decisions
                del self._decisions[:-MAX_UNWRITTEN_DECISIONS]
                self._first_at = self._first_at or self.clock()
            return None
        if self._failing:
            log.info("in-flight claims written again")
            self._failing = False
        return written

    def _arm_timer(self, delay_s: float | None = None) -> None:
        # Timers do not survive fork: a forked publisher (a prefork pool child routing
        # chord bodies) arms its own.
        pid = os.getpid()
        timer = self._timer
        if timer is not None and self._timer_pid == pid and timer.is_alive():
            return
        timer = threading.Timer(delay_s or self.flush_s, self._on_timer)
        timer.daemon = True
        self._timer, self._timer_pid = timer, pid
        timer.start()

    def _on_timer(self) -> None:
        self.flush()
        with self._lock:
            left = bool(self._claims or self._decisions or self._counters or self._asked)
        if left:  # Redis was away: try again later
            self._timer = None
            self._arm_timer(RETRY_S)


class Unsent(NamedTuple):
    """A routed message's claim, decision and counts, waiting for its publish."""

    claim: Claim
    decision: str | None
    counts: Iterable[tuple[str, str, float]]
    routed_at: float


@dataclass
class UnsentClaims:
    """Claims of routed messages not published yet: each goes to ``buffer`` once the broker
    took its message (:meth:`confirm`), so a message that could not be published (an
    argument JSON cannot encode, a broker down) leaves no claim behind. One never confirmed
    is dropped ``kept_s`` after it was routed."""

    buffer: ClaimBuffer
    kept_s: float = 60.0
    _unsent: dict[str, Unsent] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def hold(self, unsent: Unsent) -> None:
        with self._lock:
            self._unsent[unsent.claim[1]] = unsent

    def holds(self, claim_id: str) -> bool:
        """Whether ``claim_id`` was routed here and waits for its message's publish."""
        with self._lock:
            return claim_id in self._unsent

    def confirm(self, claim_id: str) -> None:
        """The message carrying ``claim_id`` was published: its claim counts in Redis."""
        if not self._unsent:  # most publishes: nothing this router routed is waiting
            return
        with self._lock:
            unsent = self._unsent.pop(claim_id, None)
        if unsent is not None:
            self.buffer.add(unsent.claim, unsent.decision, unsent.counts)

    def prune(self, now: float) -> None:
        """Forget the claims routed before ``now - kept_s`` (same clock as their routing)."""
        with self._lock:
            for claim_id in [k for k, v in self._unsent.items() if now - v.routed_at > self.kept_s]:
                del self._unsent[claim_id]


def _flush_at_exit(buffer: weakref.ref[ClaimBuffer]) -> None:
    alive = buffer()
    if alive is not None:
        alive.flush()
