"""What is in Redis is trusted only as far as it deserves (issue 13, sections 3-5): liveness is
a heartbeat key's existence, a queue is derived from the worker id, huge entries are refused
inside Redis, model names are names, one rule for credentials in Redis URLs."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time

import pytest
import redis
from celery import Celery

from coordinator.core.errors import ConfigError, JobError, TaskInputError
from coordinator.core.heartbeat import MAX_HEARTBEAT_BYTES, Heartbeat
from coordinator.core.settings import CoordinatorSettings, WorkerSettings, load_settings
from coordinator.core.task_spec import TaskSpec
from coordinator.dispatch.app import fleet_of
from coordinator.fleet.registry import Registry
from coordinator.recovery.reaper import Reaper
from tests.conftest import builtin_task, queued
from worker_tasks.lifecycle import _other_live_holder
from worker_tasks.tasks import generate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def known(registry: Registry, heartbeat: Heartbeat) -> None:
    """``heartbeat`` published, then its key gone: the worker is known and silent."""
    registry.publish(heartbeat)
    registry.client.delete(registry.keys.worker(heartbeat.worker_id))


def test_a_live_worker_with_an_unreadable_heartbeat_is_never_reaped(
    app: Celery, registry: Registry
) -> None:
    registry.publish(Heartbeat(worker_id="garbled", interval_s=0.5, ttl_s=2.0))
    registry.client.set(registry.keys.worker("garbled"), "{not json", px=60_000)
    clock = Clock()
    reaper = Reaper(app, clock=clock)
    for _ in range(5):
        assert reaper.scan() == []
        clock.now += 5.0  # far past any grace
    assert "garbled" in registry.known_workers()


def test_the_reaper_acts_on_each_workers_own_interval_and_warns_when_settings_differ(
    app: Celery, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    mine = fleet_of(app).settings.heartbeat_interval_s
    known(registry, Heartbeat(worker_id="fast", interval_s=0.2, ttl_s=0.6))
    known(registry, Heartbeat(worker_id="usual", interval_s=mine, ttl_s=3 * mine))
    clock = Clock()
    reaper = Reaper(app, clock=clock)
    with caplog.at_level(logging.WARNING, logger="coordinator.recovery.reaper"):
        assert reaper.scan() == []  # both first seen missing now
        clock.now += 0.2  # the fast worker's grace: its own interval
        assert [r.worker_id for r in reaper.scan()] == ["fast"]
        clock.now += min(1.0, mine) - 0.2
        assert [r.worker_id for r in reaper.scan()] == ["usual"]
    warnings = [r.getMessage() for r in caplog.records if "heartbeats every" in r.getMessage()]
    assert warnings == [
        f"worker fast heartbeats every 0.2 s (TTL 0.6 s) but HEARTBEAT_INTERVAL_S here is"
        f" {mine:g} s: its own figures decide when it is dead; set the same everywhere"
    ]


def test_the_queue_a_heartbeat_names_is_never_used(
    app: Celery, registry: Registry, redis_conn: redis.Redis, settings: CoordinatorSettings
) -> None:
    registry.publish(
        Heartbeat(worker_id="w", services_status={"vllm": "healthy"}, queue="nobody.reads")
    )
    generate.delay("hi", model="m")
    assert redis_conn.llen("nobody.reads") == 0
    assert redis_conn.llen(settings.keys.worker_queue("w")) == 1


def test_an_oversized_heartbeat_is_refused_inside_redis(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    registry.publish(Heartbeat(worker_id="fine"))
    registry.client.set(registry.keys.worker("huge"), "x" * 10_000_000, px=60_000)
    registry.client.sadd(registry.keys.workers, "huge")
    # What the snapshot script ships, before any parsing: not the 10 MB.
    keys = registry.keys
    prefixes = [keys.worker_prefix, keys.claims_prefix, keys.released_prefix]
    shipped = registry._snapshot_script(
        keys=[keys.workers, keys.leases, keys.seq, keys.changes, keys.demand, keys.beat_changes],
        args=[*prefixes, time.time(), keys.down_prefix, MAX_HEARTBEAT_BYTES, "all"],
    )
    assert sum(len(str(part)) for part in shipped) < 10_000
    with caplog.at_level(logging.WARNING, logger="coordinator.fleet.registry"):
        assert [hb.worker_id for hb in registry.snapshot().heartbeats] == ["fine"]
    assert f"skipping heartbeat of worker 'huge': 10000000 bytes is over {MAX_HEARTBEAT_BYTES}" in (
        caplog.text
    )
    assert registry.alive(["huge", "fine", "gone"]) == {"huge", "fine"}


@pytest.mark.parametrize(
    "model", ["../../../etc/passwd", "/etc/passwd", "a/../b", "llama 3", "m\nx", "x" * 300, "-rf"]
)
def test_a_model_that_is_no_model_name_is_refused_at_publish(app: Celery, model: str) -> None:
    with pytest.raises(TaskInputError, match="model must be a model name"):
        generate.delay("hi", model=model)
    with pytest.raises(TaskInputError, match="model must be a model name"):
        builtin_task("worker_tasks.generate").apply(("hi",), {"model": model}, throw=True)


def test_warm_model_refuses_a_path_for_a_model(app: Celery) -> None:
    from coordinator.broadcast.client import broadcast

    with pytest.raises(JobError, match="model must be a model name"):
        broadcast("warm_model", {"model": "../../../etc/passwd"}, app=app)


@pytest.mark.parametrize("model", ["llama3.2", "qwen2.5:7b", "hf.co/org/repo:Q4_K_M", "a/b@c"])
def test_real_model_names_pass(app: Celery, model: str, registry: Registry) -> None:
    registry.publish(Heartbeat(worker_id="w", services_status={"vllm": "healthy"}))
    generate.delay("hi", model=model)


def test_credentials_in_a_redis_urls_query_are_one_clear_error_everywhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0?password=s3cret")
    with pytest.raises(ConfigError) as error:
        load_settings(CoordinatorSettings)
    assert "credentials go in the URL's user part" in str(error.value)
    assert "s3cret" not in str(error.value)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
def test_tasks_sent_from_many_threads_all_reach_the_fleet(
    app: Celery, registry: Registry, settings: CoordinatorSettings
) -> None:
    registry.publish(Heartbeat(worker_id="w", services_status={"vllm": "healthy"}))

    def publish() -> None:
        for n in range(25):
            generate.delay(f"from a thread {n}", model="m")

    threads = [threading.Thread(target=publish) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # Every one routed by the fleet's router, none by Celery's fallback app (no router,
    # broker amqp://localhost), which a thread that did not build the app would otherwise get.
    assert queued(app, settings.keys.worker_queue("w")) == 200


def test_a_message_reaching_a_gone_workers_queue_late_is_moved_too(
    app: Celery, registry: Registry, settings: CoordinatorSettings
) -> None:
    alive = Heartbeat(worker_id="alive", services_status={"vllm": "healthy"}, ttl_s=60.0)
    registry.publish(alive)
    known(registry, Heartbeat(worker_id="dead", services_status={"vllm": "healthy"}))
    reaper = Reaper(app, grace_s=0.0)
    assert [r.worker_id for r in reaper.scan()] == ["dead"]
    # A retry's delayed delivery, or a router with an older snapshot, sends it there after.
    generate.apply_async(("late",), {"model": "m"}, queue=settings.keys.worker_queue("dead"))
    reaper.scan()
    assert queued(app, settings.keys.worker_queue("dead")) == 0
    assert queued(app, settings.keys.worker_queue("alive")) == 1
    assert "dead" in registry.gone_workers()


def test_the_fleets_tasks_behind_many_of_another_apps_are_routed_out_too(
    app: Celery, registry: Registry, settings: CoordinatorSettings
) -> None:
    registry.publish(Heartbeat(worker_id="w", services_status={"vllm": "healthy"}, ttl_s=60.0))
    queue = settings.plain_celery_queue
    fleet_of(app).registry.publish_task_specs(
        {"worker_tasks.generate": TaskSpec("vllm", "llama3.2")}
    )
    for n in range(450):  # another app's, at the consuming end
        app.send_task("someone.elses.task", args=[n], queue=queue)
    app.send_task("worker_tasks.generate", args=["mine"], queue=queue)
    reaper = Reaper(app)
    moved = sum(reaper.reroute_plain() for _ in range(4))
    assert moved == 1
    assert queued(app, settings.keys.worker_queue("w")) == 1
    assert queued(app, queue) == 450


def test_a_restart_leaves_the_unacknowledged_messages_of_a_live_namesake_alone(
    registry: Registry, settings: CoordinatorSettings, app: Celery
) -> None:
    worker = WorkerSettings(worker_id="twin", **settings.model_dump(exclude={"worker_id"}))
    here, now = socket.gethostname()[:128], time.time()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        cases = {
            "alive here": Heartbeat(worker_id="twin", host=here, pid=other.pid),
            "elsewhere": Heartbeat(worker_id="twin", host="elsewhere", pid=1, timestamp=now),
        }
        for case, heartbeat in cases.items():
            registry.publish(heartbeat)
            assert _other_live_holder(fleet_of(app), worker) is not None, case
        other.kill()
        other.wait()
        registry.publish(Heartbeat(worker_id="twin", host=here, pid=other.pid))
        assert _other_live_holder(fleet_of(app), worker) is None  # its process is gone
    stale = Heartbeat(worker_id="twin", host="other-host", pid=1, timestamp=time.time() - 3600)
    registry.publish(stale)
    assert _other_live_holder(fleet_of(app), worker) is None
