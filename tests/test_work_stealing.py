"""Work stealing: an idle worker takes waiting tasks from a busy peer's own queue, those it
runs with a model in memory; nothing is lost or run twice, and claims move with messages.

The moves against a real Redis first, then real ``celery worker`` processes."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, cast

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from coordinator.core.settings import CoordinatorSettings, WorkerSettings
from coordinator.core.task_spec import GENERATE, TaskSpec
from coordinator.dispatch.app import fleet_of
from coordinator.fleet.claims import CLAIM_HEADER
from coordinator.fleet.registry import Registry
from coordinator.recovery.stealing import MAX_BATCH, RedisStealing
from coordinator.sim.servers.ollama import SimulatedModelServer
from tests.conftest import WorkerFactory, wait_for, wait_for_worker
from worker_tasks.probes import ProbeResult
from worker_tasks.work_stealing import WorkStealer


def everything(task: str, args: list[Any], kwargs: dict[str, Any], h: Mapping[str, Any]) -> bool:
    return True


def send(
    app: Celery, worker: str, prompt: str, model: str = "llama3.2", **options: Any
) -> AsyncResult[Any]:
    """``generate`` in ``worker``'s own queue with a claim on it, as a router's burst leaves
    it: sent by an app without the router (the fleet's router drops a claim it did not
    give from a message sent to a queue of the caller's choosing)."""
    queue = fleet_of(app).keys.worker_queue(worker)
    options.setdefault("headers", {CLAIM_HEADER: [worker, uuid.uuid4().hex]})
    sender = Celery("sender", broker=app.conf.broker_url, set_as_current=False)
    sender.conf.update(task_serializer="json", accept_content=["json"])
    sent = sender.send_task(GENERATE, [prompt], {"model": model}, queue=queue, **options)
    return app.AsyncResult(sent.id)


def payloads(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The messages of ``queue`` in the order they are consumed (oldest first)."""
    return [json.loads(raw) for raw in reversed(client.lrange(queue, 0, -1))]


def prompts(messages: list[dict[str, Any]]) -> list[str]:
    """Each message's prompt, from its (base64, JSON) body."""
    return [json.loads(base64.b64decode(m["body"]))[0][0] for m in messages]


def thief(registry: Registry, worker_id: str) -> RedisStealing:
    return RedisStealing(registry.client, registry.keys, worker_id)


# --- the moves, on a real Redis ------------------------------------------------------------


def test_a_steal_moves_the_oldest_half_to_the_consuming_end_with_their_claims(
    app: Celery, registry: Registry
) -> None:
    keys, client = registry.keys, registry.client
    for n in range(10):
        send(app, "busy", f"p{n}", headers={CLAIM_HEADER: ["busy", f"c{n}"]})
    # Every claim but the oldest's is written: that one is still in its router's buffer.
    registry.claim_many({"busy": [f"c{n}" for n in range(1, 10)]}, [], keep=0)

    assert thief(registry, "idle").steal("busy", 10, everything) == 5

    stolen = payloads(client, keys.worker_queue("idle"))
    assert prompts(stolen) == ["p0", "p1", "p2", "p3", "p4"]  # popped next, in order
    assert prompts(payloads(client, keys.worker_queue("busy"))) == ["p5", "p6", "p7", "p8", "p9"]
    for n, message in enumerate(stolen):
        assert message["headers"][CLAIM_HEADER] == ["idle", f"c{n}"]
        assert message["properties"]["delivery_info"]["routing_key"] == keys.worker_queue("idle")
    assert set(client.zrange(keys.claims("idle"), 0, -1)) == {f"c{n}" for n in range(5)}
    assert set(client.zrange(keys.claims("busy"), 0, -1)) == {f"c{n}" for n in range(5, 10)}
    # The unwritten claim is tombstoned: its router's batch will not add it to "busy".
    assert client.zscore(keys.released("busy"), "c0") is not None
    registry.claim_many({"busy": ["c0"]}, [], keep=0)
    assert client.zscore(keys.claims("busy"), "c0") is None


def test_only_what_the_thief_runs_now_moves(app: Celery, registry: Registry) -> None:
    keys, client = registry.keys, registry.client
    for n in range(6):
        send(app, "busy", f"p{n}", model="qwen2.5" if n % 2 else "llama3.2")
    send(app, "busy", "later", countdown=60)  # a retry's backoff: not due

    def llama_only(task: str, args: list[Any], kwargs: dict[str, Any], _: Any) -> bool:
        return task == GENERATE and kwargs.get("model") == "llama3.2"

    assert thief(registry, "idle").steal("busy", 7, llama_only) == 3
    assert prompts(payloads(client, keys.worker_queue("idle"))) == ["p0", "p2", "p4"]
    left = prompts(payloads(client, keys.worker_queue("busy")))
    assert left == ["p1", "p3", "p5", "later"]


def test_a_task_its_caller_sent_to_a_queue_stays_there(app: Celery, registry: Registry) -> None:
    queue = fleet_of(app).keys.worker_queue("busy")
    for n in range(4):
        app.send_task(GENERATE, args=[f"p{n}"], kwargs={"model": "llama3.2"}, queue=queue)
    assert thief(registry, "idle").steal("busy", 4, everything) == 0
    assert len(payloads(registry.client, queue)) == 4


def test_a_steal_takes_at_most_a_batch(app: Celery, registry: Registry) -> None:
    for n in range(3 * MAX_BATCH):
        send(app, "busy", f"p{n}")
    assert thief(registry, "idle").steal("busy", 3 * MAX_BATCH, everything) == MAX_BATCH


def test_thieves_and_the_owner_never_take_one_message_twice(
    app: Celery, registry: Registry
) -> None:
    keys, client = registry.keys, registry.client
    total = 300
    for n in range(total):
        send(app, "busy", f"p{n}")
    popped: list[str] = []

    def owner() -> None:  # the busy worker consuming its own queue meanwhile
        while (raw := client.rpop(keys.worker_queue("busy"))) is not None:
            popped.append(json.loads(str(raw))["headers"]["id"])

    def steal(worker_id: str) -> None:
        mover = thief(registry, worker_id)
        while mover.steal("busy", total, everything):
            pass

    threads = [threading.Thread(target=owner)]
    threads += [threading.Thread(target=steal, args=(w,)) for w in ("t1", "t2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    ids = popped + [
        m["headers"]["id"] for w in ("t1", "t2") for m in payloads(client, keys.worker_queue(w))
    ]
    assert len(ids) == total
    assert len(set(ids)) == total


def test_the_board_lists_who_has_a_backlog(app: Celery, registry: Registry) -> None:
    client = registry.client
    busy, idle = thief(registry, "busy"), thief(registry, "idle")
    for n in range(4):
        send(app, "busy", f"p{n}")
    assert busy.look(idle=False).waiting == 4
    found = idle.look(idle=True)
    assert (found.waiting, found.backlogs) == (0, (("busy", 4),))
    client.delete(registry.keys.worker_queue("busy"))  # reaped, say: the post is stale
    assert idle.steal("busy", 4, everything) == 0
    assert idle.look(idle=True).backlogs == ()
    assert not client.exists(registry.keys.backlog)


# --- what a worker takes -------------------------------------------------------------------


def stealer(
    settings: CoordinatorSettings, registry: Registry, probed: ProbeResult, **env: Any
) -> WorkStealer:
    worker = WorkerSettings(**{**settings.model_dump(), "worker_id": "idle", **env})
    specs = {
        GENERATE: TaskSpec("vllm", default_model="llama3.2"),
        "app.count_words": TaskSpec("vllm", model_arg=None),
    }
    return WorkStealer(worker, thief(registry, "idle"), specs, lambda: probed, lambda: 1)


def test_a_worker_takes_only_tasks_it_runs_without_a_cold_load(
    settings: CoordinatorSettings, registry: Registry
) -> None:
    probed = ProbeResult({"vllm": True, "ocr": False}, models_in_memory=("llama3.2:latest",))
    wants = stealer(settings, registry, probed).wanted
    assert wants(GENERATE, ["hi"], {"model": "llama3.2"}, {})
    assert wants(GENERATE, ["hi"], {}, {})  # the default model
    assert not wants(GENERATE, ["hi"], {"model": "qwen2.5"}, {})  # on disk at most
    assert not wants(GENERATE, ["hi"], {"model": "../../etc/passwd"}, {})  # fails where sent
    assert wants("app.count_words", ["hi"], {}, {})  # no model: any worker of the service
    assert not wants("worker_tasks.run_broadcast_job", [], {}, {})  # for its addressee
    assert not wants(GENERATE, ["hi"], {}, {"aiq_excluded": ["idle"]})  # it lacked the model
    down = ProbeResult({"vllm": False}, models_in_memory=("llama3.2",))
    assert not stealer(settings, registry, down).wanted(GENERATE, ["hi"], {}, {})
    other = stealer(settings, registry, probed, worker_capabilities=["ocr"])
    assert not other.wanted(GENERATE, ["hi"], {}, {})


# --- real workers --------------------------------------------------------------------------

TASK_DELAY_S = 0.1


def results_of(sent: list[AsyncResult[Any]]) -> list[dict[str, Any]]:
    wait_for(lambda: all(r.ready() for r in sent), 120.0, "every task to finish")
    assert all(r.successful() for r in sent), [r.result for r in sent if not r.successful()]
    return [cast(dict[str, Any], r.result) for r in sent]


def generated(*servers: SimulatedModelServer) -> Counter[str]:
    return sum((s.prompts for s in servers), Counter())


@pytest.mark.e2e
def test_an_idle_worker_runs_tasks_waiting_for_a_busy_one_and_nothing_runs_twice(
    app: Celery,
    registry: Registry,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
) -> None:
    servers = [fake_server(name, ["llama3.2"], ["llama3.2"]) for name in ("a", "b")]
    for server in servers:
        server.set_fault(delay_s=TASK_DELAY_S)
    workers = [
        start_worker(name, tier="cpu", server=server, wait=False)
        for name, server in zip(("a", "b"), servers, strict=True)
    ]
    for worker in workers:
        wait_for_worker(registry, worker)
    total = 40
    claims = [f"claim-{n}" for n in range(total)]
    sent = [
        send(app, "a", f"task {n}", headers={CLAIM_HEADER: ["a", claims[n]]}) for n in range(total)
    ]
    registry.claim_many({"a": claims}, [], keep=0)  # as the router would have

    ran = Counter(result["worker_id"] for result in results_of(sent))
    assert ran["b"] > 0, "b never stole"
    assert ran["a"] + ran["b"] == total
    assert generated(*servers) == Counter({f"task {n}": 1 for n in range(total)})
    # Every claim was released where it had moved: nothing counts against either worker.
    keys = registry.keys
    wait_for(
        lambda: (
            registry.client.zcard(keys.claims("a")) + registry.client.zcard(keys.claims("b")) == 0
        ),
        what="every claim released",
    )
    assert "took" in workers[1].log()


@pytest.mark.e2e
def test_a_worker_steals_only_tasks_whose_model_it_has_in_memory(
    app: Celery,
    registry: Registry,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
) -> None:
    both = ["llama3.2", "qwen2.5"]
    busy = fake_server("busy", both, ["llama3.2", "qwen2.5"])
    idle = fake_server("idle", both, ["qwen2.5"])  # llama3.2 only on disk: a cold load
    for server in (busy, idle):
        server.set_fault(delay_s=TASK_DELAY_S)
    workers = [
        start_worker("busy", tier="cpu", server=busy, wait=False),
        start_worker("idle", tier="cpu", server=idle, wait=False),
    ]
    for worker in workers:
        wait_for_worker(registry, worker)
    models = ["qwen2.5" if n % 3 == 0 else "llama3.2" for n in range(30)]
    sent = [send(app, "busy", f"task {n}", model=m) for n, m in enumerate(models)]

    results = results_of(sent)
    on_idle = [r["model"] for r in results if r["worker_id"] == "idle"]
    assert on_idle, "the idle worker stole none of the tasks it could run"
    assert set(on_idle) == {"qwen2.5"}
    assert "llama3.2" not in idle.requested_models("/api/generate")
    assert "llama3.2" not in idle.loaded_models()
    assert generated(busy, idle) == Counter({f"task {n}": 1 for n in range(30)})


@pytest.mark.e2e
def test_with_work_stealing_off_a_worker_leaves_its_peers_queue_alone(
    app: Celery,
    registry: Registry,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    settings: CoordinatorSettings,
) -> None:
    servers = [fake_server(name, ["llama3.2"], ["llama3.2"]) for name in ("a", "b")]
    servers[0].set_fault(delay_s=TASK_DELAY_S)
    off = {"WORK_STEALING": "false"}
    workers = [
        start_worker(name, tier="cpu", server=server, wait=False, extra_env=off)
        for name, server in zip(("a", "b"), servers, strict=True)
    ]
    for worker in workers:
        wait_for_worker(registry, worker)
    sent = [send(app, "a", f"task {n}") for n in range(10)]
    assert {r["worker_id"] for r in results_of(sent)} == {"a"}
    assert not registry.client.exists(settings.keys.backlog)
