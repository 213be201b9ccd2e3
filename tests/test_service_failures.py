"""A failing model service is left at once: unreachable services are marked in the registry
before the retry is routed, and a model a worker does not have is routed to one that has it."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from coordinator.fleet.registry import Registry
from coordinator.sim.servers.ollama import SimulatedModelServer
from tests.conftest import WorkerFactory, wait_for_worker
from worker_tasks.tasks import generate

# The app fixture makes the test's fleet app the one tasks are sent with.
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("app")]
# Heartbeats and probes far apart: whatever the test sees within it, a task caused.
SLOW_HEARTBEATS = {"HEARTBEAT_INTERVAL_S": "30", "HEARTBEAT_TTL_S": "90"}


Models = tuple[list[str], list[str]]
"""(on disk, in memory)"""
TwoWorkers = Callable[[Models, Models], tuple[SimulatedModelServer, SimulatedModelServer]]


@pytest.fixture
def two_workers(
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
) -> TwoWorkers:
    """Start GPU workers ``a`` and ``b``, each with its simulated Ollama holding ``models``."""

    def start(a: Models, b: Models) -> tuple[SimulatedModelServer, SimulatedModelServer]:
        servers = fake_server("a", *a), fake_server("b", *b)
        workers = [
            start_worker(name, tier="gpu", server=server, extra_env=SLOW_HEARTBEATS, wait=False)
            for name, server in zip("ab", servers, strict=True)
        ]
        for worker in workers:
            wait_for_worker(registry, worker)
        return servers

    return start


def test_an_unreachable_service_is_left_before_the_retry(
    two_workers: TwoWorkers, registry: Registry
) -> None:
    # On disk only on b: the router prefers a.
    a_server, b_server = two_workers((["llama3.2"], ["llama3.2"]), (["llama3.2"], []))
    a_server.stop()  # connection refused from now on; a's heartbeat still says healthy

    answer = generate.delay("anyone?", model="llama3.2").get(timeout=60)

    assert answer["worker_id"] == "b"
    assert b_server.request_count("POST", "/api/generate") == 1
    statuses = {hb.worker_id: hb.services_status for hb in registry.live_workers()}
    assert statuses["a"]["vllm"] == "unhealthy"  # marked by the task, 30 s before a probe


def test_a_model_the_worker_lacks_is_routed_to_one_that_has_it(
    two_workers: TwoWorkers, registry: Registry
) -> None:
    a_server, _ = two_workers((["phi3"], ["phi3"]), (["llama3.2"], ["llama3.2"]))
    # As a task that waited in a shared queue, or was sent to a worker by hand, would be.
    queue = registry.keys.worker_queue("a")

    answer = generate.apply_async(("hi",), {"model": "llama3.2"}, queue=queue).get(timeout=60)

    assert answer["worker_id"] == "b"
    assert a_server.request_count("POST", "/api/generate") == 1


def test_every_worker_found_without_the_model_stays_excluded(
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
) -> None:
    # a and b claim llama3.2 in memory (their listings say so) but answer 404 for it; c has
    # it on disk only, so the router prefers a and b until both have said no.
    listing = json.dumps({"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest"}]})
    liars = [fake_server(name, ["phi3"]) for name in "ab"]
    for server in liars:
        server.garble("/api/tags", listing)
        server.garble("/api/ps", listing)
    honest = fake_server("c", ["llama3.2"])
    workers = [
        start_worker(name, tier="gpu", server=server, extra_env=SLOW_HEARTBEATS, wait=False)
        for name, server in zip("abc", [*liars, honest], strict=True)
    ]
    for worker in workers:
        wait_for_worker(registry, worker)

    answer = generate.delay("hi", model="llama3.2").get(timeout=60)

    assert answer["worker_id"] == "c"
    # Each liar was tried once: the second 404 did not send the task back to the first.
    assert [s.request_count("POST", "/api/generate") for s in liars] == [1, 1]
