"""Unit tests of the heartbeat model and its strict parser (``coordinator.core.heartbeat``).

The design document's heartbeat must parse as it is; anything a broken or hostile worker
could write into Redis must be refused with a :class:`HeartbeatError` naming the worker
and the offending value. No Redis is involved.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from coordinator.core.errors import HeartbeatError
from coordinator.core.heartbeat import (
    MAX_HEARTBEAT_BYTES,
    MAX_REASON,
    TIER_CPU,
    TIER_GPU,
    TIER_STORAGE,
    Heartbeat,
    parse_heartbeat,
)

DESIGN_HEARTBEAT = (
    '{"worker_id": "gpu-worker-abc123", "status": "healthy", "current_load": 0.42, '
    '"available_memory": "24.5GB", "gpu_utilization": 65.3, "active_requests": 2, '
    '"loaded_models": ["llama3.2", "nomic-embed-text"], "specialization": "vllm", '
    '"services_status": {"vllm": "healthy", "embeddings": "healthy"}}'
)


def payload(worker_id: str = "w1", **fields: Any) -> str:
    return json.dumps({"worker_id": worker_id, **fields})


def test_the_design_heartbeat_parses_as_is() -> None:
    hb = parse_heartbeat(DESIGN_HEARTBEAT, "gpu-worker-abc123")
    assert hb.worker_id == "gpu-worker-abc123"
    assert hb.status == "healthy"
    assert hb.current_load == 0.42
    assert hb.available_memory == "24.5GB"
    assert hb.gpu_utilization == 65.3
    assert hb.active_requests == 2
    assert hb.models_on_disk == ("llama3.2", "nomic-embed-text")
    assert hb.specialization == "vllm"
    assert hb.services_status == {"vllm": "healthy", "embeddings": "healthy"}
    assert hb.capabilities == ("vllm", "embeddings")
    assert hb.tier is None
    assert hb.tier_name == "unknown"


def test_the_design_heartbeat_parses_from_bytes_and_without_a_key() -> None:
    from_bytes = parse_heartbeat(DESIGN_HEARTBEAT.encode())
    assert from_bytes == parse_heartbeat(DESIGN_HEARTBEAT, "gpu-worker-abc123")


def test_explicit_capabilities_are_kept() -> None:
    hb = parse_heartbeat(payload(capabilities=["ocr"], services_status={"vllm": "healthy"}), "w1")
    assert hb.capabilities == ("ocr",)


def test_minimal_heartbeat_defaults() -> None:
    hb = parse_heartbeat(payload(), "w1")
    assert hb.status == "healthy"
    assert (hb.current_load, hb.active_requests) == (0.0, 0)
    assert hb.gpu_utilization is None
    assert hb.models_on_disk == () == hb.capabilities
    assert hb.services_status == {}


# --- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "needles"),
    [
        ("not json at all", ["not JSON"]),
        ('{"worker_id": "w1", ', ["not JSON"]),
        (b"\xff\xfe\x00garbage", ["not JSON"]),
        ("[1, 2]", ["JSON object", "list"]),
        ('"w1"', ["JSON object", "str"]),
        ("null", ["JSON object", "NoneType"]),
        (payload(active_requests="two"), ["active_requests", "'two'"]),
        (payload(active_requests=2.5), ["active_requests", "2.5"]),
        (payload(current_load="high"), ["current_load", "'high'"]),
        (payload(loaded_models="llama3.2"), ["loaded_models", "'llama3.2'"]),
        (payload(services_status=["vllm"]), ["services_status", "['vllm']"]),
        (payload(services_status={"ocr": "sleepy"}), ["services_status.ocr", "'sleepy'"]),
        (payload(status="asleep"), ["status", "'asleep'"]),
        (payload(current_load=1.5), ["current_load", "1.5"]),
        (payload(current_load=-0.1), ["current_load", "-0.1"]),
        (payload(gpu_utilization=101), ["gpu_utilization", "101"]),
        (payload(gpu_utilization=-1), ["gpu_utilization", "-1"]),
        (payload(active_requests=-1), ["active_requests", "-1"]),
        (payload(timestamp=-5), ["timestamp", "-5"]),
        (payload(specialization=""), ["specialization", "''"]),
        (payload(loaded_models=[""]), ["loaded_models.0", "''"]),
        ('{"worker_id": "w1", "current_load": NaN}', ["current_load", "nan"]),
        ('{"worker_id": "w1", "gpu_utilization": NaN}', ["gpu_utilization", "nan"]),
        ('{"worker_id": "w1", "current_load": Infinity}', ["current_load", "inf"]),
        ('{"worker_id": "w1", "gpu_utilization": -Infinity}', ["gpu_utilization", "-inf"]),
        ('{"worker_id": "w1", "timestamp": Infinity}', ["timestamp", "inf"]),
        ('{"worker_id": "w1", "timestamp": 1e999}', ["timestamp", "inf"]),
        ('{"worker_id": "w1", "active_requests": NaN}', ["active_requests", "nan"]),
    ],
)
def test_bad_payload_is_refused_naming_worker_and_value(
    raw: str | bytes, needles: list[str]
) -> None:
    with pytest.raises(HeartbeatError) as info:
        parse_heartbeat(raw, "w1")
    err = info.value
    assert err.worker_id == "w1"
    message = str(err)
    assert "'w1'" in message
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize("bad_id", ["bad id", "w1;DROP", "a/b", "ü", "", "x" * 129, "{ns}"])
def test_bad_worker_id_is_refused(bad_id: str) -> None:
    with pytest.raises(HeartbeatError) as info:
        parse_heartbeat(payload(bad_id))
    assert info.value.worker_id == (bad_id or None)
    assert "worker_id" in info.value.reason
    assert repr(bad_id) in info.value.reason


def test_missing_or_non_string_worker_id_is_refused() -> None:
    with pytest.raises(HeartbeatError, match="worker_id"):
        parse_heartbeat('{"status": "healthy"}', "w1")
    with pytest.raises(HeartbeatError, match="worker_id=123"):
        parse_heartbeat('{"worker_id": 123}', "123")


def test_oversized_payload_is_refused_unparsed() -> None:
    raw = payload(available_memory="x" * MAX_HEARTBEAT_BYTES)
    assert len(raw) > MAX_HEARTBEAT_BYTES
    with pytest.raises(HeartbeatError) as info:
        parse_heartbeat(raw, "w1")
    assert info.value.worker_id == "w1"
    assert str(len(raw)) in str(info.value)
    assert str(MAX_HEARTBEAT_BYTES) in str(info.value)
    # Refused before parsing: even broken JSON of that size gets the size message.
    with pytest.raises(HeartbeatError, match="bytes is over"):
        parse_heartbeat(b"{" * (MAX_HEARTBEAT_BYTES + 1), "w1")


def test_payload_just_under_the_limit_is_accepted() -> None:
    skeleton = payload(available_memory="")
    raw = payload(available_memory="x" * (MAX_HEARTBEAT_BYTES - len(skeleton)))
    assert len(raw) == MAX_HEARTBEAT_BYTES
    assert parse_heartbeat(raw, "w1").worker_id == "w1"


def test_oversized_payload_is_refused_by_bytes_not_characters() -> None:
    raw = json.dumps({"worker_id": "w1", "available_memory": "€" * 30_000}, ensure_ascii=False)
    assert len(raw) < MAX_HEARTBEAT_BYTES < len(raw.encode())
    with pytest.raises(HeartbeatError, match="bytes is over"):
        parse_heartbeat(raw, "w1")


def test_deeply_nested_json_is_refused() -> None:
    raw = '{"worker_id": "w1", "available_memory": ' + "[" * 25_000 + "]" * 25_000 + "}"
    assert len(raw) < MAX_HEARTBEAT_BYTES
    with pytest.raises(HeartbeatError) as info:
        parse_heartbeat(raw, "w1")
    assert info.value.worker_id == "w1"


def test_impersonation_is_refused() -> None:
    raw = payload("gpu-1", loaded_models=["llama-vision"])
    assert parse_heartbeat(raw, "gpu-1").worker_id == "gpu-1"
    with pytest.raises(HeartbeatError) as info:
        parse_heartbeat(raw, "cpu-7")
    assert info.value.worker_id == "cpu-7"
    assert "'gpu-1'" in str(info.value)
    assert "'cpu-7'" in str(info.value)


def test_invalid_payload_without_key_names_the_claimed_worker() -> None:
    with pytest.raises(HeartbeatError) as info:
        parse_heartbeat(payload("gpu-9", current_load=7))
    assert info.value.worker_id == "gpu-9"
    assert "current_load=7" in str(info.value)


def test_heartbeat_error_survives_a_round_trip_through_its_args() -> None:
    err = HeartbeatError("w1", "bad")
    rebuilt = HeartbeatError(*err.args)
    assert str(rebuilt) == str(err) == "malformed heartbeat from worker 'w1': bad"


# --- leniencies -------------------------------------------------------------------------


def test_unknown_fields_are_ignored() -> None:
    hb = parse_heartbeat(payload(future_field={"x": 1}, cuda_version="12.4"), "w1")
    assert hb.worker_id == "w1"
    assert "future_field" not in hb.model_dump()
    assert "future_field" not in hb.to_json()


@pytest.mark.parametrize(
    ("tier", "number", "name"),
    [
        ("gpu", TIER_GPU, "gpu"),
        ("GPU", TIER_GPU, "gpu"),
        ("cpu", TIER_CPU, "cpu"),
        ("storage", TIER_STORAGE, "storage"),
        (1, TIER_GPU, "gpu"),
        (2, TIER_CPU, "cpu"),
        (3, TIER_STORAGE, "storage"),
        (None, None, "unknown"),
    ],
)
def test_tier_by_name_or_number(tier: str | int | None, number: int | None, name: str) -> None:
    hb = parse_heartbeat(payload(tier=tier), "w1")
    assert hb.tier == number
    assert hb.tier_name == name


@pytest.mark.parametrize("tier", [0, 4, -1, "tpu", 1.5])
def test_bad_tier_is_refused(tier: str | int | float) -> None:
    with pytest.raises(HeartbeatError, match="tier"):
        parse_heartbeat(payload(tier=tier), "w1")


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        (["llama3.2:latest"], ("llama3.2",)),
        (["llama3.2:latest", "llama3.2", "nomic-embed-text"], ("llama3.2", "nomic-embed-text")),
        (["b", "a", "b:latest", "a"], ("b", "a")),
        (["llama3.2:8b", "llama3.2"], ("llama3.2:8b", "llama3.2")),
        ([" llama3.2 "], ("llama3.2",)),
    ],
)
def test_loaded_models_are_normalized_and_deduplicated(
    models: list[str], expected: tuple[str, ...]
) -> None:
    hb = parse_heartbeat(payload(loaded_models=models, models_in_memory=models), "w1")
    assert hb.models_on_disk == expected
    assert hb.models_in_memory == expected


def test_heartbeat_is_frozen() -> None:
    hb = parse_heartbeat(payload(), "w1")
    with pytest.raises(Exception, match="frozen"):
        hb.active_requests = 3  # type: ignore[misc]


# --- to_json ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hb",
    [
        Heartbeat(worker_id="w1"),
        Heartbeat(worker_id="w1", services_status={"ocr": "healthy", "vllm": "unhealthy"}),
        Heartbeat(
            worker_id="gpu-worker-abc123",
            status="degraded",
            current_load=0.42,
            available_memory="24.5GB",
            gpu_utilization=65.3,
            active_requests=2,
            loaded_models=("llama3.2:latest", "nomic-embed-text"),
            models_in_memory=("llama3.2",),
            specialization="vllm",
            services_status={"vllm": "healthy", "embeddings": "unhealthy"},
            tier=1,
            capabilities=("vllm", "embeddings", "ocr"),
            queue="aiq.worker.gpu-worker-abc123",
            timestamp=1_700_000_000.25,
        ),
    ],
)
def test_to_json_round_trips(hb: Heartbeat) -> None:
    text = hb.to_json()
    assert parse_heartbeat(text, hb.worker_id) == hb
    assert "null" not in text  # None fields are left out, not written as null
    assert len(text) < MAX_HEARTBEAT_BYTES


def test_design_heartbeat_round_trips() -> None:
    hb = parse_heartbeat(DESIGN_HEARTBEAT, "gpu-worker-abc123")
    again = parse_heartbeat(hb.to_json(), "gpu-worker-abc123")
    assert again == hb
    assert json.loads(hb.to_json())["capabilities"] == ["vllm", "embeddings"]


def test_a_long_service_error_is_kept_short_not_refused() -> None:
    raw = json.dumps({"worker_id": "w", "service_errors": {"vllm": "x" * 5000}})
    assert parse_heartbeat(raw).service_errors == {"vllm": "x" * MAX_REASON}
