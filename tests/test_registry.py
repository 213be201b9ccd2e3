"""The registry on a real Redis: TTL expiry, malformed entries, in-flight counts, decisions."""

from __future__ import annotations

import json
import logging
import time

import pytest
import redis

from coordinator.core.heartbeat import Heartbeat
from coordinator.core.settings import CoordinatorSettings, redact_url
from coordinator.fleet.registry import Registry
from tests.conftest import wait_for


def beat(worker_id: str, **fields: object) -> Heartbeat:
    return Heartbeat.model_validate({"worker_id": worker_id, "capabilities": ["vllm"], **fields})


def test_published_heartbeats_come_back_in_one_snapshot(registry: Registry) -> None:
    for worker_id in ("gpu-1", "gpu-2", "cpu-1"):
        registry.publish(beat(worker_id, loaded_models=["llama3.2:latest"], tier="gpu"))
    live = {hb.worker_id: hb for hb in registry.live_workers()}
    assert set(live) == {"gpu-1", "gpu-2", "cpu-1"}
    assert live["gpu-1"].models_on_disk == ("llama3.2",)
    assert live["gpu-1"].tier == 1


def test_a_worker_that_stops_heartbeating_drops_out_by_itself(
    registry: Registry, redis_conn: redis.Redis
) -> None:
    short = Registry(redis_conn, registry.keys, ttl_s=0.3)
    short.publish(beat("fading"))
    registry.publish(beat("steady"))
    assert {hb.worker_id for hb in short.live_workers()} == {"fading", "steady"}
    wait_for(
        lambda: {hb.worker_id for hb in short.live_workers()} == {"steady"},
        5.0,
        "the fading worker's heartbeat to expire",
    )
    # The read also pruned the index, so it cannot grow with dead workers.
    assert not redis_conn.sismember(registry.keys.workers, "fading")


@pytest.mark.parametrize(
    ("raw", "mentions"),
    [
        ("{not json", "not JSON"),
        ('["a list"]', "JSON object"),
        ('{"worker_id": "bad", "active_requests": "two"}', "'two'"),
        ('{"worker_id": "bad", "current_load": 1.5}', "1.5"),
        ('{"worker_id": "bad", "current_load": NaN}', "current_load"),
        ('{"worker_id": "someone-else"}', "someone-else"),
        ('{"worker_id": "bad", "pad": "' + "x" * 70_000 + '"}', "bytes"),
    ],
)
def test_malformed_entries_are_skipped_with_a_warning_naming_the_worker(
    registry: Registry,
    redis_conn: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    raw: str,
    mentions: str,
) -> None:
    registry.publish(beat("good"))
    redis_conn.set(registry.keys.worker("bad"), raw, ex=30)
    redis_conn.sadd(registry.keys.workers, "bad")
    with caplog.at_level(logging.WARNING, logger="coordinator.fleet.registry"):
        live = registry.live_workers()
    assert [hb.worker_id for hb in live] == ["good"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'bad'" in warnings[0]
    assert mentions in warnings[0]


def test_the_same_malformed_entry_is_reported_once(
    registry: Registry, redis_conn: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    redis_conn.set(registry.keys.worker("bad"), "{nope", ex=30)
    redis_conn.sadd(registry.keys.workers, "bad")
    with caplog.at_level(logging.WARNING, logger="coordinator.fleet.registry"):
        for _ in range(3):
            assert registry.live_workers() == []
    assert len(caplog.records) == 1


def test_remove_forgets_a_worker_at_once(registry: Registry) -> None:
    registry.publish(beat("leaving"))
    registry.claim_many({"leaving": ["c"]}, [], 0)
    registry.remove("leaving")
    snapshot = registry.snapshot()
    assert snapshot.heartbeats == ()
    assert "leaving" not in snapshot.in_flight


def test_in_flight_claims_and_releases_add_up(registry: Registry) -> None:
    registry.publish(beat("w"))
    registry.publish(beat("v"))
    assert registry.claim_many({"w": ["w1", "w2"], "v": ["v1"]}, [], 0) == {"w": 2, "v": 1}
    assert registry.snapshot().in_flight == {"w": 2, "v": 1}
    assert registry.release("w", "w1")
    # Released twice (two outcomes seen for one message): nothing more is taken.
    assert not registry.release("w", "w1")
    assert registry.snapshot().in_flight == {"w": 1, "v": 1}
    # A release that overtakes its claim (still buffered in the publisher) keeps the claim
    # from ever being added.
    assert not registry.release("v", "v2")
    assert registry.claim_many({"v": ["v2"]}, [], 0) == {"v": 1}
    assert registry.release("v", "v1")
    assert registry.snapshot().in_flight == {"w": 1}


def test_a_claim_nothing_releases_lapses(registry: Registry) -> None:
    registry.publish(beat("w"))
    registry.claim_many({"w": ["lost"]}, [], 0, lapse_s=5.0)
    assert registry.snapshot().in_flight == {"w": 1}
    assert registry.snapshot(now=time.time() + 10.0).in_flight == {}


def test_decisions_are_kept_newest_first_and_trimmed(registry: Registry) -> None:
    registry.claim_many({}, [json.dumps({"n": n}) for n in range(2)], keep=3)
    registry.claim_many({"w": ["c"]}, [json.dumps({"n": n}) for n in range(2, 5)], keep=3)
    kept = [json.loads(item)["n"] for item in registry.recent_decisions(10)]
    assert kept == [4, 3, 2]


def test_registry_write_lands_under_the_namespace_only(
    registry: Registry, redis_conn: redis.Redis, settings: CoordinatorSettings
) -> None:
    registry.publish(beat("w1"))
    registry.claim_many({"w1": ["c1"]}, ["{}"], keep=10)
    written = {key for key in redis_conn.scan_iter(match=f"*{settings.namespace}*")}
    assert written == {
        settings.keys.worker("w1"),
        settings.keys.workers,
        settings.keys.known,
        settings.keys.claims("w1"),
        settings.keys.decisions,
        settings.keys.seq,
        settings.keys.changes,
        settings.keys.beat_changes,
    }


def test_redact_url_hides_the_password() -> None:
    assert redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("rediss://user:s3cret@host/1") == "rediss://user:***@host/1"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


def test_claim_keys_expire_with_their_last_claim(registry: Registry) -> None:
    # A dead worker's keys, recreated by a late claim or release after the reaper dropped
    # them, go by themselves.
    registry.claim_many({"gone": ["c"]}, [], 0, lapse_s=60.0)
    registry.release("gone", "never-written", lapse_s=60.0)
    for key in (registry.keys.claims("gone"), registry.keys.released("gone")):
        assert 0 < registry.client.pttl(key) <= 60_000
