"""``coordinator.install``: any Celery app becomes a fleet app and keeps what is its own."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from celery import Celery

import coordinator
from coordinator.core.errors import ConfigError
from coordinator.core.heartbeat import Heartbeat
from coordinator.core.settings import CoordinatorSettings
from coordinator.dispatch.app import WORKER_MODULES, find_fleet, fleet_of
from coordinator.fleet.registry import Registry


@pytest.fixture
def own_app(settings: CoordinatorSettings) -> Celery:
    app = Celery("own", set_as_current=False)
    app.conf.task_routes = {"own.report": {"queue": "reports"}}
    app.conf.imports = ("own.tasks",)
    return app


def queued(conn: redis.Redis, queue: str) -> list[str]:
    return [json.loads(raw)["headers"]["task"] for raw in conn.lrange(queue, 0, -1)]


def test_an_installed_app_routes_its_model_tasks_and_keeps_its_own_routes(
    own_app: Celery, settings: CoordinatorSettings, registry: Registry, redis_conn: redis.Redis
) -> None:
    fleet = coordinator.install(own_app, settings, make_default=False)
    registry.publish(Heartbeat(worker_id="w", services_status={"vllm": "healthy"}))

    @own_app.task(shared=False, name="own.summarize", service="vllm", default_model="m")
    def summarize(text: str, model: str | None = None) -> str:
        return text

    @own_app.task(shared=False, name="own.report")
    def report() -> None:
        return None

    @own_app.task(shared=False, name="own.plain")
    def plain() -> None:
        return None

    summarize.delay("text")
    report.delay()
    plain.delay()
    assert queued(redis_conn, settings.keys.worker_queue("w")) == ["own.summarize"]
    assert queued(redis_conn, "reports") == ["own.report"]  # its own route still applies
    assert queued(redis_conn, settings.keys.default_queue) == ["own.plain"]
    # A worker of this app imports its own modules and the fleet's.
    assert own_app.conf.imports == ("own.tasks", *WORKER_MODULES)
    assert coordinator.install(own_app, settings) is fleet  # twice: the same fleet
    fleet.close()
    redis_conn.delete("reports")


def test_a_plain_app_is_not_a_fleet_app(own_app: Celery) -> None:
    assert find_fleet(own_app) is None
    with pytest.raises(ConfigError, match=r"'own' is not a fleet app: coordinator.install"):
        fleet_of(own_app)


def test_install_without_settings_reads_the_environment_and_names_a_bad_variable(
    own_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEARTBEAT_INTERVAL_S", "-1")
    with pytest.raises(ConfigError, match=r"HEARTBEAT_INTERVAL_S='-1'"):
        coordinator.install(own_app)
    assert find_fleet(own_app) is None


def test_a_malformed_task_declaration_fails_its_publish_naming_the_task(
    own_app: Celery, settings: CoordinatorSettings
) -> None:
    fleet = coordinator.install(own_app, settings, make_default=False)

    @own_app.task(shared=False, name="own.broken", service="two words")
    def broken(**_: Any) -> None:
        return None

    with pytest.raises(ConfigError, match=r"task own.broken: service must be a name"):
        broken.delay()
    fleet.close()
