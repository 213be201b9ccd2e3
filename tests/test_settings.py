"""Unit tests of configuration from the environment (``coordinator.core.settings``).

Every test starts from an environment without any of the project's variables, so the
host's own REDIS_URL or WORKER_ID cannot leak in. No Redis is involved.
"""

from __future__ import annotations

import os
import socket

import pytest

from coordinator.core.errors import ConfigError
from coordinator.core.score_weights import Weights
from coordinator.core.settings import CoordinatorSettings, Endpoint, WorkerSettings, load_settings
from coordinator.routing import POLICIES

VARIABLES = (
    "REDIS_URL",
    "REGISTRY_URL",
    "NAMESPACE",
    "HEARTBEAT_INTERVAL_S",
    "HEARTBEAT_TTL_S",
    "SCORE_WEIGHTS",
    "ROUTING_POLICY",
    "ROUTING_SEED",
    "WORKER_ID",
    "WORKER_TIER",
    "WORKER_SPECIALIZATION",
    "WORKER_CAPABILITIES",
    "OLLAMA_URL",
    "EMBEDDINGS_URL",
    "OCR_URL",
    "VLLM_URL",
    "VLLM_API",
    "VLLM_API_KEY",
    "EMBEDDINGS_API",
    "EMBEDDINGS_API_KEY",
    "OCR_API",
    "OCR_API_KEY",
    "PROBE_TIMEOUT_S",
    "MODEL_TIMEOUT_S",
    "REGISTRY_REFRESH_S",
    "REDIS_TIMEOUT_S",
    "DECISIONS_KEPT",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove the project's variables in any spelling (pydantic-settings ignores case)."""
    for name in list(os.environ):
        if name.upper() in VARIABLES:
            monkeypatch.delenv(name)


def test_coordinator_defaults() -> None:
    s = load_settings(CoordinatorSettings)
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.registry_url is None
    assert s.registry_redis_url == "redis://localhost:6379/0"
    assert s.namespace == "aiq"
    assert s.heartbeat_interval_s == 30.0
    assert s.heartbeat_ttl_s == 90.0
    assert s.ttl_s == 90.0
    assert s.score_weights == Weights()
    assert s.routing_policy == "cost"
    assert s.routing_seed is None
    assert s.decisions_kept == 1000


def test_worker_defaults() -> None:
    s = load_settings(WorkerSettings)
    assert s.redis_url == "redis://localhost:6379/0"
    assert (s.heartbeat_interval_s, s.ttl_s) == (30.0, 90.0)
    assert s.ollama_url == "http://localhost:11434"
    # One Ollama serves every service unless told otherwise; its API is detected.
    for service in ("vllm", "embeddings", "ocr"):
        assert s.endpoint(service) == Endpoint(service, "http://localhost:11434", "auto")
    assert s.worker_id == socket.gethostname()
    assert s.worker_tier is None
    assert s.worker_specialization is None
    assert s.worker_capabilities is None


@pytest.mark.parametrize(("interval", "ttl"), [("10", 30.0), ("0.5", 1.5), ("45", 135.0)])
def test_ttl_follows_the_interval(
    monkeypatch: pytest.MonkeyPatch, interval: str, ttl: float
) -> None:
    monkeypatch.setenv("HEARTBEAT_INTERVAL_S", interval)
    s = load_settings(CoordinatorSettings)
    assert s.heartbeat_interval_s == float(interval)
    assert s.ttl_s == ttl


def test_explicit_ttl_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEARTBEAT_INTERVAL_S", "10")
    monkeypatch.setenv("HEARTBEAT_TTL_S", "11")
    assert load_settings(CoordinatorSettings).ttl_s == 11.0


def test_values_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "REDIS_URL": "redis://broker:6380/2",
        "REGISTRY_URL": "redis://registry:6379/1",
        "NAMESPACE": "fleet-a",
        "ROUTING_SEED": "7",
        "WORKER_ID": "gpu-1",
        "WORKER_TIER": "gpu",
        "WORKER_SPECIALIZATION": "ocr",
        "OLLAMA_URL": "http://ollama:11434",
        "PROBE_TIMEOUT_S": "0.5",
        "DECISIONS_KEPT": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = load_settings(WorkerSettings)
    assert s.redis_url == "redis://broker:6380/2"
    assert s.registry_redis_url == "redis://registry:6379/1"
    assert s.namespace == "fleet-a"
    assert s.routing_seed == 7
    assert (s.worker_id, s.worker_tier, s.worker_specialization) == ("gpu-1", "gpu", "ocr")
    assert s.ollama_url == "http://ollama:11434"
    assert s.probe_timeout_s == 0.5
    assert s.decisions_kept == 0


def test_lower_case_variable_names_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("namespace", "lower")
    assert load_settings(CoordinatorSettings).namespace == "lower"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ocr, vllm", ["ocr", "vllm"]),
        ("ocr,vllm", ["ocr", "vllm"]),
        (" embeddings ,, ", ["embeddings"]),
        ("", None),
        (" , ", None),
    ],
)
def test_worker_capabilities_split_on_commas(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str] | None
) -> None:
    monkeypatch.setenv("WORKER_CAPABILITIES", raw)
    assert load_settings(WorkerSettings).worker_capabilities == expected


@pytest.mark.parametrize("name", ["WORKER_SPECIALIZATION", "WORKER_TIER"])
@pytest.mark.parametrize("blank", ["", "  "])
def test_blank_optional_worker_values_are_unset(
    monkeypatch: pytest.MonkeyPatch, name: str, blank: str
) -> None:
    monkeypatch.setenv(name, blank)
    s = load_settings(WorkerSettings)
    assert getattr(s, name.lower()) is None


def test_score_weights_from_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCORE_WEIGHTS", '{"model_loaded": 120}')
    w = load_settings(CoordinatorSettings).score_weights
    assert w.model_loaded == 120.0
    assert w == Weights(model_loaded=120.0)
    assert (w.specialization, w.tier_gpu, w.cpu_load, w.tiebreak) == (50.0, 30.0, 30.0, 5.0)


def test_coordinator_ignores_worker_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_TIER", "tpu")  # invalid for a worker, irrelevant here
    assert load_settings(CoordinatorSettings).namespace == "aiq"


# --- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "name", "bad"),
    [
        ({"WORKER_TIER": "tpu"}, "WORKER_TIER", "tpu"),
        ({"HEARTBEAT_INTERVAL_S": "abc"}, "HEARTBEAT_INTERVAL_S", "abc"),
        ({"HEARTBEAT_INTERVAL_S": "-1"}, "HEARTBEAT_INTERVAL_S", "-1"),
        ({"HEARTBEAT_INTERVAL_S": "0"}, "HEARTBEAT_INTERVAL_S", "0"),
        ({"HEARTBEAT_TTL_S": "10"}, "HEARTBEAT_TTL_S", "10"),
        ({"HEARTBEAT_INTERVAL_S": "20", "HEARTBEAT_TTL_S": "15"}, "HEARTBEAT_TTL_S", "15"),
        ({"HEARTBEAT_INTERVAL_S": "20", "HEARTBEAT_TTL_S": "20"}, "HEARTBEAT_TTL_S", "20"),
        ({"NAMESPACE": "my fleet"}, "NAMESPACE", "my fleet"),
        ({"NAMESPACE": "a{b}"}, "NAMESPACE", "a{b}"),
        ({"WORKER_ID": "gpu 1"}, "WORKER_ID", "gpu 1"),
        ({"ROUTING_SEED": "lucky"}, "ROUTING_SEED", "lucky"),
        ({"DECISIONS_KEPT": "-5"}, "DECISIONS_KEPT", "-5"),
        ({"PROBE_TIMEOUT_S": "0"}, "PROBE_TIMEOUT_S", "0"),
        ({"SCORE_WEIGHTS": "[1, 2]"}, "SCORE_WEIGHTS", "[1, 2]"),
        ({"ROUTING_POLICY": "fastest"}, "ROUTING_POLICY", "fastest"),
    ],
)
def test_bad_value_raises_config_error_naming_variable_and_value(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], name: str, bad: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings(WorkerSettings)
    message = str(info.value)
    assert name in message
    assert bad in message


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_routing_policy_is_accepted(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("ROUTING_POLICY", name)
    assert load_settings(CoordinatorSettings).routing_policy == name


def test_a_bad_routing_policy_lists_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTING_POLICY", "Cost")  # names are exact, as make_policy takes them
    with pytest.raises(ConfigError) as info:
        load_settings(CoordinatorSettings)
    message = str(info.value)
    assert "ROUTING_POLICY='Cost'" in message
    assert all(name in message for name in POLICIES)


def test_ttl_error_also_names_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEARTBEAT_INTERVAL_S", "20")
    monkeypatch.setenv("HEARTBEAT_TTL_S", "15")
    with pytest.raises(ConfigError, match="HEARTBEAT_INTERVAL_S=20"):
        load_settings(CoordinatorSettings)


def test_score_weights_unknown_key_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCORE_WEIGHTS", '{"modelloaded": 120}')
    with pytest.raises(ConfigError) as info:
        load_settings(CoordinatorSettings)
    message = str(info.value)
    assert "SCORE_WEIGHTS" in message
    assert "modelloaded" in message.lower()
    assert "120" in message


def test_score_weights_unknown_key_is_quoted_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCORE_WEIGHTS", '{"model_loaded_x": 120}')
    with pytest.raises(ConfigError, match="model_loaded_x"):
        load_settings(CoordinatorSettings)


def test_score_weights_not_json_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCORE_WEIGHTS", "model_loaded=120")
    with pytest.raises(ConfigError) as info:
        load_settings(CoordinatorSettings)
    assert "SCORE_WEIGHTS" in str(info.value)
    assert "model_loaded=120" in str(info.value)


def test_infinite_interval_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEARTBEAT_INTERVAL_S", "inf")
    with pytest.raises(ConfigError, match="HEARTBEAT_INTERVAL_S"):
        load_settings(CoordinatorSettings)


def test_config_error_hides_the_pydantic_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAMESPACE", "a b")
    with pytest.raises(ConfigError) as info:
        load_settings(CoordinatorSettings)
    assert info.value.__suppress_context__
    assert str(info.value).startswith("invalid configuration: ")


def test_several_problems_are_all_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_TIER", "tpu")
    monkeypatch.setenv("NAMESPACE", "a b")
    with pytest.raises(ConfigError) as info:
        load_settings(WorkerSettings)
    assert "WORKER_TIER='tpu'" in str(info.value)
    assert "NAMESPACE='a b'" in str(info.value)


# --- keys -------------------------------------------------------------------------------


def test_keys_use_the_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAMESPACE", "ns1")
    keys = load_settings(CoordinatorSettings).keys
    assert keys.worker_queue("w1") == "ns1.worker.w1"
    assert keys.service_queue("ocr") == "ns1.service.ocr"
    assert keys.default_queue == "ns1.default"
    assert keys.worker("w1") == "{ns1}:worker:w1"
    assert keys.worker_prefix == "{ns1}:worker:"
    assert keys.workers == "{ns1}:workers"
    assert keys.claims("w1") == "{ns1}:claims:w1"
    assert keys.released("w1") == "{ns1}:released:w1"
    assert keys.decisions == "{ns1}:decisions"


def test_default_namespace_keys() -> None:
    keys = load_settings(WorkerSettings).keys
    assert keys.worker_queue("w1") == "aiq.worker.w1"
    assert keys.worker("w1") == "{aiq}:worker:w1"


def test_each_service_names_its_server_api_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_URL", "http://vllm:8000/")
    monkeypatch.setenv("VLLM_API", "openai")
    monkeypatch.setenv("VLLM_API_KEY", "k3y")
    monkeypatch.setenv("EMBEDDINGS_URL", "http://tei:80")
    monkeypatch.setenv("EMBEDDINGS_API", "tei")
    s = load_settings(WorkerSettings)
    assert s.endpoint("vllm") == Endpoint("vllm", "http://vllm:8000", "openai", "k3y", "VLLM_URL")
    assert s.endpoint("embeddings").api == "tei"
    assert s.endpoint("ocr").setting == "OLLAMA_URL"
    assert "k3y" not in repr(s)
    assert "k3y" not in repr(s.endpoint("vllm"))


def test_an_unknown_server_api_is_refused_naming_the_choices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OCR_API", "grpc")
    with pytest.raises(ConfigError, match=r"OCR_API='grpc'.*'ollama', 'openai', 'tei' or 'auto'"):
        load_settings(WorkerSettings)
