"""The fleet registry in Redis: heartbeats with a TTL, in-flight counts, recent decisions."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import redis

from coordinator.errors import HeartbeatError
from coordinator.heartbeat import Heartbeat, parse_heartbeat
from coordinator.keys import Keys

log = logging.getLogger(__name__)

# One round trip for the whole fleet: live heartbeats plus in-flight counts. Ids whose
# heartbeat has expired are pruned here, so the index never grows without bound.
_SNAPSHOT_LUA: Final = """
local ids = redis.call('SMEMBERS', KEYS[1])
local beats = {}
for _, id in ipairs(ids) do
  local raw = redis.call('GET', ARGV[1] .. id)
  if raw then
    beats[#beats + 1] = id
    beats[#beats + 1] = raw
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return {beats, redis.call('HGETALL', KEYS[2])}
"""

# A finished task releases its slot; never below zero, since a task sent with an explicit
# queue= was never counted and a worker restart resets its count.
_RELEASE_LUA: Final = """
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if left <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 0
end
return left
"""


def redis_client(url: str, timeout_s: float) -> redis.Redis:
    """A client for ``url`` that gives up after ``timeout_s`` instead of hanging.

    Accepts Celery's ``redis+socket:///path`` spelling of a Unix socket as well.
    """
    if url.startswith("redis+socket://"):
        url = "unix://" + url.removeprefix("redis+socket://")
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
    )


def redact_url(url: str) -> str:
    """``url`` without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The fleet as one registry read saw it."""

    heartbeats: tuple[Heartbeat, ...]
    in_flight: dict[str, int]


def _int(value: str) -> int:
    try:
        return max(int(value), 0)
    except ValueError:
        return 0


@dataclass
class Registry:
    """Reads and writes the fleet's state in Redis; see :mod:`coordinator.keys`."""

    client: redis.Redis
    keys: Keys
    ttl_s: float
    _warned: set[tuple[str, str]] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self._snapshot_script = self.client.register_script(_SNAPSHOT_LUA)
        self._release_script = self.client.register_script(_RELEASE_LUA)

    def publish(self, heartbeat: Heartbeat) -> None:
        """Write one heartbeat; it disappears by itself ``ttl_s`` after the last write."""
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.keys.worker(heartbeat.worker_id), heartbeat.to_json(), px=self._ttl_ms)
        pipe.sadd(self.keys.workers, heartbeat.worker_id)
        pipe.execute()

    def remove(self, worker_id: str) -> None:
        """Forget a worker at once (clean shutdown)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self.keys.worker(worker_id))
        pipe.srem(self.keys.workers, worker_id)
        pipe.hdel(self.keys.inflight, worker_id)
        pipe.execute()

    def snapshot(self) -> Snapshot:
        """Every live, well-formed heartbeat and the in-flight counts, in one round trip.

        A malformed entry is skipped with a warning naming the worker (once per distinct
        payload, so a broken worker does not flood the log at every refresh).
        """
        beats, flight = self._snapshot_script(
            keys=[self.keys.workers, self.keys.inflight], args=[self.keys.worker_prefix]
        )
        heartbeats = []
        for worker_id, raw in zip(beats[::2], beats[1::2], strict=True):
            try:
                heartbeats.append(parse_heartbeat(raw, worker_id))
            except HeartbeatError as exc:
                self._warn_once(worker_id, raw, exc)
        in_flight = {k: _int(v) for k, v in zip(flight[::2], flight[1::2], strict=True)}
        return Snapshot(tuple(heartbeats), in_flight)

    def live_workers(self) -> list[Heartbeat]:
        """Every live, well-formed heartbeat."""
        return list(self.snapshot().heartbeats)

    def claim(self, worker_id: str, decision: str | None, keep: int) -> dict[str, int]:
        """Count one more task for ``worker_id``, log ``decision``; return fresh counts.

        One round trip: the router's only Redis cost per task.
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(self.keys.inflight, worker_id, 1)
        pipe.hgetall(self.keys.inflight)
        if decision is not None and keep > 0:
            pipe.lpush(self.keys.decisions, decision)
            pipe.ltrim(self.keys.decisions, 0, keep - 1)
        results: list[Any] = pipe.execute()
        return {k: _int(v) for k, v in results[1].items()}

    def release(self, worker_id: str) -> int:
        """One task routed to ``worker_id`` finished; returns the count left."""
        return int(self._release_script(keys=[self.keys.inflight], args=[worker_id]))

    def reset_in_flight(self, worker_id: str) -> None:
        """Start a (re)started worker's count from zero."""
        self.client.hdel(self.keys.inflight, worker_id)

    def record_decision(self, decision: str, keep: int) -> None:
        """Keep a decision that did not claim a worker (a fallback to a shared queue)."""
        if keep > 0:
            pipe = self.client.pipeline(transaction=False)
            pipe.lpush(self.keys.decisions, decision)
            pipe.ltrim(self.keys.decisions, 0, keep - 1)
            pipe.execute()

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
