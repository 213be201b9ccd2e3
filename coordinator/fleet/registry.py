"""The fleet registry in Redis: heartbeats with a TTL, in-flight counts, model-load leases,
recent decisions, the routed tasks' specs."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import redis

from coordinator.core.errors import HeartbeatError
from coordinator.core.heartbeat import (
    MAX_HEARTBEAT_BYTES,
    MAX_REASON,
    Heartbeat,
    parse_heartbeat,
)
from coordinator.core.keys import Keys
from coordinator.core.task_spec import TaskSpec
from coordinator.fleet.lua import lua_script
from coordinator.fleet.registry_entries import (
    FleetRead,
    KnownWorker,
    count_from,
    demand_from,
    lease_field,
    leases_from,
    marks_from,
    ready_at_from,
    seconds_from,
    unreachable_from,
    with_marks,
)

log = logging.getLogger(__name__)


MAX_DECISIONS_PER_WRITE: Final = 1000
TOMBSTONE_S: Final = 300.0
"""How long a release that overtook its claim keeps the claim from being written: far
longer than a claim waits in a publisher's buffer (50 ms), unless Redis was away longer."""
LEASES_KEPT_S: Final = 3600
"""The leases hash outlives its longest lease by this much, then goes: a fleet that stops
routing leaves nothing behind for good."""


def redis_client(url: str, timeout_s: float) -> redis.Redis:
    """A client for ``url`` that gives up after ``timeout_s`` instead of hanging.

    Accepts Celery's ``redis+socket:///path`` spelling of a Unix socket as well.
    """
    if url.startswith("redis+socket://"):
        url = "unix://" + url.removeprefix("redis+socket://")
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        # A corrupt (non-UTF-8) entry must reach the parser, which skips it, rather than
        # fail the whole read in the client.
        encoding_errors="replace",
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
    )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The fleet as one registry read saw it."""

    heartbeats: tuple[Heartbeat, ...]
    in_flight: dict[str, int]
    leases: dict[str, dict[str, float]] = field(default_factory=dict)
    """Unexpired model loads, model -> {worker_id: ready_at}: the policies' ``Leases``."""


@dataclass(frozen=True, slots=True)
class LeaseResult:
    """The answer to :meth:`Registry.acquire_lease`."""

    granted: bool
    holders: dict[str, float]
    """The model's unexpired holders after the call -> ready_at: the caller's among them
    when granted, else the ones that made the caller's view stale."""


@dataclass
class Registry:
    """Reads and writes the fleet's state in Redis; see :mod:`coordinator.core.keys`."""

    client: redis.Redis
    keys: Keys
    ttl_s: float
    _warned: set[tuple[str, str]] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self._snapshot_script = self.client.register_script(lua_script("snapshot"))
        self._heartbeat_script = self.client.register_script(lua_script("heartbeat"))
        self._touch_script = self.client.register_script(lua_script("touch"))
        self._claim_script = self.client.register_script(lua_script("claim"))
        self._release_script = self.client.register_script(lua_script("release"))
        self._lease_script = self.client.register_script(lua_script("lease"))

    def publish(self, heartbeat: Heartbeat) -> None:
        """Write one heartbeat; it disappears by itself ``ttl_s`` after the last write."""
        keys = self.keys
        # The worker's own TTL when it says one: the reaper and the key must agree on it.
        ttl_ms = max(int(heartbeat.ttl_s * 1000), 1) if heartbeat.ttl_s else self._ttl_ms
        known = KnownWorker(heartbeat.interval_s, heartbeat.ttl_s, heartbeat.incarnation)
        worker_id = heartbeat.worker_id
        self._heartbeat_script(
            keys=[
                keys.worker(worker_id),
                keys.workers,
                keys.known,
                keys.seq,
                keys.changes,
                keys.claims(worker_id),
                keys.beat_changes,
            ],
            args=[worker_id, heartbeat.to_json(), ttl_ms, known.to_json(), repr(time.time())],
        )

    def remove(self, worker_id: str) -> None:
        """Forget a worker at once (clean shutdown)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self.keys.worker(worker_id))
        pipe.srem(self.keys.workers, worker_id)
        self._forget(pipe, worker_id)
        self.touch(worker_id, pipe=pipe)
        pipe.execute()

    def forget(self, worker_id: str) -> None:
        """Drop what the fleet keeps of a dead worker whose messages were moved: its claims,
        marks and place among the known workers (its heartbeat has expired already)."""
        pipe = self.client.pipeline(transaction=False)
        self._forget(pipe, worker_id)
        self.touch(worker_id, pipe=pipe)
        pipe.execute()

    def _forget(self, pipe: redis.client.Pipeline, worker_id: str) -> None:
        keys = self.keys
        pipe.delete(keys.claims(worker_id), keys.released(worker_id), keys.down(worker_id))
        pipe.hdel(keys.known, worker_id)
        # Gone, but its queue may still receive: a retry's delayed delivery, a router whose
        # snapshot is older, messages a broker gives back late. The reaper keeps draining it.
        pipe.hset(keys.gone, worker_id, repr(time.time()))

    def gone_workers(self) -> dict[str, float]:
        """Workers reaped or shut down, and when (unix s): their queues are still drained."""
        gone = self.client.hgetall(self.keys.gone)
        return {str(k): seconds_from(str(v)) for k, v in gone.items()}

    def drop_gone(self, worker_id: str, *, back: bool = False) -> None:
        """Stop draining a gone worker's queue: it is ``back`` (heartbeating again), or long
        enough gone that every router has seen it go, and then its change counters and
        any claim a late router wrote on it go too."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hdel(self.keys.gone, worker_id)
        if not back:  # a returning worker's counters were just moved by its heartbeat
            pipe.zrem(self.keys.changes, worker_id)
            pipe.zrem(self.keys.beat_changes, worker_id)
            pipe.delete(self.keys.claims(worker_id), self.keys.released(worker_id))
        pipe.execute()

    def touch(self, *worker_ids: str, pipe: redis.client.Pipeline | None = None) -> None:
        """Move ``worker_ids``' change counters: the routers' next reads fetch them."""
        keys = [self.keys.seq, self.keys.changes]
        self._touch_script(keys=keys, args=list(worker_ids), client=pipe or self.client)

    def known_workers(self) -> dict[str, KnownWorker]:
        """Every worker that heartbeated and did not leave cleanly, and how it heartbeats."""
        known = self.client.hgetall(self.keys.known)
        return {str(k): KnownWorker.from_json(v) for k, v in known.items()}

    def alive(self, worker_ids: Iterable[str]) -> set[str]:
        """The workers whose heartbeat key exists, readable or not: a worker is alive while
        it heartbeats, whatever its heartbeat says (a bad one is skipped by routing, never
        taken for a death)."""
        ids = list(worker_ids)
        pipe = self.client.pipeline(transaction=False)
        for worker_id in ids:
            pipe.exists(self.keys.worker(worker_id))
        return {w for w, exists in zip(ids, pipe.execute(), strict=True) if exists}

    def snapshot(self, now: float | None = None) -> Snapshot:
        """Every live, well-formed heartbeat, the in-flight counts and the leases unexpired
        at ``now`` (unix s; default: this host's clock), in one round trip."""
        at = time.time() if now is None else now
        read = self.read(None, at)
        unreachable = unreachable_from(read.marks, at)
        heartbeats = tuple(
            with_marks(hb, unreachable.get(worker_id))
            for worker_id, (hb, _) in read.heartbeats.items()
        )
        in_flight = {k: v for k, v in read.in_flight.items() if v > 0}
        return Snapshot(heartbeats, in_flight, read.leases)

    def read(self, since: int | None = None, now: float | None = None) -> FleetRead:
        """The registry's entries in one round trip: of every worker, or (``since``, a change
        counter from an earlier read) of the workers changed since (see ``snapshot.lua``).

        A malformed heartbeat is skipped with a warning naming the worker (once per distinct
        payload, so a broken worker does not flood the log at every refresh).
        """
        at = time.time() if now is None else now
        keys = self.keys
        names = [keys.workers, keys.leases, keys.seq, keys.changes, keys.demand]
        seq, beats, flight, leases, down, refused, gone, demand = self._snapshot_script(
            keys=[*names, keys.beat_changes],
            args=[
                keys.worker_prefix,
                keys.claims_prefix,
                keys.released_prefix,
                repr(at),
                keys.down_prefix,
                MAX_HEARTBEAT_BYTES,
                "all" if since is None else since,
            ],
        )
        unusable = set(refused[::2])
        for worker_id, why in zip(refused[::2], refused[1::2], strict=True):
            self._warn_once(worker_id, why, HeartbeatError(worker_id, why))
        heartbeats: dict[str, tuple[Heartbeat, float | None]] = {}
        for i in range(0, len(beats), 4):
            worker_id, raw, pttl, counted = beats[i : i + 4]
            try:
                heartbeat = parse_heartbeat(raw, worker_id)
            except HeartbeatError as exc:
                self._warn_once(worker_id, raw, exc)
                unusable.add(worker_id)
                continue
            # Not counted: renewed without moving a counter, so no time to live is kept.
            ttl_s = int(pttl) / 1000 if int(pttl) >= 0 and int(counted) else None
            heartbeats[worker_id] = (heartbeat, ttl_s)
        return FleetRead(
            seq=int(seq),
            heartbeats=heartbeats,
            unusable=frozenset(unusable),
            gone=tuple(gone),
            in_flight={k: count_from(v) for k, v in zip(flight[::2], flight[1::2], strict=True)},
            marks=marks_from(down),
            leases=leases_from(leases, at),
            demand=demand_from(demand),
        )

    def live_workers(self) -> list[Heartbeat]:
        """Every live, well-formed heartbeat."""
        return list(self.snapshot().heartbeats)

    def claim_many(
        self,
        claims: Mapping[str, Sequence[str]],
        decisions: Sequence[str],
        keep: int,
        counters: Mapping[tuple[str, str], float] | None = None,
        lapse_s: float = 3600.0,
        asked: Mapping[str, int] | None = None,
        demand_tau_s: float = 60.0,
    ) -> dict[str, int]:
        """Add ``claims`` (worker -> claim ids) to the workers' in-flight sets, ``asked``
        (model -> requests) to the fleet's demand, ``counters`` to their hash fields
        (``(key, field) -> amount``) and keep ``decisions``, in one command. A claim nothing
        releases lapses ``lapse_s`` from now.

        Returns the new in-flight count of each claimed worker.
        """
        now = time.time()
        args: list[str | int | float] = [keep, self.keys.claims_prefix, self.keys.released_prefix]
        args += [repr(now + lapse_s), repr(now), demand_tau_s, len(claims)]
        for worker_id, ids in claims.items():
            args += [worker_id, len(ids), *ids]
        asked = asked or {}
        args.append(len(asked))
        for model, requests in asked.items():
            args += [model, requests]
        counters = counters or {}
        args.append(len(counters))
        for (key, name), amount in counters.items():
            args += [key, name, amount]
        # LPUSH puts its last argument first: oldest first in, newest first out. Lua's
        # unpack() takes a few thousand values at most, hence the cap.
        if keep > 0:
            args += decisions[-min(keep, MAX_DECISIONS_PER_WRITE) :]
        keys = [self.keys.decisions, self.keys.seq, self.keys.changes, self.keys.demand]
        flat = self._claim_script(keys=keys, args=args)
        return {str(k): int(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}

    def acquire_lease(
        self,
        model: str,
        worker_id: str,
        ready_at: float,
        expires_at: float,
        expected_holders: frozenset[str],
        now: float,
    ) -> LeaseResult:
        """Record that ``worker_id`` starts loading ``model`` (in memory at ``ready_at``,
        void after ``expires_at``), if ``expected_holders`` are exactly the model's unexpired
        holders at ``now``: the caller decided on a current view. Otherwise nothing is
        written and the current holders come back, for the caller to decide again.
        """
        args: list[str | float | int] = [
            repr(now),
            model,
            worker_id,
            lease_field(model, worker_id),
            f"{ready_at!r} {expires_at!r}",
            max(math.ceil(expires_at - now), 0) + LEASES_KEPT_S,
            *sorted(expected_holders),
        ]
        flat = self._lease_script(keys=[self.keys.leases], args=args)
        pairs = zip(flat[1::2], flat[2::2], strict=True)
        holders = {str(worker): ready_at_from(str(ready), now) for worker, ready in pairs}
        return LeaseResult(bool(int(flat[0])), holders)

    def drop_lease(self, model: str, worker_id: str) -> None:
        """End ``worker_id``'s lease on loading ``model``: the load is not going to happen
        (no server has the model to give), and the worker must not look busy loading it."""
        self.client.hdel(self.keys.leases, lease_field(model, worker_id))

    def release(self, worker_id: str, claim_id: str, lapse_s: float = 3600.0) -> bool:
        """The message claimed as ``claim_id`` for ``worker_id`` is done with. Exactly once:
        a second release changes nothing, and a release that comes before the claim is
        written keeps the claim from being added. ``False`` when no written claim was
        there."""
        keys = [
            self.keys.claims(worker_id),
            self.keys.released(worker_id),
            self.keys.seq,
            self.keys.changes,
        ]
        # A tombstone only bridges the time a claim may wait in its publisher's buffer.
        lapse_at = repr(time.time() + min(lapse_s, TOMBSTONE_S))
        return bool(self._release_script(keys=keys, args=[claim_id, lapse_at, worker_id]))

    def mark_unreachable(self, worker_id: str, service: str, for_s: float, why: str = "") -> None:
        """Count ``worker_id``'s ``service`` as unhealthy for ``for_s``: a task found it
        unreachable (``why``: its URL and error), and routing should leave it now, not at
        the next heartbeat."""
        key = self.keys.down(worker_id)
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, service, f"{now!r} {now + for_s!r} {why[:MAX_REASON]}")
        pipe.pexpire(key, max(1, math.ceil(for_s * 1000)))
        self.touch(worker_id, pipe=pipe)
        pipe.execute()

    def clear_unreachable(self, worker_id: str, healthy: Sequence[str], probed_at: float) -> None:
        """Lift the marks on ``worker_id``'s ``healthy`` services made before ``probed_at``:
        a probe that started after the failure found the service back."""
        key = self.keys.down(worker_id)
        marks = self.client.hgetall(key)
        stale = [
            str(service)
            for service, value in marks.items()
            if str(service) in healthy and seconds_from(str(value).split(" ")[0]) < probed_at
        ]
        if stale:
            pipe = self.client.pipeline(transaction=False)
            pipe.hdel(key, *stale)
            self.touch(worker_id, pipe=pipe)
            pipe.execute()

    def publish_task_specs(self, specs: Mapping[str, TaskSpec]) -> None:
        """Declare the routed tasks a worker runs (each worker writes the same for its code)."""
        if specs:
            self.client.hset(self.keys.tasks, mapping={n: s.as_json() for n, s in specs.items()})

    def task_specs(self) -> dict[str, TaskSpec]:
        """The routed tasks the fleet's workers declared; a malformed entry is skipped."""
        specs = {}
        for name, raw in self.client.hgetall(self.keys.tasks).items():
            try:
                specs[str(name)] = TaskSpec.from_json(raw)
            except ValueError as exc:
                log.warning("skipping the spec of task %.128r: %s", name, exc)
        return specs

    def recent_decisions(self, limit: int = 50) -> Sequence[str]:
        """The newest ``limit`` decisions as stored (JSON), newest first."""
        result = self.client.lrange(self.keys.decisions, 0, max(limit, 1) - 1)
        return [item if isinstance(item, str) else item.decode() for item in result]

    @property
    def _ttl_ms(self) -> int:
        return max(int(self.ttl_s * 1000), 1)

    def _warn_once(self, worker_id: str, raw: str, exc: HeartbeatError) -> None:
        fingerprint = (worker_id, hashlib.blake2b(raw.encode(), digest_size=8).hexdigest())
        if fingerprint in self._warned:
            return
        if len(self._warned) > 10_000:
            self._warned.clear()
        self._warned.add(fingerprint)
        log.warning("skipping heartbeat of worker %r: %s", worker_id, exc.reason)
