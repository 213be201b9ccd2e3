"""A model no live worker has: an Ollama worker pulls it (one worker, the lease held), a
server that cannot pull fails the task at once, and nothing is left behind either way."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from celery import Celery

from coordinator.core.errors import ModelNotFoundError
from coordinator.dispatch.app import fleet_of
from coordinator.fleet.registry import Registry
from coordinator.sim.servers.ollama import SimulatedModelServer
from coordinator.sim.servers.openai_api import SimulatedOpenAIServer
from tests.conftest import WorkerFactory, wait_for, wait_for_worker
from worker_tasks.tasks import generate

pytestmark = pytest.mark.e2e

PULL = ("POST", "/api/pull")


def _no_lease_on(registry: Registry, model: str) -> bool:
    return model not in registry.snapshot().leases


def test_a_model_nobody_has_is_pulled_once_by_the_chosen_ollama_worker(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
) -> None:
    servers = {name: fake_server(name, ["llama3.2"], ["llama3.2"]) for name in ("a", "b")}
    workers = {
        name: start_worker(name, tier="gpu", server=server, wait=False)
        for name, server in servers.items()
    }
    for worker in workers.values():
        wait_for_worker(registry, worker)

    first = generate.delay("hi", model="phi3").get(timeout=60)
    puller = first["worker_id"]
    # The next one queues behind the lease on that load rather than pulling a second copy.
    second = generate.delay("again", model="phi3").get(timeout=60)

    assert second["worker_id"] == puller
    assert [servers[n].request_count(*PULL) for n in ("a", "b")].count(1) == 1
    assert sum(server.request_count(*PULL) for server in servers.values()) == 1
    log = workers[puller].log()
    assert "phi3 is on no live worker" in log
    assert "pulling phi3: success" in log
    assert "pulled phi3 in" in log


def test_a_model_no_registry_has_fails_at_once_and_leaves_no_lease(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
) -> None:
    server = fake_server("a", ["llama3.2"], ["llama3.2"], library=frozenset({"llama3.2"}))
    start_worker("a", tier="gpu", server=server)

    result = generate.delay("hi", model="no-such-model")
    with pytest.raises(ModelNotFoundError, match=r"'no-such-model' cannot be pulled"):
        result.get(timeout=60)
    assert "no other live worker has 'no-such-model'" in str(result.result)
    assert "the fleet's vllm models: llama3.2" in str(result.result)
    assert server.request_count(*PULL) == 1
    assert _no_lease_on(registry, "no-such-model")
    # ... nor a claim: the worker does not look busy.
    fleet_of(app).router.claims.flush()
    wait_for(lambda: not any(registry.snapshot().in_flight.values()), 10, "the claim released")


def test_a_server_that_cannot_pull_fails_the_task_at_once_naming_the_fleets_models(
    app: Celery, start_worker: WorkerFactory, registry: Registry
) -> None:
    with SimulatedOpenAIServer("vllm", ["llama3.2", "qwen2.5"]) as server:
        start_worker("v", tier="gpu", server=None, extra_env={"VLLM_URL": server.url})

        result = generate.delay("hi", model="phi3")
        with pytest.raises(ModelNotFoundError, match=r"no other live worker has 'phi3'"):
            result.get(timeout=60)

        assert "the fleet's vllm models: llama3.2, qwen2.5" in str(result.result)
        # At once: one request, no retry.
        assert server.request_count("POST", "/v1/chat/completions") == 1
        assert _no_lease_on(registry, "phi3")
