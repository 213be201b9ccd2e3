"""A failing model service is left at once: unreachable services are marked in the registry
before the retry is routed, and a model a worker does not have is routed to one that has it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from coordinator.core.errors import ModelNotFoundError
from coordinator.fleet.registry import Registry
from coordinator.sim.servers.ollama import SimulatedModelServer
from tests.conftest import WorkerFactory, wait_for_worker
from worker_tasks.tasks import generate

# The app fixture makes the test's fleet app the one tasks are sent with.
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("app")]
# Heartbeats and probes far apart: whatever the test sees within it, a task caused.
SLOW_HEARTBEATS = {"HEARTBEAT_INTERVAL_S": "30", "HEARTBEAT_TTL_S": "90"}


def two_workers(
    start_worker: WorkerFactory,
    registry: Registry,
    a: SimulatedModelServer,
    b: SimulatedModelServer,
) -> None:
    workers = [
        start_worker(name, tier="gpu", server=server, extra_env=SLOW_HEARTBEATS, wait=False)
        for name, server in (("a", a), ("b", b))
    ]
    for worker in workers:
        wait_for_worker(registry, worker)


def test_an_unreachable_service_is_left_before_the_retry(
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
) -> None:
    a_server = fake_server("a", ["llama3.2"], ["llama3.2"])
    b_server = fake_server("b", ["llama3.2"])  # on disk only: the router prefers a
    two_workers(start_worker, registry, a_server, b_server)
    a_server.stop()  # connection refused from now on; a's heartbeat still says healthy

    answer = generate.delay("anyone?", model="llama3.2").get(timeout=60)

    assert answer["worker_id"] == "b"
    assert b_server.request_count("POST", "/api/generate") == 1
    statuses = {hb.worker_id: hb.services_status for hb in registry.live_workers()}
    assert statuses["a"]["vllm"] == "unhealthy"  # marked by the task, 30 s before a probe


def test_a_model_the_worker_lacks_is_routed_to_one_that_has_it(
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
) -> None:
    a_server = fake_server("a", ["phi3"], ["phi3"])
    b_server = fake_server("b", ["llama3.2"], ["llama3.2"])
    two_workers(start_worker, registry, a_server, b_server)
    # As a task that waited in a shared queue, or was sent to a worker by hand, would be.
    queue = registry.keys.worker_queue("a")

    answer = generate.apply_async(("hi",), {"model": "llama3.2"}, queue=queue).get(timeout=60)

    assert answer["worker_id"] == "b"
    assert a_server.request_count("POST", "/api/generate") == 1


def test_a_model_nobody_has_fails_naming_what_the_fleet_serves(
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
) -> None:
    a_server = fake_server("a", ["phi3"], ["phi3"])
    b_server = fake_server("b", ["llama3.2"], ["llama3.2"])
    two_workers(start_worker, registry, a_server, b_server)

    result = generate.delay("hi", model="no-such-model")
    with pytest.raises(ModelNotFoundError, match=r"no other live worker has 'no-such-model'"):
        result.get(timeout=60)
    assert "llama3.2, phi3" in str(result.result)
