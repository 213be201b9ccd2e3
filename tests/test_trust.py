"""What is in Redis is trusted only as far as it deserves (issue 13, sections 3-5): liveness is
a heartbeat key's existence, a queue is derived from the worker id, huge entries are refused
inside Redis, model names are names, one rule for credentials in Redis URLs."""

from __future__ import annotations

import logging
import time

import pytest
import redis
from celery import Celery

from coordinator.core.errors import ConfigError, JobError, TaskInputError
from coordinator.core.heartbeat import MAX_HEARTBEAT_BYTES, Heartbeat
from coordinator.core.settings import CoordinatorSettings, load_settings
from coordinator.dispatch.app import fleet_of
from coordinator.fleet.registry import Registry
from coordinator.recovery.reaper import Reaper
from tests.conftest import builtin_task
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
        keys=[keys.workers, keys.leases],
        args=[*prefixes, time.time(), keys.down_prefix, MAX_HEARTBEAT_BYTES],
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
