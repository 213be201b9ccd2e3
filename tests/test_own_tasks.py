"""An application's own Celery app and tasks join the fleet (``coordinator.install``), and
tasks published by apps without the fleet router are not left in a queue nobody reads."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from celery import Celery

from coordinator.core.settings import CoordinatorSettings
from coordinator.core.task_spec import GENERATE, TaskSpec
from coordinator.dispatch.app import fleet_of
from coordinator.fleet.registry import Registry
from coordinator.recovery.reaper import Reaper
from coordinator.sim.servers.ollama import SimulatedModelServer
from tests.conftest import ROOT, WorkerFactory, queued

pytestmark = pytest.mark.e2e

MYAPP = '''
"""An application's own app: installed into the fleet, one task of its own."""
from celery import Celery

import coordinator
from worker_tasks import ModelTask

app = Celery("myapp")
coordinator.install(app)


@app.task(base=ModelTask, bind=True, service="vllm", model_arg="llm", default_model="llama3.2")
def summarize(self, text, llm=None):
    settings = self.worker_settings()
    client, endpoint, server = self.server("vllm", settings)
    answer = server.generate(client, endpoint, model=llm or self.default_model, prompt=text)
    return {"worker_id": settings.worker_id, "summary": answer["response"]}
'''


@pytest.fixture
def myapp(tmp_path: Path) -> Path:
    """``myapp.py`` in the directory the workers (and a publisher) import from."""
    path = tmp_path / "myapp.py"
    path.write_text(MYAPP)
    return path


def _two_workers(
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    app_module: str,
) -> tuple[SimulatedModelServer, SimulatedModelServer]:
    """``holder`` has llama3.2 in memory; ``other`` serves vllm without it."""
    holder = fake_server("holder", ["llama3.2"], ["llama3.2"])
    other = fake_server("other", ["qwen2.5"], ["qwen2.5"])
    start_worker("holder", tier="gpu", server=holder, app_module=app_module)
    start_worker("other", tier="gpu", server=other, app_module=app_module)
    return holder, other


def test_an_apps_own_task_is_routed_like_generate_from_its_own_process_and_by_name(
    app: Celery,
    myapp: Path,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    registry: Registry,
    settings: CoordinatorSettings,
) -> None:
    holder, other = _two_workers(start_worker, fake_server, "myapp")
    # The workers declared the app's task (and the built-ins) to the fleet.
    declared = registry.task_specs()
    assert declared["myapp.summarize"] == TaskSpec("vllm", "llama3.2", "llm", model_position=1)
    assert GENERATE in declared

    # From the application's own process: install() read the same environment.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join((str(ROOT), str(myapp.parent))),
        "REDIS_URL": settings.redis_url,
        "NAMESPACE": settings.namespace,
    }
    code = (
        "import myapp\n"
        "results = [myapp.summarize.delay(f'text {n}', llm='llama3.2') for n in range(4)]\n"
        "print(sorted({r.get(timeout=30)['worker_id'] for r in results}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['holder']"

    # From a fleet app without the task's code: by name, as the workers declared it.
    by_name = app.send_task("myapp.summarize", args=["more text", "llama3.2"])
    assert by_name.get(timeout=30)["worker_id"] == "holder"
    assert other.request_count("POST", "/api/generate") == 0
    fleet_of(app).router.claims.flush()
    decision = next(d for d in registry.recent_decisions(20) if '"task":"myapp.summarize"' in d)
    assert '"outcome":"routed"' in decision
    assert holder.request_count("POST", "/api/generate") == 5


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
def test_a_task_sent_by_an_app_without_the_router_is_routed_out_of_celerys_queue(
    app: Celery,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
    settings: CoordinatorSettings,
    registry: Registry,
    reaper_thread: Reaper,
) -> None:
    holder, other = _two_workers(start_worker, fake_server, "worker_tasks")
    # A plain Celery app on the same Redis: no router, Celery's default queue (``celery`` by
    # default; named per test namespace here).
    plain = Celery("plain", broker=settings.broker, set_as_current=False)
    plain.conf.update(
        task_default_queue=settings.plain_celery_queue,
        task_serializer="json",
        accept_content=["json"],
    )
    ids = [
        plain.send_task(GENERATE, args=[f"hi {n}"], kwargs={"model": "llama3.2"}).id
        for n in range(6)
    ]
    # Behind the fleet's: on RabbitMQ the reaper stops at another app's task (Redis reads
    # past it: tests/test_trust.py).
    plain.send_task("someone.elses.task", args=[1])
    # The reaper routed the fleet's tasks to the worker with the model, under the ids the
    # sender holds, and left the other app's task where its own workers look.
    ran = {app.AsyncResult(task_id).get(timeout=60)["worker_id"] for task_id in ids}
    assert ran == {"holder"}
    assert other.request_count("POST", "/api/generate") == 0
    assert holder.request_count("POST", "/api/generate") == 6
    assert queued(app, settings.plain_celery_queue) == 1  # someone.elses.task
