"""A pool kept in a keyed policy's order between decisions: O(log n) per decision.

Sorting the pool for every task costs a publisher a few hundred microseconds at a thousand
workers. But between two registry reads the only thing that changes a candidate's key is
its load, and a keyed policy's key never falls as the load grows
(:class:`~coordinator.routing.interface.KeyedPolicy`). So a heap entry pushed at a lower
load is a lower bound of the candidate's key now: popping until the top entry's load is
current, and pushing the stale ones back re-keyed, finds the true minimum. A load that
*fell* (releases seen at a refresh) is pushed at once by :meth:`Ranking.update`, because
an entry above the candidate's key could keep the best worker buried.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Mapping
from typing import Final, Generic

from coordinator.routing.interface import C, KeyedPolicy, load_of

Entry = tuple[float, int, int, int]
"""(key, candidate index, version, load the key was computed at)"""

SLACK: Final = 64
"""Superseded entries a heap may carry beyond one per candidate before it is rebuilt."""


class Ranking(Generic[C]):
    """``pool`` ordered by ``policy``'s key at each candidate's current load.

    Not thread-safe: the router calls it under its lock.
    """

    def __init__(
        self,
        policy: KeyedPolicy[C],
        pool: list[C],
        in_flight: Mapping[str, int],
        rng: random.Random | None = None,
    ) -> None:
        self.policy, self.pool = policy, pool
        self._ids = [c.heartbeat.worker_id for c in pool]
        self._active = [c.heartbeat.active_requests for c in pool]
        self._index = {worker_id: i for i, worker_id in enumerate(self._ids)}
        self._rand = rng.random if rng is not None else None
        self._version = [0] * len(pool)
        self._heap: list[Entry] = []
        self._rebuild(in_flight)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._index

    def top(
        self, in_flight: Mapping[str, int], limit: int, exclude: frozenset[str] = frozenset()
    ) -> list[tuple[C, int]]:
        """The best ``limit`` candidates not in ``exclude``, best first, each with its load."""
        heap, version, ids, active = self._heap, self._version, self._ids, self._active
        get = in_flight.get
        best: list[tuple[C, int]] = []
        kept: list[Entry] = []
        # The hot path of every decision: load_of() inlined, no attribute chains.
        while heap and len(best) < limit:
            entry = heapq.heappop(heap)
            _, i, pushed, load = entry
            if pushed != version[i]:
                continue  # superseded by a later push
            flight = get(ids[i], 0)
            now_load = flight if flight > active[i] else active[i]
            if now_load != load:
                self._push(i, now_load)
                continue
            kept.append(entry)
            if ids[i] not in exclude:
                best.append((self.pool[i], load))
        for entry in kept:
            heapq.heappush(heap, entry)
        return best

    def update(self, worker_id: str, in_flight: Mapping[str, int]) -> None:
        """``worker_id``'s load changed outside this router's decisions (a refresh)."""
        i = self._index.get(worker_id)
        if i is not None:
            self._push(i, load_of(self.pool[i].heartbeat, in_flight))
            if len(self._heap) > 2 * len(self.pool) + SLACK:
                self._rebuild(in_flight)

    def replace(self, candidate: C, in_flight: Mapping[str, int]) -> None:
        """Put ``candidate`` in the place of the pool's candidate for the same worker (the
        pool is changed in place)."""
        i = self._index.get(candidate.heartbeat.worker_id)
        if i is not None:
            self.pool[i] = candidate
            self._active[i] = candidate.heartbeat.active_requests
            self._push(i, load_of(candidate.heartbeat, in_flight))

    def _push(self, i: int, load: int) -> None:
        self._version[i] += 1
        key = self.policy.sort_key(self.pool[i], load)
        if self._rand is not None:
            key += self._rand() * self.policy.tie_s
        heapq.heappush(self._heap, (key, i, self._version[i], load))

    def _rebuild(self, in_flight: Mapping[str, int]) -> None:
        sort_key, rand, tie_s = self.policy.sort_key, self._rand, self.policy.tie_s
        heap = []
        for i, candidate in enumerate(self.pool):
            self._version[i] += 1
            load = load_of(candidate.heartbeat, in_flight)
            key = sort_key(candidate, load) + (rand() * tie_s if rand is not None else 0.0)
            heap.append((key, i, self._version[i], load))
        heapq.heapify(heap)
        self._heap = heap
