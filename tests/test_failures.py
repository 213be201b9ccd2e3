"""Nothing lost: dead workers, a dying reaper, Redis restarts, pickles, passwords.

Real worker processes killed with SIGKILL, real Redis servers stopped and restarted."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Exchange, Producer

from coordinator.broadcast.client import broadcast_async
from coordinator.broadcast.rag import chroma_client
from coordinator.core.settings import CoordinatorSettings
from coordinator.dispatch.app import create_app, fleet_of
from coordinator.fleet.registry import Registry, redis_client
from coordinator.recovery.reaper import Reaper
from coordinator.sim.servers.ollama import SimulatedModelServer
from tests.conftest import PrivateRedis, WorkerFactory, queued, wait_for, wait_for_worker
from worker_tasks.tasks import generate

pytestmark = pytest.mark.e2e
QUEUED = 50
UNTRUSTED = "pickle"  # what an attacker with write access to Redis would send


def generate_requests(*servers: SimulatedModelServer) -> int:
    return sum(s.request_count("POST", "/api/generate") for s in servers)


def on_private_redis(
    private_redis: Callable[..., PrivateRedis], settings: CoordinatorSettings, main: str
) -> tuple[PrivateRedis, CoordinatorSettings, Celery]:
    """A Redis of this test's own (persisted, so it can restart), its settings and app."""
    server = private_redis(persist=True)
    local = settings.model_copy(update={"redis_url": server.url})
    return server, local, create_app(local, main=main)


def fleet_with_a_victim(
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
) -> tuple[Any, SimulatedModelServer, list[SimulatedModelServer]]:
    victim_server = fake_server("victim", ["llama3.2"], ["llama3.2"])
    others = [fake_server(f"o{n}", ["llama3.2"], ["llama3.2"]) for n in (1, 2)]
    victim = start_worker("victim", tier="gpu", server=victim_server, wait=False)
    helpers = [
        start_worker(f"other-{n}", tier="cpu", server=server, wait=False)
        for n, server in enumerate(others, 1)
    ]
    for worker in (victim, *helpers):
        wait_for_worker(registry, worker)
    return victim, victim_server, others


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
def test_kill_9_mid_task_loses_nothing(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
    reaper_thread: Reaper,
    settings: CoordinatorSettings,
) -> None:
    victim, victim_server, others = fleet_with_a_victim(start_worker, fake_server, registry)
    victim_server.set_fault(delay_s=120)  # the first task hangs in the model call
    queue = registry.keys.worker_queue("victim")
    results = [
        generate.apply_async(args=(f"task {n}",), kwargs={"model": "llama3.2"}, queue=queue)
        for n in range(QUEUED + 1)
    ]
    wait_for(lambda: victim_server.request_count("POST", "/api/generate") == 1, 20, "a task to run")
    # All wait but the running one (and on RabbitMQ one prefetched, unacknowledged).
    assert queued(app, queue) >= QUEUED - 1

    killed_at = time.monotonic()
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(timeout=10)
    # With the reaper's defaults, its queued tasks run elsewhere within its TTL + 2 s.
    wait_for(lambda: generate_requests(*others) > 0, settings.ttl_s + 2.0, "work moved")
    answers = [r.get(timeout=60) for r in results]
    elapsed = time.monotonic() - killed_at
    print(f"\nkill -9 to last of {len(results)} completions: {elapsed:.1f} s")

    assert {a["worker_id"] for a in answers} <= {"other-1", "other-2"}
    assert sorted(a["response"].split(": ", 1)[1] for a in answers) == sorted(
        f"task {n}" for n in range(QUEUED + 1)
    )
    # Each ran once on the others; only the one that was running may have run twice.
    assert generate_requests(*others) == QUEUED + 1
    assert queued(app, queue) == 0
    assert "victim" not in registry.known_workers()


def _reap_slowly(settings: CoordinatorSettings, ready: Any) -> None:
    import worker_tasks.tasks  # noqa: F401  (registers the tasks in this spawned process)

    app = create_app(settings, main="doomed-reaper")
    reaper = Reaper(app, grace_s=0.0, move_delay_s=0.05)
    ready.set()
    while True:
        reaper.scan()


def test_a_reaper_killed_halfway_loses_and_doubles_nothing(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
    settings: CoordinatorSettings,
) -> None:
    victim, victim_server, others = fleet_with_a_victim(start_worker, fake_server, registry)
    queue = registry.keys.worker_queue("victim")
    victim.stop()  # stop consuming; what is sent now waits in its queue
    registry.client.hset(registry.keys.known, "victim", "{}")  # as if it had crashed
    results = [
        generate.apply_async(args=(f"task {n}",), kwargs={"model": "llama3.2"}, queue=queue)
        for n in range(QUEUED)
    ]
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    doomed = ctx.Process(target=_reap_slowly, args=(settings, ready))
    doomed.start()
    ready.wait(30)
    wait_for(lambda: registry.client.llen(queue) <= QUEUED - 10, 30, "the reaper to move some")
    assert doomed.pid is not None
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join(10)
    left = registry.client.llen(queue)
    assert 0 < left < QUEUED, "the reaper was to die halfway"

    Reaper(app, grace_s=0.0).scan()  # a new reaper finishes the job
    answers = [r.get(timeout=60) for r in results]
    assert sorted(a["response"].split(": ", 1)[1] for a in answers) == sorted(
        f"task {n}" for n in range(QUEUED)
    )
    assert generate_requests(*others) == QUEUED  # none lost, none doubled
    assert generate_requests(victim_server) == 0


def test_a_redis_restart_under_a_running_fleet(
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    private_redis: Callable[..., PrivateRedis],
    settings: CoordinatorSettings,
) -> None:
    server, local, app = on_private_redis(private_redis, settings, "restart")
    registry = fleet_of(app).registry
    model = fake_server("m", ["llama3.2"], ["llama3.2"])
    workers = [
        start_worker(w, tier="cpu", server=model, wait=False, extra_env={"REDIS_URL": server.url})
        for w in ("r-1", "r-2")
    ]
    for worker in workers:
        wait_for_worker(registry, worker)
    reaper = Reaper(app)
    assert reaper.scan() == []

    server.stop()
    assert reaper.scan() == []  # Redis away: no judgement
    time.sleep(local.ttl_s + 0.5)  # long enough for every heartbeat to expire
    server.start()
    # The heartbeats' TTLs ran out while Redis was down, yet nobody is declared dead:
    # the workers re-register within the TTL the reaper gives them once Redis is back.
    for _ in range(int(local.ttl_s / 0.1)):
        assert reaper.scan() == []
        time.sleep(0.1)
    wait_for(
        lambda: {hb.worker_id for hb in registry.live_workers()} == {"r-1", "r-2"},
        local.heartbeat_interval_s + 15,
        "both workers to re-register",
    )
    assert reaper.scan() == []
    assert app.tasks["worker_tasks.generate"].delay("after").get(timeout=30)["response"]
    fleet_of(app).close()


def test_a_pickled_task_is_refused(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    settings: CoordinatorSettings,
) -> None:
    model = fake_server("p", ["llama3.2"], ["llama3.2"])
    worker = start_worker("careful", tier="cpu", server=model)
    queue = settings.keys.worker_queue("careful")
    headers = {"lang": "py", "task": "worker_tasks.generate", "id": "pickled-1", "retries": 0}
    with Connection(settings.redis_url) as conn:
        producer = Producer(conn.channel(), exchange=Exchange(queue, type="direct"))
        producer.publish(
            ((), {"prompt": "pwned", "model": "llama3.2"}, {}),
            routing_key=queue,
            serializer=UNTRUSTED,
            headers=headers,
        )
    wait_for(lambda: "pickle" in worker.log(), 20, "the worker to refuse the pickle")
    assert generate_requests(model) == 0
    assert generate.apply_async(args=("json is fine",), queue=queue).get(timeout=30)
    assert generate_requests(model) == 1


def test_a_password_protected_redis_works_and_never_shows_the_password(
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    private_redis: Callable[..., PrivateRedis],
    settings: CoordinatorSettings,
) -> None:
    secret = "s3cret-pa55"  # noqa: S105 - a test server's password
    server = private_redis(password=secret)
    local = settings.model_copy(update={"redis_url": server.url})
    app = create_app(local, main="locked")
    worker = start_worker(
        "locked",
        tier="cpu",
        server=fake_server("l", ["llama3.2"], ["llama3.2"]),
        wait=False,
        extra_env={"REDIS_URL": server.url},
    )
    wait_for_worker(fleet_of(app).registry, worker)
    assert app.tasks["worker_tasks.generate"].delay("hi").get(timeout=30)["worker_id"] == "locked"
    assert secret not in worker.log()
    decisions = fleet_of(app).registry.recent_decisions(10)
    assert all(secret not in json.dumps(d) for d in decisions)
    wrong = redis_client(server.url.replace(secret, "wrong"), 1.0)
    with pytest.raises(Exception, match=r"(?i)auth|password"):
        wrong.ping()
    fleet_of(app).close()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
def test_a_dead_workers_broadcast_shard_moves_and_its_replicated_job_is_dropped(
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
    settings: CoordinatorSettings,
    chroma_url: str,
) -> None:
    local = settings.model_copy(update={"chromadb_url": chroma_url})
    app = create_app(local, main="bcast-reap")
    env = {"CHROMADB_URL": chroma_url}
    victim_server = fake_server("v", ["nomic-embed-text", "llama3.2"])
    victim = start_worker("victim", tier="cpu", server=victim_server, extra_env=env, wait=False)
    alive = start_worker(
        "alive", tier="cpu", server=fake_server("a", ["nomic-embed-text"]), extra_env=env
    )
    wait_for_worker(registry, victim)
    del alive
    # The victim is stuck in a long task, so both broadcasts' messages wait in its queue.
    victim_server.set_fault(delay_s=120)
    generate.apply_async(args=("stuck",), queue=registry.keys.worker_queue("victim"))
    wait_for(lambda: victim_server.request_count("POST", "/api/generate") == 1, 20, "the hang")
    documents = [{"id": f"d{n}", "text": f"document number {n}"} for n in range(10)]
    collection = f"c-{settings.namespace}"
    ingest = broadcast_async(
        "rag_ingestion", {"documents": documents, "collection": collection}, timeout_s=40, app=app
    )
    ping = broadcast_async("ping", {}, timeout_s=8, app=app)
    assert sorted(ingest.recipients) == sorted(ping.recipients) == ["alive", "victim"]

    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(timeout=10)
    wait_for(lambda: "victim" not in {h.worker_id for h in registry.live_workers()}, 10, "expiry")
    report = next(r for r in Reaper(app, grace_s=0.0).scan() if r.worker_id == "victim")
    assert len(report.dropped) == 1  # the replicated ping
    assert sum(report.moved.values()) == 2  # the stuck generate and the shard

    ingested = ingest.wait()
    assert ingested.aggregated["documents"] == len(documents)
    assert chroma_client(chroma_url).get_collection(collection).count() == len(documents)
    pinged = ping.wait()
    assert {w.worker_id: w.status for w in pinged.workers} == {
        "alive": "accepted",
        "victim": "timeout",
    }
    fleet_of(app).close()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
def test_a_worker_restarted_under_its_id_runs_what_its_last_run_left_unfinished(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
    settings: CoordinatorSettings,
) -> None:
    server = fake_server("m", ["llama3.2"], ["llama3.2"])
    first = start_worker("phoenix", tier="gpu", server=server)
    before = next(hb for hb in registry.live_workers() if hb.worker_id == "phoenix")
    server.set_fault(delay_s=120)  # the task hangs in the model call
    result = generate.delay("unfinished", model="llama3.2")
    wait_for(lambda: server.request_count("POST", "/api/generate") == 1, 20, "the task to run")
    first.kill()  # SIGKILL: the message stays unacknowledged
    server.set_fault(delay_s=0.0)

    # Back within its TTL: the reaper never sees it dead; the new run runs the message (on
    # Redis it takes it back itself; RabbitMQ returned it when the connection died).
    again = start_worker("phoenix", tier="gpu", server=server)
    assert result.get(timeout=30)["worker_id"] == "phoenix"
    after = next(hb for hb in registry.live_workers() if hb.worker_id == "phoenix")
    assert after.incarnation not in (None, before.incarnation)
    if settings.broker_is_redis:
        assert "1 message(s) the previous run took and never finished: requeued" in again.log()
        wait_for(lambda: registry.client.hlen(registry.keys.unacked) == 0, 10, "the ack")


def test_a_redis_url_with_a_password_query_stops_the_worker_with_the_clis_message(
    start_worker: WorkerFactory, settings: CoordinatorSettings
) -> None:
    url = settings.redis_url + "?password=s3cret"
    worker = start_worker("w", tier="cpu", server=None, wait=False, extra_env={"REDIS_URL": url})
    assert worker.proc.wait(timeout=60) != 0
    log = worker.log()
    assert "worker cannot start: invalid configuration: REDIS_URL=" in log
    assert "credentials go in the URL's user part" in log
    assert "s3cret" not in log


def test_a_result_written_while_redis_restarts_is_retried_not_lost(
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    private_redis: Callable[..., PrivateRedis],
    settings: CoordinatorSettings,
) -> None:
    server, _, app = on_private_redis(private_redis, settings, "result-retry")
    model = fake_server("m", ["llama3.2"], ["llama3.2"])
    start_worker("w", tier="gpu", server=model, extra_env={"REDIS_URL": server.url}, wait=False)
    wait_for(lambda: fleet_of(app).registry.live_workers(), 60, "the worker")
    model.set_fault(delay_s=2.0)
    result = app.tasks["worker_tasks.generate"].delay("during the restart", model="llama3.2")
    wait_for(lambda: model.request_count("POST", "/api/generate") == 1, 20, "the task to run")
    server.stop()  # down when the answer comes back and the result is written
    time.sleep(3.0)  # the model call ends while Redis is away
    server.start()
    assert result.get(timeout=60)["response"].endswith("during the restart")
    assert model.request_count("POST", "/api/generate") == 1
    fleet_of(app).close()


def test_results_expire_after_result_expires_s(settings: CoordinatorSettings) -> None:
    app = create_app(settings.model_copy(update={"result_expires_s": 120.0}), main="expiry")
    app.backend.store_result("some-task-id", {"ok": True}, "SUCCESS")
    client = fleet_of(app).registry.client
    key = f"{settings.namespace}:celery-task-meta-some-task-id"
    assert 110 <= client.ttl(key) <= 120
    client.delete(key)
