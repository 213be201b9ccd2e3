"""Broadcast jobs end to end: real worker subprocesses, fake model servers, a real ChromaDB."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from coordinator.broadcast.client import broadcast, broadcast_async, send_control
from coordinator.broadcast.rag import chroma_client, search
from coordinator.core.errors import JobError, ServiceUnreachableError
from coordinator.core.settings import CoordinatorSettings
from coordinator.dispatch.app import create_app, fleet_of
from coordinator.fleet.registry import Registry
from coordinator.sim.servers.ollama import SimulatedModelServer
from tests.conftest import WorkerFactory, WorkerProcess, free_port, wait_for, wait_for_worker

pytestmark = pytest.mark.e2e
EMBED_MODEL = "nomic-embed-text"


def start_all(
    start_worker: WorkerFactory, registry: Registry, *specs: dict[str, object]
) -> dict[str, WorkerProcess]:
    """Start several workers at once and wait until every one heartbeats."""
    workers = [start_worker(**spec, wait=False) for spec in specs]
    for worker in workers:
        wait_for_worker(registry, worker)
    return {worker.worker_id: worker for worker in workers}


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
def test_ping_reaches_exactly_the_capable_live_workers(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
) -> None:
    server = fake_server("shared", [EMBED_MODEL, "llama3.2"])
    start_all(
        start_worker,
        registry,
        {"worker_id": "gpu-a", "tier": "gpu", "server": server},
        {"worker_id": "cpu-b", "tier": "cpu", "server": server},
        {"worker_id": "store-c", "tier": "storage", "server": server},
        {
            "worker_id": "gpu-d",
            "tier": "gpu",
            "server": server,
            "extra_env": {"WORKER_CAPABILITIES": "vllm"},
        },
    )
    result = broadcast("ping", {}, required_capability="embeddings", timeout_s=30, app=app)
    assert sorted(w.worker_id for w in result.workers) == ["cpu-b", "gpu-a"]
    assert (result.broadcasted_to, result.successful, result.failed) == (2, 2, 0)
    assert {(w.status, w.status_code) for w in result.workers} == {("accepted", 200)}
    assert all(w.result == {"pong": True} for w in result.workers)
    # Without a capability every GPU and CPU worker receives it; storage never does.
    everyone = broadcast("ping", {}, timeout_s=30, app=app)
    assert sorted(w.worker_id for w in everyone.workers) == ["cpu-b", "gpu-a", "gpu-d"]


def test_unknown_job_types_and_bad_data_fail_before_anything_is_sent(
    app: Celery, registry: Registry, redis_conn: redis.Redis, settings: CoordinatorSettings
) -> None:
    with pytest.raises(JobError, match=r"unknown job type 'nope'.*rag_ingestion"):
        broadcast("nope", {}, app=app)
    with pytest.raises(JobError, match="chunk_overlap"):
        broadcast(
            "rag_ingestion",
            {"documents": [], "collection": "manuals", "chunk_size": 64, "chunk_overlap": 64},
            app=app,
        )
    with pytest.raises(JobError, match="no live GPU or CPU worker"):
        broadcast("ping", {}, app=app)
    assert list(redis_conn.scan_iter(match=f"{settings.namespace}.*")) == []


def test_a_failing_worker_is_reported_and_the_others_still_aggregate(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
) -> None:
    good_a, good_b = fake_server("good-a", ["llama3.2"]), fake_server("good-b", [])
    broken = fake_server("broken", ["llama3.2"])
    start_all(
        start_worker,
        registry,
        {"worker_id": "good-a", "tier": "gpu", "server": good_a},
        {"worker_id": "good-b", "tier": "cpu", "server": good_b},
        {"worker_id": "broken", "tier": "gpu", "server": broken},
    )
    broken.set_fault(fail_with=500)
    result = broadcast("warm_model", {"model": "llama3.2"}, timeout_s=30, app=app)
    by_worker = {w.worker_id: w for w in result.workers}
    assert by_worker["broken"].status == "failed"
    assert "500" in (by_worker["broken"].error or "")
    assert (result.successful, result.failed) == (2, 1)
    assert by_worker["good-a"].result == {"model": "llama3.2", "pulled": False, "loaded": True}
    assert by_worker["good-b"].result == {"model": "llama3.2", "pulled": True, "loaded": True}
    assert "llama3.2" in good_b.loaded_models()
    # The warmed workers say so in their heartbeats, so routing finds the model loaded.
    wait_for(
        lambda: all(
            "llama3.2" in hb.models_in_memory
            for hb in registry.live_workers()
            if hb.worker_id in {"good-a", "good-b"}
        ),
        10.0,
        "heartbeats that report the warmed model",
    )


def test_a_killed_worker_is_reported_timeout_and_the_call_returns(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
) -> None:
    server = fake_server("s", ["llama3.2"])
    ttl = {"HEARTBEAT_INTERVAL_S": "10", "HEARTBEAT_TTL_S": "60"}  # still listed when killed
    workers = start_all(
        start_worker,
        registry,
        {"worker_id": "alive", "tier": "gpu", "server": server},
        {"worker_id": "doomed", "tier": "cpu", "server": server, "extra_env": ttl},
    )
    workers["doomed"].kill()
    started = time.monotonic()
    result = broadcast("ping", {}, timeout_s=4, app=app)
    elapsed = time.monotonic() - started
    statuses = {w.worker_id: w.status for w in result.workers}
    assert statuses == {"alive": "accepted", "doomed": "timeout"}
    assert next(w for w in result.workers if w.worker_id == "doomed").status_code == 504
    assert elapsed < 4 + 2.0


CORPUS = {
    "pump-manual": "The pump must be primed before the first start. Open the bleed valve "
    "and fill the housing with water until it overflows, then close the valve.",
    "boiler-safety": "Never open the boiler door while the pressure gauge reads above zero. "
    "Let the unit cool for thirty minutes and vent it first.",
    "filter-change": "Replace the intake filter every three months. A clogged filter raises "
    "the motor temperature and shortens its life.",
    "warranty": "The warranty covers parts and labour for two years from the date of "
    "purchase, provided the unit was installed by a certified technician.",
    "long-guide": " ".join(f"Step {n}: check valve {n} and record its reading." for n in range(40)),
    "torque-note": "Torque the lid bolts to 12 Nm.",
    "empty-doc": "   ",
}


@pytest.fixture
def rag_app(settings: CoordinatorSettings, chroma_url: str) -> Iterator[Celery]:
    """The test app, pointed at the session's ChromaDB."""
    app = create_app(settings.model_copy(update={"chromadb_url": chroma_url}), main="rag")
    yield app
    fleet_of(app).close()


def test_rag_ingestion_stores_every_chunk_once_and_is_idempotent(
    rag_app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
    settings: CoordinatorSettings,
    chroma_url: str,
) -> None:
    env = {"CHROMADB_URL": chroma_url}
    start_all(
        start_worker,
        registry,
        *(
            {
                "worker_id": f"ingest-{n}",
                "tier": "cpu",
                "server": fake_server(f"e{n}", [EMBED_MODEL]),
                "extra_env": env,
            }
            for n in range(3)
        ),
    )
    collection = f"c-{settings.namespace}"
    job = {
        "documents": [
            {"id": doc_id, "text": text, "metadata": {"source": "test"}}
            for doc_id, text in CORPUS.items()
        ],
        "collection": collection,
        "chunk_size": 120,
        "chunk_overlap": 20,
    }
    first = broadcast("rag_ingestion", job, timeout_s=60, app=rag_app)
    assert first.successful == 3
    assert first.aggregated["documents"] == len(CORPUS) - 1
    (failure,) = first.aggregated["failed_documents"]
    assert (failure["id"], failure["error"]) == ("empty-doc", "empty text")
    assert failure["worker_id"] in {"ingest-0", "ingest-1", "ingest-2"}

    stored = chroma_client(chroma_url).get_collection(collection).get(include=["metadatas"])
    ids, metas = stored["ids"], stored["metadatas"] or []
    assert len(ids) == len(set(ids)) == first.aggregated["chunks"]
    # Each document was ingested by exactly one worker: the shards were disjoint.
    owners: dict[str, set[str]] = {}
    for meta in metas:
        owners.setdefault(str(meta["document_id"]), set()).add(str(meta["ingested_by"]))
    assert set(owners) == set(CORPUS) - {"empty-doc"}
    assert all(len(workers) == 1 for workers in owners.values())
    assert len({w for ws in owners.values() for w in ws}) == 3

    second = broadcast("rag_ingestion", job, timeout_s=60, app=rag_app)
    again = chroma_client(chroma_url).get_collection(collection).get()
    assert sorted(again["ids"]) == sorted(ids)
    assert second.aggregated["chunks"] == first.aggregated["chunks"]

    # The fake embedder hashes text, so only an identical chunk is near: the query is the
    # one-chunk note, embedded by the fleet like any embed task.
    hits = search(collection, CORPUS["torque-note"], n_results=2, app=rag_app)
    assert hits[0]["document_id"] == "torque-note"
    assert hits[0]["distance"] == pytest.approx(0.0, abs=1e-4)


def test_a_storage_worker_serves_chromadb_and_takes_no_jobs(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
    tmp_path: Path,
) -> None:
    port = free_port()
    server = fake_server("s", ["llama3.2"])
    workers = start_all(
        start_worker,
        registry,
        {
            "worker_id": "store",
            "tier": "storage",
            "server": server,
            "extra_env": {
                "ENABLE_CHROMADB": "true",
                "CHROMADB_PATH": str(tmp_path / "chroma"),
                "CHROMADB_HOST": "127.0.0.1",
                "CHROMADB_PORT": str(port),
            },
        },
        {"worker_id": "compute", "tier": "cpu", "server": server},
    )
    store = next(hb for hb in registry.live_workers() if hb.worker_id == "store")
    assert "chromadb" in store.capabilities
    assert store.services_status["chromadb"] == "healthy"
    client = chroma_client(f"http://127.0.0.1:{port}")
    assert client.heartbeat() > 0
    result = broadcast("ping", {}, timeout_s=30, app=app)
    assert [w.worker_id for w in result.workers] == ["compute"]
    assert workers["store"].stop() == 0
    with pytest.raises(Exception):  # noqa: B017, PT011 - any connection error will do
        client.heartbeat()


@pytest.mark.parametrize(
    ("pool", "broker"),
    [("solo", "redis"), ("prefork", "redis"), ("threads", "redis"), ("prefork", "rabbitmq")],
    indirect=["broker"],
)
def test_control_messages_act_in_every_worker_under_every_pool(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
    pool: str,
) -> None:
    slow = {"HEARTBEAT_INTERVAL_S": "60", "HEARTBEAT_TTL_S": "180"}
    server = fake_server("s", ["llama3.2"])
    start_all(
        start_worker,
        registry,
        *(
            {
                "worker_id": f"w{n}",
                "tier": "cpu",
                "server": server,
                "extra_env": slow,
                "args": ["-P", pool, "-c", "1"],
            }
            for n in (1, 2)
        ),
    )
    before = {hb.worker_id: hb.timestamp for hb in registry.live_workers()}
    send_control(app, "refresh")
    wait_for(
        lambda: all(
            (hb.timestamp or 0) > (before[hb.worker_id] or 0) for hb in registry.live_workers()
        ),
        10.0,
        "both workers to heartbeat on the control message (their interval is 60 s)",
    )


def test_broadcast_async_returns_a_handle_to_wait_on(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
) -> None:
    start_worker("solo", tier="gpu", server=fake_server("s", ["llama3.2"]))
    handle = broadcast_async("ping", {}, timeout_s=30, app=app)
    assert handle.recipients == ["solo"]
    result = handle.wait()
    assert handle.ready()
    assert result.broadcast_id == handle.broadcast_id
    assert Counter(w.status for w in result.workers) == {"accepted": 1}
    # Pins a Celery internal: the backend's table of results waited on (what the public
    # remove_pending_result empties). A caller that broadcasts all day must not keep one
    # waiter per worker per broadcast.
    header_ids = {child.id for child in handle.header.results or []}
    assert header_ids
    tables = app.backend._pending_results  # type: ignore[attr-defined]
    waiting = {task_id for table in tables for task_id in table}
    assert not waiting & header_ids


def test_an_unreachable_chromadb_fails_ingestion_with_one_line_naming_chromadb_url(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnreachableError, match=r"ChromaDB at .*CHROMADB_URL"):
        chroma_client(dead)
    worker = start_worker(
        "ingest",
        tier="cpu",
        server=fake_server("e", [EMBED_MODEL]),
        extra_env={"CHROMADB_URL": dead},
    )
    job = {"documents": [{"id": "d", "text": "some text"}], "collection": "docs"}
    result = broadcast("rag_ingestion", job, timeout_s=60, app=app)
    (outcome,) = result.workers
    assert outcome.error is not None
    assert "CHROMADB_URL" in outcome.error
    assert dead in outcome.error
    assert "Traceback" not in worker.log()
