"""Model-load leases on a real Redis: the registry's compare-and-set, and routers that take
them, up to two routers in two processes racing for one cold model."""

from __future__ import annotations

import logging
import multiprocessing
import random
import time
from typing import Any

import pytest
import redis

from coordinator.core.heartbeat import Heartbeat
from coordinator.core.keys import Keys
from coordinator.core.settings import CoordinatorSettings
from coordinator.dispatch.route import Route
from coordinator.dispatch.router import FleetRouter
from coordinator.fleet.registry import LEASES_KEPT_S, LeaseResult, Registry, redis_client
from coordinator.fleet.registry_entries import lease_field
from coordinator.routing import CostPolicy
from coordinator.routing.decisions import Decision
from tests.conftest import WAIT_S, PrivateRedis, builtin_task

GENERATE = "worker_tasks.generate"
MODEL = "llama3.2"


def on_disk(worker_id: str) -> Heartbeat:
    """An idle GPU worker with the model on disk, not in memory: routing there loads it."""
    return Heartbeat(worker_id=worker_id, tier=1, loaded_models=(MODEL,), capabilities=("vllm",))


def cost_router(registry: Registry, seed: int) -> FleetRouter:
    """A router on the cost policy that keeps its first snapshot (the tests refresh it)."""
    return FleetRouter(
        registry=registry, policy=CostPolicy(), rng=random.Random(seed), refresh_s=3600.0
    )


@pytest.fixture
def lasting(registry: Registry) -> Registry:
    """The test's registry with a TTL that outlives a slow test (the fixture's is 2 s)."""
    return Registry(registry.client, registry.keys, ttl_s=120)


def test_a_lease_is_granted_only_on_a_current_view_of_its_holders(
    registry: Registry, redis_conn: redis.Redis
) -> None:
    now = time.time()
    first = registry.acquire_lease(MODEL, "w1", now + 5, now + 60, frozenset(), now)
    assert (first.granted, first.holders) == (True, {"w1": now + 5})
    # A caller that has not seen w1's lease is refused and told about it.
    stale = registry.acquire_lease(MODEL, "w2", now + 7, now + 60, frozenset(), now)
    assert (stale.granted, stale.holders) == (False, {"w1": now + 5})
    too_many = registry.acquire_lease(MODEL, "w2", now + 7, now + 60, frozenset({"w1", "w9"}), now)
    assert (too_many.granted, too_many.holders) == (False, {"w1": now + 5})
    # One that has seen it may start a second copy.
    second = registry.acquire_lease(MODEL, "w2", now + 7, now + 60, frozenset({"w1"}), now)
    assert (second.granted, second.holders) == (True, {"w1": now + 5, "w2": now + 7})
    # Each model has its own holders.
    other = registry.acquire_lease("qwen2.5", "w1", now + 9, now + 60, frozenset(), now)
    assert (other.granted, other.holders) == (True, {"w1": now + 9})
    assert registry.snapshot(now).leases == {
        MODEL: {"w1": now + 5, "w2": now + 7},
        "qwen2.5": {"w1": now + 9},
    }
    assert redis_conn.hget(registry.keys.leases, lease_field(MODEL, "w1")) == (
        f"{now + 5!r} {now + 60!r}"
    )
    # The hash goes by itself some time after its last lease, whatever happens to routers.
    assert 60 + LEASES_KEPT_S - 5 <= redis_conn.ttl(registry.keys.leases) <= 60 + LEASES_KEPT_S


def test_an_expired_lease_is_ignored_and_pruned(lasting: Registry, redis_conn: redis.Redis) -> None:
    past = time.time() - 100
    assert lasting.acquire_lease(MODEL, "gone", past + 1, past + 10, frozenset(), past).granted
    for worker_id in ("a", "b"):
        lasting.publish(on_disk(worker_id))
    assert lasting.snapshot().leases == {}
    assert redis_conn.hlen(lasting.keys.leases) == 1  # still stored until the next lease
    router = cost_router(lasting, seed=1)
    route = router.route(GENERATE, "vllm", MODEL)
    # The router expected no holders, since the expired one does not count: granted, and
    # the expired entry went on the way.
    assert route.worker_id in ("a", "b")
    assert redis_conn.hkeys(lasting.keys.leases) == [lease_field(MODEL, route.worker_id)]


class _CountingRegistry(Registry):
    """The registry, counting the leases it was refused (to tell a real race happened)."""

    refused = 0

    def acquire_lease(self, *args: Any, **kwargs: Any) -> LeaseResult:
        result = super().acquire_lease(*args, **kwargs)
        self.refused += not result.granted
        return result


def _race(url: str, namespace: str, seed: int, models: list[str], start: Any, results: Any) -> None:
    """One publisher: a view of the fleet with no lease, then route at the same moment as
    the other; once per model."""
    registry = _CountingRegistry(redis_client(url, 5.0), Keys(namespace), ttl_s=120)
    router = cost_router(registry, seed)
    for model in models:
        router.refresh()
        start.wait()
        results.put((model, router.route(GENERATE, "vllm", model).worker_id))
    router.claims.flush()
    results.put(("refused", registry.refused))


def test_two_routers_in_two_processes_load_a_cold_model_once(
    lasting: Registry, settings: CoordinatorSettings, redis_conn: redis.Redis
) -> None:
    """Four equal idle workers with the models on disk, two publishers each holding a
    snapshot without any lease, then one task each at the same moment. Their rngs differ,
    so they mostly pick different workers first: one lease wins, the other router is
    refused, re-ranks with the winner's load under way, and queues its task behind it."""
    models = [f"cold-{n}" for n in range(6)]
    for worker_id in ("eq-a", "eq-b", "eq-c", "eq-d"):
        lasting.publish(on_disk(worker_id).model_copy(update={"models_on_disk": tuple(models)}))
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2, timeout=WAIT_S)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_race,
            args=(settings.redis_url, settings.namespace, seed, models, start, results),
        )
        for seed in (11, 12)
    ]
    for proc in procs:
        proc.start()
    routed: dict[str, list[str]] = {model: [] for model in models}
    refused = 0
    for _ in range(2 * len(models) + 2):
        key, value = results.get(timeout=2 * WAIT_S)
        if key == "refused":
            refused += value
        else:
            routed[key].append(value)
    for proc in procs:
        proc.join(WAIT_S)
        assert proc.exitcode == 0
    leases = lasting.snapshot().leases
    for model in models:
        first, second = routed[model]
        assert first == second, (model, routed[model])
        assert list(leases[model]) == [first]
    assert redis_conn.hlen(lasting.keys.leases) == len(models)
    # One router lost each race (it was refused and queued behind the winner's load).
    assert refused == len(models)


def test_a_second_copy_is_loaded_once_the_backlog_outgrows_a_fresh_load(
    lasting: Registry,
) -> None:
    # 3.25 GB: no estimate below ties with another (ties go to the random jitter).
    for worker_id in ("w1", "w2", "w3"):
        lasting.publish(
            on_disk(worker_id).model_copy(update={"model_bytes": {MODEL: 3_250_000_000}})
        )
    router = cost_router(lasting, seed=5)
    routes: list[str | None] = []
    while len(set(routes)) < 2 and len(routes) < 40:
        route = router.route(GENERATE, "vllm", MODEL)
        router.confirm(route.claim_id)  # published
        routes.append(route.worker_id)
    holder, moved = routes[0], len(routes) - 1
    assert routes[moved] not in (holder, None)
    assert moved >= 2  # some tasks queued behind the first load before a second copy
    assert set(lasting.snapshot().leases[MODEL]) == {holder, routes[moved]}
    router.claims.flush()
    decisions = [Decision.model_validate_json(raw) for raw in lasting.recent_decisions(40)]
    decisions.reverse()
    assert decisions[0].candidates[0]["state"] == "disk"  # the first task starts the load
    before, after = decisions[moved - 1], decisions[moved]
    assert (before.worker_id, before.candidates[0]["state"]) == (holder, "loading")
    # The task that moved saw the holder's backlog outlast a fresh load elsewhere.
    best, *others = after.candidates
    assert (best["worker_id"], best["state"]) == (routes[moved], "disk")
    held = next(c for c in others if c["worker_id"] == holder)
    assert held["state"] == "loading"
    assert float(held["total"]) >= float(best["total"])
    # ... and not before: until then the holder was the better bet.
    last = before.candidates[1]
    assert (last["state"], float(last["total"])) == ("disk", float(best["total"]))
    assert float(before.candidates[0]["total"]) <= float(last["total"])


def test_redis_down_during_the_lease_still_routes_and_backs_off(
    private_redis: Any, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    server: PrivateRedis = private_redis()
    registry = Registry(redis_client(server.url, 0.5), Keys(namespace), ttl_s=120)
    for worker_id in ("a", "b"):
        registry.publish(on_disk(worker_id))
    router = cost_router(registry, seed=2)
    router.refresh()  # the snapshot is taken; only the lease meets the outage
    server.stop()
    with caplog.at_level(logging.WARNING, logger="coordinator.dispatch.router"):
        routed = router(GENERATE, ["hi"], {"model": MODEL}, {}, task=builtin_task(GENERATE))
    assert routed is not None
    assert routed["queue"] in (Keys(namespace).worker_queue("a"), Keys(namespace).worker_queue("b"))
    assert any("lease on loading llama3.2 not taken" in r.getMessage() for r in caplog.records)
    # The router leaves Redis alone for a while, as after any registry error.
    assert router.route(GENERATE, "vllm", MODEL) == Route(
        Keys(namespace).service_queue("vllm"), None
    )


def test_malformed_lease_entries_never_break_a_snapshot_or_a_lease(
    registry: Registry, redis_conn: redis.Redis
) -> None:
    now = time.time()
    later = f"{now + 5!r} {now + 60!r}"
    redis_conn.hset(
        registry.keys.leases,
        mapping={
            "not json": later,
            '"a string"': later,
            '["m", "w", "extra"]': later,
            "[1, 2]": later,
            lease_field(MODEL, "no-numbers"): "soon never",
            lease_field(MODEL, "three-numbers"): "1 2 3",
            lease_field(MODEL, "nan"): f"nan {now + 60!r}",
            lease_field(MODEL, "ok"): later,
        },
    )
    assert registry.snapshot(now).leases == {MODEL: {"ok": now + 5}}
    taken = registry.acquire_lease(MODEL, "next", now + 9, now + 60, frozenset({"ok"}), now)
    assert taken.granted
    assert taken.holders["ok"] == now + 5
    assert taken.holders["next"] == now + 9
    assert set(taken.holders) == {"ok", "next"}
    # Entries without readable times are pruned; the others never count as holders.
    for worker_id in ("no-numbers", "three-numbers", "nan"):
        assert not redis_conn.hexists(registry.keys.leases, lease_field(MODEL, worker_id))


def test_a_worker_loading_one_model_is_busy_for_every_other(lasting: Registry) -> None:
    # A 55 GB load takes about a minute: whatever the model, a task sent there waits for it.
    for worker_id in ("a", "b"):
        lasting.publish(
            Heartbeat(
                worker_id=worker_id,
                tier=1,
                loaded_models=(MODEL, "other"),
                models_in_memory=("other",),
                capabilities=("vllm",),
                model_bytes={MODEL: 55_000_000_000},
            )
        )
    first, second = cost_router(lasting, seed=1), cost_router(lasting, seed=2)
    for router in (first, second):  # both have their pools for "other" already
        router.route(GENERATE, "vllm", "other")
    loader = first.route(GENERATE, "vllm", MODEL).worker_id
    assert set(lasting.snapshot().leases[MODEL]) == {loader}
    second.refresh()  # the other router reads the lease
    for router in (first, second):
        routes = {router.route(GENERATE, "vllm", "other").worker_id for _ in range(6)}
        assert routes == {"a", "b"} - {loader}
