"""End to end: real ``celery worker`` subprocesses, each with its own fake model server."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from celery import Celery, chain, group

from coordinator.core.errors import ServiceError
from coordinator.core.settings import CoordinatorSettings
from coordinator.dispatch.app import fleet_of
from coordinator.fleet.registry import Registry
from coordinator.sim.servers.ollama import SimulatedModelServer
from tests.conftest import WorkerFactory, WorkerProcess, wait_for, wait_for_worker
from worker_tasks.tasks import embed, generate, ocr

pytestmark = pytest.mark.e2e
RESULT_TIMEOUT_S = 30.0
IMAGE = base64.b64encode(b"\x89PNG fake image bytes").decode()


@dataclass
class Fleet:
    ocr_gpu: WorkerProcess
    vllm_gpu: WorkerProcess
    cpu: WorkerProcess
    servers: dict[str, SimulatedModelServer]


@pytest.fixture
def fleet(
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
) -> Fleet:
    """The issue's fleet: an OCR GPU worker, a vLLM GPU worker and a CPU worker."""
    servers = {
        "ocr-gpu": fake_server("ocr-gpu", ["llama-vision", "nomic-embed-text"], ["llama-vision"]),
        "vllm-gpu": fake_server("vllm-gpu", ["llama3.2", "nomic-embed-text"], ["llama3.2"]),
        "cpu": fake_server("cpu", ["nomic-embed-text"]),
    }
    # Started together, waited for together: start-up dominates the suite's time.
    ocr_gpu, vllm_gpu, cpu = workers = [
        start_worker(
            "ocr-gpu", tier="gpu", specialization="ocr", server=servers["ocr-gpu"], wait=False
        ),
        start_worker(
            "vllm-gpu", tier="gpu", specialization="vllm", server=servers["vllm-gpu"], wait=False
        ),
        start_worker("cpu", tier="cpu", server=servers["cpu"], wait=False),
    ]
    for worker in workers:
        wait_for_worker(registry, worker)
    return Fleet(ocr_gpu, vllm_gpu, cpu, servers=servers)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
def test_each_task_runs_on_the_worker_that_has_its_model(
    app: Celery, fleet: Fleet, registry: Registry
) -> None:
    ocr_result = ocr.apply_async(args=(IMAGE,))
    gen_result = generate.apply_async(args=("hello",), kwargs={"model": "llama3.2"})
    embed_result = embed.apply_async(args=(["a", "b"],))

    read = ocr_result.get(timeout=RESULT_TIMEOUT_S)
    assert read["worker_id"] == "ocr-gpu"
    assert read["text"].startswith("[ocr-gpu] llama-vision:")
    assert ocr_result.worker is not None
    assert ocr_result.worker.startswith("ocr-gpu@")

    answer = gen_result.get(timeout=RESULT_TIMEOUT_S)
    assert answer["worker_id"] == "vllm-gpu"
    assert answer["response"] == "[vllm-gpu] llama3.2: hello"
    # No other server was asked to load the model: nothing was loaded twice.
    assert fleet.servers["ocr-gpu"].requested_models("/api/generate") == ["llama-vision"]

    vectors = embed_result.get(timeout=RESULT_TIMEOUT_S)
    assert len(vectors["embeddings"]) == 2
    assert vectors["worker_id"] in {"ocr-gpu", "vllm-gpu", "cpu"}

    # Each worker released exactly what the router counted against it.
    fleet_of(app).router.claims.flush()
    wait_for(lambda: registry.snapshot().in_flight == {}, 10.0, "in-flight counts to drain")


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
def test_groups_and_chain_links_are_routed_too(app: Celery, fleet: Fleet) -> None:
    """Group members are routed by the sender; chain links inside the worker."""
    ocr_results = group(ocr.s(IMAGE) for _ in range(3)).apply_async().get(timeout=RESULT_TIMEOUT_S)
    assert {r["worker_id"] for r in ocr_results} == {"ocr-gpu"}
    linked = chain(ocr.si(IMAGE), generate.si("next", model="llama3.2")).apply_async()
    assert linked.get(timeout=RESULT_TIMEOUT_S)["worker_id"] == "vllm-gpu"


def test_a_killed_worker_leaves_routing_within_its_ttl(
    app: Celery, fleet: Fleet, registry: Registry, settings: CoordinatorSettings
) -> None:
    fleet.vllm_gpu.kill()
    killed_at = time.monotonic()
    wait_for(
        lambda: "vllm-gpu" not in {hb.worker_id for hb in registry.live_workers()},
        settings.ttl_s + 2.0,
        "the killed worker to leave the registry",
    )
    assert time.monotonic() - killed_at <= settings.ttl_s + 2.0
    # With llama3.2 nowhere else, generation goes to another capable worker, never the dead
    # one, which pulls the model (a simulated Ollama pulls any name).
    router = fleet_of(app).router
    router.refresh_s = 0.0  # read the registry afresh instead of the router's snapshot
    answer = generate.apply_async(args=("still there?",), kwargs={"model": "llama3.2"})
    assert answer.get(timeout=RESULT_TIMEOUT_S)["worker_id"] != "vllm-gpu"


def test_a_clean_shutdown_deregisters_at_once(
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
    settings: CoordinatorSettings,
) -> None:
    worker = start_worker("short-lived", tier="cpu", server=fake_server("s", ["llama3.2"]))
    assert worker.stop() == 0
    # Deleted on shutdown, not left to expire: gone as soon as the process is.
    assert "short-lived" not in {hb.worker_id for hb in registry.live_workers()}


def test_heartbeats_keep_flowing_while_the_solo_pool_runs_a_long_task(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
    settings: CoordinatorSettings,
) -> None:
    server = fake_server("slow", ["llama3.2"], ["llama3.2"])
    start_worker("slow", tier="gpu", server=server)
    long_s = settings.ttl_s * 2
    server.set_fault(delay_s=long_s)  # the task takes twice the heartbeat TTL
    result = generate.apply_async(args=("take your time",))
    wait_for(
        lambda: any(hb.active_requests == 1 for hb in registry.live_workers()),
        10.0,
        "a heartbeat that reports the running task",
    )
    seen: set[float] = set()
    deadline = time.monotonic() + long_s * 0.75
    while time.monotonic() < deadline:
        live = {hb.worker_id: hb for hb in registry.live_workers()}
        assert "slow" in live, "the worker dropped out while busy"
        seen.add(live["slow"].timestamp or 0.0)
        time.sleep(0.1)
    assert len(seen) >= 2, "no fresh heartbeat while the task ran"
    server.set_fault()
    assert result.get(timeout=RESULT_TIMEOUT_S)["worker_id"] == "slow"


def test_operator_queues_given_with_dash_q_win(
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    settings: CoordinatorSettings,
) -> None:
    only = f"{settings.namespace}.hand-picked"
    worker = start_worker("picky", tier="cpu", server=fake_server("p", ["x"]), args=["-Q", only])
    log = worker.log()
    consumed = log.split(") consumes ", 1)[1].split("\n", 1)[0].split(",")
    # Only the operator's queue, plus the control subscription every worker keeps.
    assert [q for q in consumed if not q.startswith("bcast.")] == [only]
    assert settings.keys.worker_queue("picky") in log  # the warning names the unconsumed queue


def test_unreachable_model_services_are_reported_unhealthy_not_fatal(
    app: Celery, start_worker: WorkerFactory, registry: Registry
) -> None:
    worker = start_worker(
        "orphan", tier="cpu", server=None, extra_env={"WORKER_CAPABILITIES": "vllm,embeddings"}
    )
    (heartbeat,) = registry.live_workers()
    assert heartbeat.status == "unhealthy"
    assert heartbeat.services_status == {"vllm": "unhealthy", "embeddings": "unhealthy"}
    assert heartbeat.capabilities == ("vllm", "embeddings")
    # Which URL, from which setting, and why: in the heartbeat (so `coordinator workers`
    # shows it) and once in the worker's log.
    why = heartbeat.service_errors["vllm"]
    assert re.fullmatch(r"OLLAMA_URL http://127\.0\.0\.1:\d+: ConnectError: .*refused.*", why)
    assert heartbeat.service_errors["embeddings"].startswith("EMBEDDINGS_URL http://127.0.0.1:")
    assert worker.log().count(f"vllm is down: {why}") == 1


@pytest.mark.parametrize(
    ("variable", "value"),
    [("WORKER_TIER", "tpu"), ("HEARTBEAT_INTERVAL_S", "soon"), ("WORKER_ID", "has space")],
)
def test_a_bad_setting_stops_the_worker_with_a_message_naming_it(
    start_worker: WorkerFactory, variable: str, value: str
) -> None:
    worker = start_worker(
        "bad-config", tier="cpu", server=None, extra_env={variable: value}, wait=False
    )
    assert worker.proc.wait(timeout=60) != 0
    log = worker.log()
    assert variable in log, log[-2000:]
    assert repr(value) in log, log[-2000:]


def test_a_model_service_error_fails_the_task_with_its_reason(
    app: Celery, start_worker: WorkerFactory, fake_server: Callable[..., SimulatedModelServer]
) -> None:
    # A server whose library has no such model: it cannot be pulled either.
    server = fake_server("plain", ["llama3.2"], library=frozenset({"llama3.2"}))
    start_worker("plain", tier="cpu", server=server)
    result = generate.apply_async(args=("hi",), kwargs={"model": "no-such-model"})
    with pytest.raises(ServiceError, match="no-such-model"):
        result.get(timeout=RESULT_TIMEOUT_S)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
def test_a_transient_service_failure_is_retried_on_another_worker(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
) -> None:
    failing = fake_server("failing", ["llama3.2"], ["llama3.2"])
    healthy = fake_server("healthy", ["llama3.2"])
    start_worker("first-choice", tier="gpu", specialization="vllm", server=failing)
    start_worker("fallback", tier="cpu", server=healthy)
    failing.set_fault(fail_with=503)
    wait_for(
        lambda: any(
            hb.worker_id == "first-choice" and hb.services_status.get("vllm") == "unhealthy"
            for hb in registry.live_workers()
        ),
        10.0,
        "the failing service to be reported unhealthy",
    )
    # The first attempt is sent to the failing worker by hand; the retries are routed, and
    # the router, seeing that worker's service unhealthy, sends them elsewhere.
    first_queue = registry.keys.worker_queue("first-choice")
    result = generate.apply_async(
        args=("retry me",), kwargs={"model": "llama3.2"}, queue=first_queue
    )
    answer = result.get(timeout=RESULT_TIMEOUT_S)
    assert answer["worker_id"] == "fallback"
    assert answer["response"] == "[healthy] llama3.2: retry me"
    assert failing.request_count("POST", "/api/generate") >= 1
    # The explicit first send was never counted; the retry's claim was released.
    fleet_of(app).router.claims.flush()
    wait_for(lambda: registry.snapshot().in_flight == {}, 10.0, "in-flight counts to drain")
