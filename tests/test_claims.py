"""Claims: every message routed to a worker is counted against it until its outcome, from any
number of publishing threads, and released exactly once whatever the outcome."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import pytest
from celery import Celery, signals
from celery.exceptions import TimeLimitExceeded
from celery.worker.request import Request
from kombu import Queue
from kombu.exceptions import EncodeError

from coordinator.core.heartbeat import Heartbeat
from coordinator.core.settings import CoordinatorSettings
from coordinator.core.task_spec import GENERATE
from coordinator.dispatch.app import create_app, fleet_of
from coordinator.fleet.claims import CLAIM_HEADER, parse_claim
from coordinator.fleet.registry import Registry
from coordinator.ops import admin
from coordinator.recovery.reaper import Reaper
from coordinator.sim.servers.ollama import SimulatedModelServer
from tests.conftest import WorkerFactory, wait_for, wait_for_worker
from worker_tasks.tasks import generate

THREADS = 8
ROUTES_PER_THREAD = 1_500


def test_routing_from_many_threads_counts_every_task_and_never_raises(
    app: Celery, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    lasting = Registry(registry.client, registry.keys, ttl_s=600.0)  # outlives the test
    for n in range(4):
        lasting.publish(
            Heartbeat(
                worker_id=f"w{n}",
                loaded_models=("warm", "cold"),
                models_in_memory=("warm",) if n < 2 else (),
                services_status={"vllm": "healthy"},
            )
        )
    router = fleet_of(app).router
    router.refresh_s = 0.002  # snapshots, pools and leases change under the threads' feet
    routed: list[int] = []

    def publish(offset: int) -> None:
        models = ("warm", "cold", "nowhere")
        count = 0
        for i in range(ROUTES_PER_THREAD):
            route = router.route(GENERATE, "vllm", models[(i + offset) % 3])
            router.confirm(route.claim_id)  # as the publish would
            count += route.worker_id is not None
        routed.append(count)

    with caplog.at_level(logging.ERROR, logger="coordinator.dispatch.router"):
        threads = [threading.Thread(target=publish, args=(n,)) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert routed == [ROUTES_PER_THREAD] * THREADS
    router.claims.flush()
    assert sum(registry.snapshot().in_flight.values()) == THREADS * ROUTES_PER_THREAD


def in_flight(registry: Registry) -> dict[str, int]:
    """What ``coordinator workers --json`` reports, per worker."""
    return {view.worker_id: view.in_flight for view in admin.workers(registry)}


@pytest.mark.e2e
def test_every_claim_is_released_after_a_mixed_workload(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
    reaper_thread: Reaper,
) -> None:
    # Each can pull only what it has: a model nobody has fails, a retry is not served by a
    # pull elsewhere.
    a_server = fake_server("a", ["alpha", "beta"], ["alpha"], library=frozenset({"alpha", "beta"}))
    b_server = fake_server("b", ["beta"], ["beta"], library=frozenset({"beta"}))
    workers = [
        start_worker(worker_id, tier="gpu", server=server, wait=False)
        for worker_id, server in (("a", a_server), ("b", b_server))
    ]
    for worker in workers:
        wait_for_worker(registry, worker)

    # Successes, and failures at once (a model nobody has answers 404).
    done = [generate.delay(f"ok {n}", model="alpha") for n in range(10)]
    done += [generate.delay("nobody has it", model="gamma") for _ in range(3)]
    for result in done:
        result.get(timeout=30, propagate=False)

    # Retries until they run out: the service answers 503 to every attempt.
    a_server.set_fault(fail_with=503)
    retried = generate.delay("unlucky", model="alpha")
    retried.get(timeout=60, propagate=False)
    a_server.set_fault(fail_with=None)

    # Revoked and expired messages wait behind slow ones on b; then b dies with its queue,
    # and the reaper moves what is left to a.
    b_server.set_fault(delay_s=1.0)
    late = [generate.delay(f"slow {n}", model="beta") for n in range(4)]
    late += [generate.apply_async(("stale",), {"model": "beta"}, expires=0.5) for _ in range(2)]
    revoked = [generate.delay("changed my mind", model="beta") for _ in range(2)]
    for result in revoked:
        result.revoke()
    wait_for(lambda: b_server.request_count("POST", "/api/generate") >= 1, 20, "b to be busy")
    os.kill(workers[1].proc.pid, signal.SIGKILL)
    workers[1].proc.wait(timeout=10)
    for result in late + revoked:
        result.get(timeout=60, propagate=False)

    assert retried.failed()
    assert {r.state for r in revoked} == {"REVOKED"}
    wait_for(lambda: set(in_flight(registry).values()) == {0}, 10, "every claim released")
    assert set(in_flight(registry)) == {"a"}


@pytest.mark.e2e
def test_a_hard_time_limit_releases_the_claim_under_prefork(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
) -> None:
    server = fake_server("slow", ["alpha"], ["alpha"])
    worker = start_worker("w", tier="gpu", server=server, args=["-P", "prefork", "-c", "1"])
    assert "(prefork)" in worker.log()
    server.set_fault(delay_s=30.0)
    # The pool kills the child after 1 s: no task_postrun runs anywhere.
    result = generate.apply_async(("hi",), {"model": "alpha"}, time_limit=1)
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=30)
    wait_for(lambda: in_flight(registry) == {"w": 0}, 10, "the claim released")


def test_a_child_killed_at_its_hard_time_limit_still_releases_its_claim(
    settings: CoordinatorSettings, registry: Registry
) -> None:
    """billiard sends TERM, then KILL 0.1 s later: a child killed before its task_postrun
    leaves the release to the main process, which saw the message arrive."""
    worker_app = create_app(settings, main=f"outcomes-{settings.namespace}")
    try:
        registry.publish(Heartbeat(worker_id="w", services_status={"vllm": "healthy"}))
        worker_app.send_task(GENERATE, args=["hi"], kwargs={"model": "m"})
        fleet_of(worker_app).router.claims.flush()
        assert in_flight(registry) == {"w": 1}
        with worker_app.connection_for_read() as connection:
            queue = Queue(registry.keys.worker_queue("w"))(connection.default_channel)
            message = queue.get(no_ack=True)  # the message as the worker receives it
        assert message is not None
        task = worker_app.tasks[GENERATE]
        request = Request(message, app=worker_app, task=task)
        signals.task_received.send(sender=None, request=request)
        signals.task_failure.send(sender=task, task_id=request.id, exception=TimeLimitExceeded(1))
        assert in_flight(registry) == {"w": 0}
    finally:
        worker_app.close()


def test_a_task_that_cannot_be_published_gives_its_claim_back(
    app: Celery, registry: Registry
) -> None:
    registry.publish(Heartbeat(worker_id="w", services_status={"vllm": "healthy"}))
    with pytest.raises(EncodeError):
        generate.delay(object(), model="m")  # routed, then refused by the JSON encoder
    with pytest.raises(EncodeError):
        generate.delay(object(), model="m")
    generate.delay("hi", model="m")
    fleet_of(app).router.claims.flush()
    assert in_flight(registry) == {"w": 1}
    assert registry.client.llen(registry.keys.worker_queue("w")) == 1


def test_the_callers_headers_are_left_as_they_were(app: Celery, registry: Registry) -> None:
    registry.publish(Heartbeat(worker_id="w", services_status={"vllm": "healthy"}))
    headers = {"trace": "t-1"}
    app.send_task(GENERATE, args=["hi"], kwargs={"model": "m"}, headers=headers)
    # A caller that sends with the same headers again must not pass this message's claim on.
    assert headers == {"trace": "t-1"}
    raw = registry.client.lindex(registry.keys.worker_queue("w"), 0)
    assert raw is not None
    sent = json.loads(raw)["headers"]
    assert sent["trace"] == "t-1"
    assert parse_claim(sent[CLAIM_HEADER]) is not None


def test_a_batch_written_twice_cannot_bring_back_a_released_claim(registry: Registry) -> None:
    registry.publish(Heartbeat(worker_id="w"))
    assert not registry.release("w", "early")  # overtook its claim's batch
    for _ in range(2):  # the batch, and again after a timeout that hid its success
        assert registry.claim_many({"w": ["early"]}, [], 0) == {"w": 0}
    assert registry.snapshot().in_flight == {}


def test_a_probe_after_the_failure_lifts_an_unreachable_mark(registry: Registry) -> None:
    registry.publish(Heartbeat(worker_id="w", services_status={"vllm": "healthy"}))
    before = time.time()
    registry.mark_unreachable("w", "vllm", for_s=60.0)
    assert registry.live_workers()[0].services_status["vllm"] == "unhealthy"
    registry.clear_unreachable("w", ["vllm"], probed_at=before)  # a probe from before
    assert registry.live_workers()[0].services_status["vllm"] == "unhealthy"
    registry.clear_unreachable("w", ["vllm"], probed_at=time.time())
    assert registry.live_workers()[0].services_status["vllm"] == "healthy"


def test_a_task_run_eagerly_leaves_no_claim(
    app: Celery, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_URL", "http://127.0.0.1:9")  # refused: retried eagerly
    registry.publish(Heartbeat(worker_id="w", services_status={"vllm": "healthy"}))
    result = generate.apply(args=("hi",), kwargs={"model": "m"})
    assert result.failed()
    fleet_of(app).router.claims.flush()
    assert registry.snapshot().in_flight == {}
    assert registry.client.hlen(registry.keys.down("w")) == 0  # not a worker: marks nothing


def test_explain_ranks_as_the_router_decides(app: Celery, registry: Registry) -> None:
    lasting = Registry(registry.client, registry.keys, ttl_s=600.0)
    models = {"warm": (["m"], ["m"]), "disk": (["m"], []), "none": ([], [])}
    for worker_id, (on_disk, in_memory) in models.items():
        lasting.publish(
            Heartbeat(
                worker_id=worker_id,
                loaded_models=tuple(on_disk),
                models_in_memory=tuple(in_memory),
                services_status={"vllm": "healthy"},
                service_s={"m": 2.0},
            )
        )
    router = fleet_of(app).router
    for _ in range(12):  # load and demand build up, as the router's own view holds them
        router.route(GENERATE, "vllm", "m")
        ranked = router.explain("vllm", "m")
        assert router.route(GENERATE, "vllm", "m").worker_id == ranked[0].worker_id
