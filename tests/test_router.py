"""The router inside a real Celery app on a real Redis; messages are read back from the
broker's lists. No worker consumes here: these tests look at where each message lands."""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from coordinator.core.heartbeat import Heartbeat
from coordinator.core.settings import CoordinatorSettings
from coordinator.dispatch.app import create_app, fleet_of
from coordinator.dispatch.router import FleetRouter
from coordinator.fleet.claims import CLAIM_HEADER
from coordinator.fleet.registry import Registry
from coordinator.routing import CostPolicy, SeedPolicy
from coordinator.routing.decisions import Decision
from tests.conftest import SCENARIO_1, free_port

GENERATE, OCR, EMBED = "worker_tasks.generate", "worker_tasks.ocr", "worker_tasks.embed"
ALL = ["vllm", "ocr", "embeddings"]


def queued_task_names(conn: redis.Redis, queue: str) -> list[str]:
    """Task names of the messages waiting in ``queue`` (a Redis list under Celery)."""
    return [json.loads(raw)["headers"]["task"] for raw in conn.lrange(queue, 0, -1)]


def flushed_decisions(app: Celery) -> list[str]:
    """The router's decisions, newest first, once its buffered writes are flushed."""
    fleet_of(app).router.claims.flush()
    return list(fleet_of(app).registry.recent_decisions(10))


def send(app: Celery, name: str, *args: Any, **options: Any) -> None:
    app.send_task(name, args=args, kwargs=options.pop("kwargs", None), **options)


@pytest.fixture
def seed_app(settings: CoordinatorSettings) -> Iterator[Celery]:
    """An app routing by the design's scoring table (``ROUTING_POLICY=seed``), whose
    scenarios these tests check."""
    seeded = create_app(settings.model_copy(update={"routing_policy": SeedPolicy.name}))
    yield seeded
    seeded.close()


@pytest.fixture
def scenario_1(registry: Registry) -> None:
    """The design's scenario 1 in the registry."""
    for heartbeat in SCENARIO_1:
        registry.publish(heartbeat)


def test_scenario_1_ocr_goes_to_the_ocr_specialist(
    seed_app: Celery, scenario_1: None, redis_conn: redis.Redis, settings: CoordinatorSettings
) -> None:
    app = seed_app
    send(app, OCR, "aGVsbG8=")
    assert queued_task_names(redis_conn, settings.keys.worker_queue("gpu-1")) == [OCR]
    assert redis_conn.llen(settings.keys.worker_queue("gpu-2")) == 0
    decision = Decision.model_validate_json(flushed_decisions(app)[0]).model_dump()
    assert (decision["worker_id"], decision["policy"]) == ("gpu-1", "seed")
    assert decision["outcome"] == "routed"
    best, runner_up = decision["candidates"]
    assert best["model_loaded"] == 100
    assert best["specialization"] == 50
    assert best["total"] == pytest.approx(174, abs=5)  # tiebreak adds 0-5
    assert runner_up["total"] == pytest.approx(15.5, abs=5)


def test_generate_with_a_model_goes_where_it_is_loaded(
    app: Celery, scenario_1: None, redis_conn: redis.Redis, settings: CoordinatorSettings
) -> None:
    send(app, GENERATE, "hi", kwargs={"model": "llama3.2:latest"})
    assert queued_task_names(redis_conn, settings.keys.worker_queue("gpu-2")) == [GENERATE]


def test_scenario_2_the_less_loaded_worker_wins(
    seed_app: Celery, registry: Registry, redis_conn: redis.Redis, settings: CoordinatorSettings
) -> None:
    app = seed_app
    common: dict[str, Any] = {"tier": 1, "loaded_models": ["llama3.2"], "capabilities": ALL}
    registry.publish(
        Heartbeat.model_validate(
            {"worker_id": "gpu-1", "current_load": 0.9, "active_requests": 5, **common}
        )
    )
    registry.publish(
        Heartbeat.model_validate(
            {"worker_id": "gpu-2", "current_load": 0.3, "active_requests": 1, **common}
        )
    )
    send(app, GENERATE, "hi", kwargs={"model": "llama3.2"})
    assert redis_conn.llen(settings.keys.worker_queue("gpu-2")) == 1
    decision = Decision.model_validate_json(flushed_decisions(app)[0])
    totals = {c["worker_id"]: c["total"] for c in decision.candidates}
    assert totals["gpu-1"] == pytest.approx(78, abs=5)
    assert totals["gpu-2"] == pytest.approx(116, abs=5)


def test_an_explicit_queue_wins_and_is_not_counted(
    app: Celery, scenario_1: None, redis_conn: redis.Redis, registry: Registry
) -> None:
    send(app, OCR, "aGVsbG8=", queue="hand-picked-" + registry.keys.namespace)
    assert queued_task_names(redis_conn, "hand-picked-" + registry.keys.namespace) == [OCR]
    assert registry.snapshot().in_flight == {}


def test_a_claim_copied_onto_a_message_sent_to_a_queue_is_dropped(
    app: Celery, scenario_1: None, redis_conn: redis.Redis, registry: Registry
) -> None:
    # A retry sent to a queue of the caller's choosing copies the last attempt's headers.
    queue = "hand-picked-" + registry.keys.namespace
    stale = {CLAIM_HEADER: ["gpu-1", "an-earlier-attempt"], "kept": "yes"}
    send(app, OCR, "aGVsbG8=", queue=queue, headers=stale)
    (raw,) = redis_conn.lrange(queue, 0, -1)
    headers = json.loads(raw)["headers"]
    assert CLAIM_HEADER not in headers
    assert headers["kept"] == "yes"
    assert registry.snapshot().in_flight == {}


def test_tasks_the_router_does_not_know_keep_celerys_default_queue(
    app: Celery, scenario_1: None, redis_conn: redis.Redis, settings: CoordinatorSettings
) -> None:
    send(app, "somebody.elses.task", 1, 2)
    assert queued_task_names(redis_conn, settings.keys.default_queue) == ["somebody.elses.task"]


def test_no_capable_worker_falls_back_to_the_service_queue(
    app: Celery,
    registry: Registry,
    redis_conn: redis.Redis,
    settings: CoordinatorSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry.publish(Heartbeat(worker_id="cpu-only", tier=2, capabilities=("vllm",)))
    registry.publish(
        Heartbeat(
            worker_id="sick",
            capabilities=("embeddings",),
            services_status={"embeddings": "unhealthy"},
        )
    )
    with caplog.at_level(logging.WARNING, logger="coordinator.dispatch.router"):
        send(app, EMBED, ["text"])
    assert queued_task_names(redis_conn, settings.keys.service_queue("embeddings")) == [EMBED]
    assert any("no live worker offers 'embeddings'" in r.getMessage() for r in caplog.records)
    decision = Decision.model_validate_json(flushed_decisions(app)[0]).model_dump()
    assert decision["outcome"] == "fallback_no_worker"
    assert decision["queue"] == settings.keys.service_queue("embeddings")


def test_unreachable_registry_never_breaks_delay(
    settings: CoordinatorSettings, redis_conn: redis.Redis
) -> None:
    dead = settings.model_copy(
        update={"registry_url": f"redis://127.0.0.1:{free_port()}/0", "redis_timeout_s": 0.5}
    )
    app = create_app(dead, main="dead-registry")
    try:
        started = time.monotonic()
        for _ in range(20):
            app.send_task(GENERATE, args=["hi"])
        elapsed = time.monotonic() - started
    finally:
        fleet_of(app).close()
    assert redis_conn.llen(settings.keys.service_queue("vllm")) == 20
    # The router backs off after the first failure instead of retrying Redis for each task.
    assert elapsed < 5.0


def test_a_worker_that_joins_later_is_routed_to(
    app: Celery, registry: Registry, redis_conn: redis.Redis, settings: CoordinatorSettings
) -> None:
    now = [1000.0]
    fleet_of(app).router.clock = lambda: now[0]
    send(app, GENERATE, "before")
    assert redis_conn.llen(settings.keys.service_queue("vllm")) == 1
    registry.publish(Heartbeat(worker_id="late", capabilities=("vllm",)))
    now[0] += settings.registry_refresh_s  # the snapshot the router reuses is now too old
    send(app, GENERATE, "after")
    assert redis_conn.llen(settings.keys.worker_queue("late")) == 1


def _publish_burst(settings: CoordinatorSettings, start: Any, count: int) -> None:
    import worker_tasks.tasks  # noqa: F401  (registers the tasks in this spawned process)

    app = create_app(settings, main="burst")
    start.wait(30)
    for n in range(count):
        app.send_task(EMBED, args=[f"text {n}"])
    fleet_of(app).close()


def test_a_burst_from_three_processes_spreads_over_equal_workers(
    registry: Registry, redis_conn: redis.Redis, settings: CoordinatorSettings
) -> None:
    """Heartbeats stay the same during the burst: only in-flight accounting can spread it."""
    # Spawning three interpreters can outlast the test TTL on a busy machine.
    lasting = Registry(registry.client, registry.keys, ttl_s=120)
    for worker_id in ("eq-a", "eq-b", "eq-c"):
        lasting.publish(
            Heartbeat(
                worker_id=worker_id,
                tier=1,
                loaded_models=("nomic-embed-text",),
                # In memory everywhere: no load to lease, only load to spread.
                models_in_memory=("nomic-embed-text",),
                capabilities=("embeddings",),
            )
        )
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_publish_burst, args=(settings, start, 100)) for _ in range(3)]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    counts = Counter(
        {w: redis_conn.llen(settings.keys.worker_queue(w)) for w in ("eq-a", "eq-b", "eq-c")}
    )
    assert sum(counts.values()) == 300
    for worker_id, count in counts.items():
        assert 0.20 * 300 <= count <= 0.47 * 300, (worker_id, counts)
    assert registry.snapshot().in_flight == dict(counts)


class BrokenPolicy(CostPolicy):
    """A policy with a bug every decision hits."""

    def rank(self, pool: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug in the policy")

    def sort_key(self, candidate: Any, load: int) -> float:
        raise ZeroDivisionError("a bug in the policy")


def test_a_routing_bug_falls_back_and_logs_its_traceback_once(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    registry.publish(Heartbeat(worker_id="w", services_status={"vllm": "healthy"}))
    router = FleetRouter(registry=registry, policy=BrokenPolicy())
    with caplog.at_level(logging.WARNING, logger="coordinator.dispatch.router"):
        routes = [router.route(GENERATE, "vllm", "m") for _ in range(50)]
    assert {r.queue for r in routes} == {registry.keys.service_queue("vllm")}
    (record,) = caplog.records
    assert "routing failed: ZeroDivisionError: a bug in the policy" in record.getMessage()
    assert record.exc_info is not None  # the traceback, once


def test_decisions_are_kept_at_most_decisions_per_s_in_bursts(registry: Registry) -> None:
    registry.publish(Heartbeat(worker_id="w", services_status={"vllm": "healthy"}))
    now = [1000.0]
    router = FleetRouter(registry=registry, decisions_per_s=100.0, clock=lambda: now[0])

    def kept_after(tasks: int) -> int:
        for _ in range(tasks):
            router.confirm(router.route(GENERATE, "vllm", "m").claim_id)
        router.claims.flush()
        return len(registry.recent_decisions(1000))

    assert kept_after(300) == 100  # a second's worth at once, then nothing
    now[0] += 0.5
    assert kept_after(300) == 150  # half a second refills half
    # Under one a second, one is kept every so often, never none at all.
    slow = FleetRouter(registry=registry, decisions_per_s=0.5, clock=lambda: now[0])
    for _ in range(3):
        slow.confirm(slow.route(GENERATE, "vllm", "m").claim_id)
        now[0] += 1.0
    slow.claims.flush()
    assert len(registry.recent_decisions(1000)) == 152
