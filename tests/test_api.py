"""The HTTP API over a real app and a real Redis, through FastAPI's TestClient."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn
from celery import Celery
from fastapi.testclient import TestClient
from prometheus_client import CONTENT_TYPE_LATEST

from coordinator.core.errors import ConfigError
from coordinator.core.heartbeat import Heartbeat
from coordinator.core.settings import CoordinatorSettings
from coordinator.dispatch.app import create_app, fleet_of
from coordinator.fleet.registry import Registry
from coordinator.ops.api import create_api, is_loopback, serve
from coordinator.routing import CostPolicy
from coordinator.sim.servers.ollama import SimulatedModelServer
from tests.conftest import WorkerFactory, free_port

GENERATE, OCR = "worker_tasks.generate", "worker_tasks.ocr"
TOKEN = "t0ken-for-tests-only"  # noqa: S105 - a test token
BROADCAST = "/api/coordinator/broadcast-job"
GUARDED = [
    ("GET", "/api/admin/workers"),
    ("GET", "/api/admin/services"),
    ("GET", "/api/admin/decisions"),
    ("GET", "/metrics"),
    ("POST", BROADCAST),
]


@pytest.fixture
def guarded_client(app: Celery) -> Iterator[TestClient]:
    with TestClient(create_api(app, token=TOKEN)) as test_client:
        yield test_client


@pytest.fixture
def dead_client(settings: CoordinatorSettings) -> Iterator[TestClient]:
    """An API whose registry URL (with a password) points at a closed port."""
    dead = settings.model_copy(
        update={
            "registry_url": f"redis://:hunter2@127.0.0.1:{free_port()}/0",
            "redis_timeout_s": 0.5,
        }
    )
    dead_app = create_app(dead, main="dead-registry")
    try:
        with TestClient(create_api(dead_app, token=None)) as test_client:
            yield test_client
    finally:
        dead_app.close()


@pytest.fixture
def fleet(registry: Registry) -> None:
    """A GPU worker with llama3.2 loaded (text and OCR) and a CPU embedding worker."""
    registry.publish(
        Heartbeat(
            worker_id="gpu-1",
            tier=1,
            specialization="ocr",
            loaded_models=("llama3.2",),
            active_requests=1,
            current_load=0.25,
            gpu_utilization=40.0,
            services_status={"vllm": "healthy", "ocr": "unhealthy"},
            timestamp=1_700_000_000.0,
        )
    )
    registry.publish(
        Heartbeat(worker_id="cpu-1", tier=2, services_status={"embeddings": "healthy"})
    )


def by_id(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    return {row[key]: row for row in rows}


# -- open endpoints ------------------------------------------------------------------------


def test_healthz_reports_redis(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "redis": True}


def test_workers_reflect_heartbeats(client: TestClient, fleet: None) -> None:
    response = client.get("/api/admin/workers")
    assert response.status_code == 200
    workers = response.json()["workers"]
    assert [w["worker_id"] for w in workers] == ["cpu-1", "gpu-1"]
    gpu = by_id(workers, "worker_id")["gpu-1"]
    assert gpu["tier"] == 1
    assert gpu["tier_name"] == "gpu"
    assert gpu["specialization"] == "ocr"
    assert gpu["loaded_models"] == ["llama3.2"]
    assert gpu["active_requests"] == 1
    assert gpu["current_load"] == 0.25
    assert gpu["gpu_utilization"] == 40.0
    assert gpu["services_status"] == {"vllm": "healthy", "ocr": "unhealthy"}
    assert gpu["last_seen"] == 1_700_000_000.0
    assert by_id(workers, "worker_id")["cpu-1"]["gpu_utilization"] is None


def test_workers_empty_fleet(client: TestClient) -> None:
    assert client.get("/api/admin/workers").json() == {"workers": []}


def test_services_reflect_heartbeats(client: TestClient, fleet: None) -> None:
    response = client.get("/api/admin/services")
    assert response.status_code == 200
    services = by_id(response.json()["services"], "name")
    assert sorted(services) == ["embeddings", "ocr", "vllm"]
    assert services["vllm"] == {
        "name": "vllm",
        "worker_count": 1,
        "healthy_count": 1,
        "workers": ["gpu-1"],
    }
    assert services["ocr"]["healthy_count"] == 0
    assert services["embeddings"]["workers"] == ["cpu-1"]


def test_decisions_newest_first_with_breakdowns(
    app: Celery, client: TestClient, fleet: None
) -> None:
    app.send_task(GENERATE, args=["hi"], kwargs={"model": "llama3.2"})
    app.send_task(OCR, args=["aGVsbG8="])
    fleet_of(app).router.claims.flush()

    decisions = client.get("/api/admin/decisions").json()["decisions"]
    assert [d["task"] for d in decisions] == [OCR, GENERATE]
    generate = decisions[1]
    assert (generate["service"], generate["model"]) == ("vllm", "llama3.2")
    assert (generate["outcome"], generate["worker_id"]) == ("routed", "gpu-1")
    assert (generate["policy"], generate["unit"]) == (CostPolicy.name, CostPolicy.unit)
    best = generate["candidates"][0]
    assert best["worker_id"] == "gpu-1"
    assert (best["state"], best["download_s"]) == ("disk", 0.0)  # llama3.2 is on its disk
    assert best["load_s"] > 0
    assert "total" in best

    newest = client.get("/api/admin/decisions", params={"limit": 1}).json()["decisions"]
    assert [d["task"] for d in newest] == [OCR]


@pytest.mark.parametrize("limit", ["0", "1001", "-5", "many"])
def test_decisions_limit_out_of_range_is_422(client: TestClient, limit: str) -> None:
    response = client.get("/api/admin/decisions", params={"limit": limit})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "limit"]


def test_metrics_after_routing(app: Celery, client: TestClient, fleet: None) -> None:
    app.send_task(GENERATE, args=["hi"], kwargs={"model": "llama3.2"})
    fleet_of(app).router.claims.flush()

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    text = response.text
    assert 'aiq_routing_decisions_total{service="vllm",worker="gpu-1"} 1.0' in text
    assert 'aiq_live_workers{tier="gpu"} 1.0' in text
    assert 'aiq_live_workers{tier="cpu"} 1.0' in text
    assert 'aiq_routing_decision_seconds_bucket{le="+Inf"} 1.0' in text
    # On disk is not in memory: the task costs a load, and the hit ratio must show it.
    assert 'aiq_routing_model_loaded_total{result="miss"} 1.0' in text
    assert 'aiq_routing_model_loaded_total{result="hit"} 0.0' in text


def test_metrics_count_hits_in_memory_and_fallbacks(
    app: Celery, client: TestClient, registry: Registry
) -> None:
    registry.publish(
        Heartbeat(
            worker_id="gpu-1",
            loaded_models=("llama3.2",),
            models_in_memory=("llama3.2",),
            services_status={"vllm": "healthy"},
        )
    )
    app.send_task(GENERATE, args=["hi"], kwargs={"model": "llama3.2"})
    app.send_task(OCR, args=["aGk="])  # nobody offers ocr: the shared queue
    fleet_of(app).router.claims.flush()

    text = client.get("/metrics").text
    assert 'aiq_routing_model_loaded_total{result="hit"} 1.0' in text
    assert "aiq_routing_model_hit_ratio 1.0" in text
    assert 'aiq_routing_fallbacks_total{reason="no_worker",service="ocr"} 1.0' in text


def test_docs_and_openapi_without_token(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/healthz", "/api/admin/workers", BROADCAST, "/metrics"} <= set(schema["paths"])
    assert "securitySchemes" not in schema.get("components", {})


# -- broadcast -----------------------------------------------------------------------------


def test_broadcast_unknown_job_type_is_422_with_the_job_error(client: TestClient) -> None:
    response = client.post(BROADCAST, json={"job_type": "nope", "job_data": {}})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("unknown job type 'nope'; known:")
    assert "rag_ingestion" in detail


def test_broadcast_invalid_job_data_is_422_naming_the_field(client: TestClient) -> None:
    response = client.post(BROADCAST, json={"job_type": "warm_model", "job_data": {"model": ""}})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("invalid job_data for 'warm_model': model=''")


def test_broadcast_without_a_capable_live_worker_is_422(
    client: TestClient, registry: Registry
) -> None:
    registry.publish(Heartbeat(worker_id="store-1", tier=3, capabilities=("chromadb",)))
    response = client.post(BROADCAST, json={"job_type": "ping", "job_data": {}})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("no live GPU or CPU worker")
    body = {"job_type": "ping", "job_data": {}, "required_capability": "embeddings"}
    response = client.post(BROADCAST, json=body)
    assert response.status_code == 422
    assert response.json()["detail"] == "no live GPU or CPU worker offers 'embeddings'"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"job_data": {}}, "job_type"),
        ({"job_type": "ping"}, "job_data"),
        ({"job_type": "ping", "job_data": []}, "job_data"),
        ({"job_type": "ping", "job_data": {}, "timeout_s": 0}, "timeout_s"),
        ({"job_type": "ping", "job_data": {}, "timeout_s": 3601}, "timeout_s"),
        ({"job_type": "ping", "job_data": {}, "required_capability": 5}, "required_capability"),
        ({"job_type": "ping", "job_data": {}, "extra": 1}, "extra"),
    ],
)
def test_broadcast_body_errors_name_the_field(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    response = client.post(BROADCAST, json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", field]


@pytest.mark.e2e
def test_broadcast_ping_reaches_a_live_worker(
    client: TestClient,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
) -> None:
    start_worker("api-gpu", tier="gpu", server=fake_server("api-gpu", ["llama3.2"]))
    response = client.post(BROADCAST, json={"job_type": "ping", "job_data": {}, "timeout_s": 30})
    assert response.status_code == 200
    result = response.json()
    assert result["job_type"] == "ping"
    assert (result["broadcasted_to"], result["successful"], result["failed"]) == (1, 1, 0)
    [worker] = result["workers"]
    assert worker["worker_id"] == "api-gpu"
    assert (worker["status"], worker["status_code"]) == ("accepted", 200)
    assert worker["result"] == {"pong": True}
    # The outcome is counted for /metrics.
    metrics = client.get("/metrics").text
    assert 'aiq_broadcast_worker_outcomes_total{job_type="ping",status="accepted"} 1.0' in metrics


# -- authentication ------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), GUARDED)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"],
)
def test_guarded_endpoints_refuse_a_missing_or_wrong_token(
    guarded_client: TestClient, method: str, path: str, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = guarded_client.request(method, path, headers=headers, json={})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert TOKEN not in response.text


def test_a_non_ascii_token_is_refused_not_a_500(guarded_client: TestClient) -> None:
    header = (b"Authorization", "Bearer caf\u00e9".encode("latin-1"))
    response = guarded_client.get("/api/admin/workers", headers=[header])
    assert response.status_code == 401


def test_the_right_token_opens_every_endpoint(guarded_client: TestClient, fleet: None) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/api/admin/workers", "/api/admin/services", "/api/admin/decisions"):
        assert guarded_client.get(path, headers=headers).status_code == 200, path
    assert guarded_client.get("/metrics", headers=headers).status_code == 200
    # Past the token, the body is validated as usual.
    body = {"job_type": "nope", "job_data": {}}
    response = guarded_client.post(BROADCAST, headers=headers, json=body)
    assert response.status_code == 422


def test_the_docs_open_in_a_browser_without_a_token_and_load_nothing_from_a_cdn(
    guarded_client: TestClient,
) -> None:
    for page in ("/docs", "/redoc"):
        html = guarded_client.get(page).text
        scripts = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert scripts, page
        assert all(url.startswith("/") for url in scripts), (page, scripts)
        for url in scripts:
            asset = guarded_client.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 1000, url
    schema = guarded_client.get("/openapi.json").json()
    # The schema names the token scheme (Swagger UI's "Authorize"), never the token.
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert TOKEN not in str(schema)


def test_healthz_needs_no_token(guarded_client: TestClient) -> None:
    response = guarded_client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "redis": True}


@pytest.mark.parametrize("token", ["", "   "])
def test_an_empty_token_is_a_config_error(app: Celery, token: str) -> None:
    with pytest.raises(ConfigError, match="COORDINATOR_API_TOKEN is empty"):
        create_api(app, token=token)


# -- Redis down ----------------------------------------------------------------------------


def test_healthz_is_503_when_redis_is_down(dead_client: TestClient) -> None:
    response = dead_client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "redis": False}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/admin/workers"),
        ("GET", "/api/admin/services"),
        ("GET", "/api/admin/decisions"),
        ("GET", "/metrics"),
        ("POST", BROADCAST),
    ],
)
def test_admin_endpoints_are_503_when_the_registry_is_down(
    dead_client: TestClient, method: str, path: str
) -> None:
    body = {"job_type": "ping", "job_data": {}} if method == "POST" else None
    response = dead_client.request(method, path, json=body)
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert detail.startswith("registry unreachable: redis://:***@127.0.0.1:")
    assert "hunter2" not in response.text


# -- serve ---------------------------------------------------------------------------------


@pytest.fixture
def fake_uvicorn(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace ``uvicorn.run`` so no server starts; records each call."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda api, **kw: calls.append({"api": api, **kw}))
    return calls


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "coordinator.internal"])
def test_serve_refuses_a_non_loopback_host_without_a_token(
    settings: CoordinatorSettings, fake_uvicorn: list[dict[str, Any]], host: str
) -> None:
    with pytest.raises(ConfigError, match="COORDINATOR_API_TOKEN") as excinfo:
        serve(settings, host=host, port=free_port())
    assert repr(host) in str(excinfo.value)
    assert fake_uvicorn == []


def test_serve_without_a_token_on_loopback_warns(
    settings: CoordinatorSettings,
    fake_uvicorn: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="coordinator.ops.api"):
        serve(settings, host="127.0.0.1", port=8089)
    assert "serving without a token, loopback only" in caplog.text
    [call] = fake_uvicorn
    assert (call["host"], call["port"]) == ("127.0.0.1", 8089)
    with TestClient(call["api"]) as test_client:
        assert test_client.get("/api/admin/workers").status_code == 200


def test_serve_with_a_token_from_the_environment_binds_anywhere(
    settings: CoordinatorSettings,
    fake_uvicorn: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("COORDINATOR_API_TOKEN", TOKEN)
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("NAMESPACE", settings.namespace)
    from_env = CoordinatorSettings()
    assert from_env.coordinator_api_token is not None
    assert from_env.coordinator_api_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(from_env)
    with caplog.at_level(logging.DEBUG):
        serve(from_env, host="0.0.0.0", port=8089)
    assert TOKEN not in caplog.text
    [call] = fake_uvicorn
    assert call["host"] == "0.0.0.0"
    with TestClient(call["api"]) as test_client:
        assert test_client.get("/api/admin/workers").status_code == 401
        assert test_client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
