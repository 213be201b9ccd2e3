"""The fleet as one router sees it, kept current by reading only what changed.

Re-reading every heartbeat at each refresh would make each publisher's Redis traffic and
parsing grow with the fleet: about a megabyte and 14 ms of CPU per read at a thousand
workers, each second, in every web process. Instead every write a router must see moves
the fleet's change counter and records it against the worker (``heartbeat.lua``,
``claim.lua``, ``release.lua``, ``touch.lua``), and a refresh reads only the workers
changed since the counter it last saw. A refresh with nothing changed is one small reply;
with heartbeats every 30 s, a refresh reads the thirtieth of the fleet that beat.

A heartbeat that expires is not a write: each heartbeat read comes with its time to live,
and the view drops the worker when that runs out without a newer one. A full read every
``resync_s`` catches what no counter announced (an entry edited by hand); so does a counter
that went backwards (Redis restarted empty) and any Redis error (a failover). A worker of
an older version renews its heartbeat without moving a counter: the view keeps it without
a time to live, its figures as of the last full read, until it is reaped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from coordinator.core.heartbeat import Heartbeat
from coordinator.fleet.registry import Registry, Snapshot
from coordinator.fleet.registry_entries import FleetRead, unreachable_from, with_marks

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class FleetUpdate:
    """One refresh: the fleet now, and what changed since the last refresh."""

    snapshot: Snapshot
    workers_changed: bool
    """Who is live, healthy, offers what or holds which model in memory changed (a worker
    came or went, a mark, such a heartbeat): what depends on it is out of date."""
    figures_changed: bool
    """Only a heartbeat's figures changed (load, timings, server metrics): worth taking in,
    not at the cost of rebuilding everything at every refresh."""
    demand: dict[str, tuple[float, float]]
    """model -> (requests per second over every publisher, unix time of that figure)."""


@dataclass
class FleetView:
    """What :meth:`refresh` has read of the fleet so far."""

    registry: Registry
    resync_s: float = 300.0
    clock: Clock = time.monotonic
    _seq: int | None = field(default=None, init=False)
    _synced_at: float = field(default=float("-inf"), init=False)
    _beats: dict[str, Heartbeat] = field(default_factory=dict, init=False)
    _expires: dict[str, float] = field(default_factory=dict, init=False)
    """worker_id -> when (this view's clock) its heartbeat key expires unless renewed."""
    _in_flight: dict[str, int] = field(default_factory=dict, init=False)
    _marks: dict[str, list[tuple[str, str]]] = field(default_factory=dict, init=False)
    _unreachable: dict[str, dict[str, str]] = field(default_factory=dict, init=False)

    def refresh(self, now: float) -> FleetUpdate:
        """Read what changed since the last refresh (everything, the first time and every
        ``resync_s``); ``now`` is the unix time leases and marks are read against."""
        mono = self.clock()
        full = self._seq is None or mono - self._synced_at >= self.resync_s
        try:
            read = self.registry.read(None if full else self._seq, now)
            if not full and self._seq is not None and read.seq < self._seq:
                full, read = True, self.registry.read(None, now)  # the counter was reset
        except redis.RedisError:
            # Redis may come back as another server (a failover to a replica a few writes
            # behind, whose counter soon passes ours): start again from a full read.
            self._seq = None
            raise
        changed, figures = self._apply(read, full, mono)
        changed |= self._expire(mono)
        unreachable = unreachable_from(self._marks, now)
        changed |= unreachable != self._unreachable
        self._unreachable = unreachable
        heartbeats = tuple(with_marks(hb, unreachable.get(w)) for w, hb in self._beats.items())
        in_flight = {w: n for w, n in self._in_flight.items() if n > 0}
        snapshot = Snapshot(heartbeats, in_flight, read.leases)
        return FleetUpdate(snapshot, changed, figures and not changed, read.demand)

    def _apply(self, read: FleetRead, full: bool, mono: float) -> tuple[bool, bool]:
        """Take in ``read``; whether workers changed, and whether figures alone did (see
        :class:`FleetUpdate`)."""
        old = self._beats
        if full:
            self._synced_at = mono
            self._beats, self._expires, self._in_flight, self._marks = {}, {}, {}, {}
            changed = read.heartbeats.keys() != old.keys()
        else:
            changed = any(w in old for w in (*read.gone, *read.unusable))
        self._seq = read.seq
        for worker_id in (*read.gone, *read.unusable):
            self._forget(worker_id)
        figures = False
        for worker_id, (heartbeat, ttl_s) in read.heartbeats.items():
            before = old.get(worker_id)
            if before is None or _placement(before) != _placement(heartbeat):
                changed = True
            elif before != heartbeat:
                figures = True
            self._beats[worker_id] = heartbeat
            self._expires[worker_id] = mono + ttl_s if ttl_s is not None else float("inf")
        for worker_id in read.in_flight:  # each worker read comes with all its marks
            marks = read.marks.get(worker_id)
            if marks:
                self._marks[worker_id] = marks
            else:
                self._marks.pop(worker_id, None)
        self._in_flight.update(read.in_flight)
        return changed, figures

    def _expire(self, mono: float) -> bool:
        expired = [w for w, at in self._expires.items() if at <= mono]
        for worker_id in expired:
            self._forget(worker_id)
        return bool(expired)

    def _forget(self, worker_id: str) -> None:
        self._beats.pop(worker_id, None)
        self._expires.pop(worker_id, None)
        self._in_flight.pop(worker_id, None)
        self._marks.pop(worker_id, None)


def _placement(heartbeat: Heartbeat) -> tuple[object, ...]:
    """What decides where a task may go and whether it loads a model there."""
    return (
        heartbeat.status,
        heartbeat.services_status,
        heartbeat.capabilities,
        heartbeat.models_in_memory,
        heartbeat.models_on_disk,
        heartbeat.tier,
    )
