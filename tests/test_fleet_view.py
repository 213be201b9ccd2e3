"""A router's view of the fleet reads only what changed, on a real Redis; the fleet's
demand is shared by every router; a kept pool order agrees with a fresh sort."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from coordinator.core.heartbeat import Heartbeat
from coordinator.core.task_spec import GENERATE
from coordinator.dispatch.router import FleetRouter
from coordinator.fleet.fleet_view import FleetView
from coordinator.fleet.registry import Registry
from coordinator.routing import CostPolicy
from coordinator.routing.ranking import Ranking
from tests.conftest import wait_for


def beat(worker_id: str, **fields: Any) -> Heartbeat:
    return Heartbeat.model_validate(
        {"worker_id": worker_id, "services_status": {"vllm": "healthy"}, **fields}
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ids(view: FleetView, now: float) -> set[str]:
    return {hb.worker_id for hb in view.refresh(now).snapshot.heartbeats}


def test_a_refresh_with_nothing_changed_reads_no_heartbeat(registry: Registry) -> None:
    for i in range(20):
        registry.publish(beat(f"w{i}"))
    first = registry.read()
    assert len(first.heartbeats) == 20
    unchanged = registry.read(since=first.seq)
    assert unchanged.heartbeats == {}
    assert unchanged.in_flight == {}
    registry.publish(beat("w3", active_requests=2))
    registry.claim_many({"w7": ["c1"]}, [], 0)
    changed = registry.read(since=first.seq)
    # w7's load moved, not its heartbeat: only its count comes back.
    assert set(changed.heartbeats) == {"w3"}
    assert changed.in_flight == {"w3": 0, "w7": 1}


def test_the_view_follows_joins_loads_departures_and_marks(registry: Registry) -> None:
    view = FleetView(registry)
    registry.publish(beat("a"))
    registry.publish(beat("b"))
    assert ids(view, 0.0) == {"a", "b"}
    registry.publish(beat("c"))
    registry.claim_many({"a": ["x", "y"]}, [], 0)
    update = view.refresh(0.0)
    assert {hb.worker_id for hb in update.snapshot.heartbeats} == {"a", "b", "c"}
    assert update.workers_changed
    assert update.snapshot.in_flight == {"a": 2}
    registry.release("a", "x")
    update = view.refresh(0.0)
    assert not update.workers_changed
    assert update.snapshot.in_flight == {"a": 1}
    registry.remove("b")
    assert ids(view, 0.0) == {"a", "c"}
    registry.mark_unreachable("c", "vllm", 60.0, "refused")
    (c,) = [hb for hb in view.refresh(0.0).snapshot.heartbeats if hb.worker_id == "c"]
    assert c.services_status["vllm"] == "unhealthy"


def test_a_heartbeat_that_expires_leaves_the_view_without_a_write(registry: Registry) -> None:
    clock = Clock()
    view = FleetView(registry, clock=clock)
    registry.publish(beat("short", ttl_s=0.5))
    registry.publish(beat("long", ttl_s=60.0))
    assert ids(view, 0.0) == {"short", "long"}
    clock.now += 1.0  # past short's time to live, as the view counts it
    assert ids(view, 0.0) == {"long"}


def test_a_heartbeat_written_behind_the_counters_back_is_seen_at_the_resync(
    registry: Registry,
) -> None:
    clock = Clock()
    view = FleetView(registry, resync_s=60.0, clock=clock)
    registry.publish(beat("a"))
    assert ids(view, 0.0) == {"a"}
    # An older worker writing its heartbeat directly moves no counter.
    registry.client.set(registry.keys.worker("old"), beat("old").to_json(), px=60_000)
    registry.client.sadd(registry.keys.workers, "old")
    assert ids(view, 0.0) == {"a"}
    clock.now += 61.0
    assert ids(view, 0.0) == {"a", "old"}


def test_a_counter_reset_makes_a_full_read(registry: Registry) -> None:
    view = FleetView(registry)
    for worker_id in ("a", "b", "c"):
        registry.publish(beat(worker_id))
    assert ids(view, 0.0) == {"a", "b", "c"}
    registry.client.delete(registry.keys.seq, registry.keys.changes)  # Redis restarted
    registry.publish(beat("d"))
    assert ids(view, 0.0) == {"a", "b", "c", "d"}


def test_every_router_sees_the_demand_of_all(registry: Registry) -> None:
    registry.publish(beat("w", models_in_memory=["m"]))
    busy, idle = FleetRouter(registry=registry), FleetRouter(registry=registry)
    for _ in range(30):
        busy.route(GENERATE, "vllm", "m")
    busy.claims.flush()
    idle.refresh()
    # 30 requests with a 60 s time constant: half a request per second, read by a router
    # that was asked for nothing.
    assert idle.pools.demand["m"] == pytest.approx(0.5, rel=0.05)
    assert idle.demand.rates(idle.clock()) == {}
    wait_for(lambda: registry.client.hget(registry.keys.demand, "m"), 5.0, "the demand")


def test_a_kept_order_agrees_with_a_fresh_sort_as_loads_move() -> None:
    rng = random.Random(7)
    policy = CostPolicy()
    fleet = [
        beat(
            f"w{i}",
            models_in_memory=["m"] if i % 3 else [],
            models_on_disk=["m"],
            active_requests=rng.randint(0, 3),
            mean_service_s=rng.uniform(0.5, 3.0),
        )
        for i in range(40)
    ]
    pool = policy.prepare(fleet, "vllm", "m")
    in_flight: dict[str, int] = {}
    ranking = Ranking(policy, pool, in_flight)
    for step in range(300):
        expected = [b.worker_id for b in policy.rank(pool, in_flight=in_flight, limit=5)]
        assert [c.worker_id for c, _ in ranking.top(in_flight, 5)] == expected, step
        winner = expected[0]
        in_flight[winner] = in_flight.get(winner, 0) + 1  # routed: seen lazily
        if step % 7 == 0:  # a refresh: some loads fall (releases), some rise
            for worker_id in rng.sample(sorted(in_flight), k=min(3, len(in_flight))):
                in_flight[worker_id] = max(0, in_flight[worker_id] + rng.choice((-2, -1, 1)))
                ranking.update(worker_id, in_flight)
    expected = [b.worker_id for b in policy.rank(pool, in_flight=in_flight, limit=5)]
    excluded = frozenset({expected[0]})
    assert [c.worker_id for c, _ in ranking.top(in_flight, 4, excluded)] == expected[1:5]


def test_a_worker_of_an_older_version_is_not_expired_on_the_routers_clock(
    registry: Registry,
) -> None:
    # It renews its heartbeat with a plain SET: no counter moves, so the view cannot see
    # the renewals and must not drop it when the time to live it read runs out.
    registry.client.set(registry.keys.worker("old"), beat("old").to_json(), px=60_000)
    registry.client.sadd(registry.keys.workers, "old")
    clock = Clock()
    view = FleetView(registry, resync_s=600.0, clock=clock)
    assert ids(view, 0.0) == {"old"}
    clock.now += 120.0
    assert ids(view, 0.0) == {"old"}


def test_a_claim_that_lapses_in_one_routers_read_falls_in_the_others(
    registry: Registry,
) -> None:
    registry.publish(beat("w"))
    view = FleetView(registry)
    registry.claim_many({"w": ["lost"]}, [], 0, lapse_s=60.0)
    assert view.refresh(0.0).snapshot.in_flight == {"w": 1}
    registry.read(now=time.time() + 120.0)  # another router's read, after the lapse
    assert view.refresh(0.0).snapshot.in_flight == {}
