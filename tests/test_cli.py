"""The ``coordinator`` command line, run in process against a real Redis (and, for broadcast,
a real worker). Settings come from the environment, as in production."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery import Celery

from coordinator.cli import main
from coordinator.core.heartbeat import Heartbeat
from coordinator.core.settings import CoordinatorSettings
from coordinator.dispatch.app import create_app, fleet_of
from coordinator.fleet.registry import Registry
from coordinator.routing import CostPolicy, SeedPolicy
from coordinator.routing.seed import FACTORS
from coordinator.sim.servers.ollama import SimulatedModelServer
from tests.conftest import (
    ROOT,
    SCENARIO_1,
    WorkerFactory,
    declare_builtin_tasks,
    free_port,
    wait_for,
)
from tests.test_router import queued_task_names

OCR, GENERATE, EMBED = "worker_tasks.ocr", "worker_tasks.generate", "worker_tasks.embed"
SECRET = "s3cret-Pa55word"  # noqa: S105 - a made-up password that must not leak

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(
    monkeypatch: pytest.MonkeyPatch,
    settings: CoordinatorSettings,
    capsys: pytest.CaptureFixture[str],
) -> Run:
    """``main(argv)`` with this test's Redis and namespace in the environment; returns
    the exit code, stdout and stderr."""
    for name in ("REGISTRY_URL", "SCORE_WEIGHTS", "ROUTING_POLICY", "REDIS_TIMEOUT_S", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("NAMESPACE", settings.namespace)
    capsys.readouterr()

    def invoke(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


@pytest.fixture
def lasting(registry: Registry) -> Registry:
    """The test's registry with a TTL that outlives a slow test (the fixture's is 2 s), and
    the built-in tasks declared as a starting worker declares them."""
    declare_builtin_tasks(registry)
    return Registry(registry.client, registry.keys, ttl_s=120)


@pytest.fixture
def scenario_1(lasting: Registry) -> Registry:
    """The design's scenario 1 (tests.conftest.SCENARIO_1), with a long TTL."""
    for heartbeat in SCENARIO_1:
        lasting.publish(heartbeat)
    return lasting


def embedder(worker_id: str = "cpu-3", status: str = "healthy") -> Heartbeat:
    """A CPU worker offering only embeddings, with its model in memory."""
    return Heartbeat.model_validate(
        {
            "worker_id": worker_id,
            "tier": 2,
            "status": status,
            "current_load": 0.5,
            "gpu_utilization": 40.0,
            "loaded_models": ["nomic-embed-text", "bge-m3"],
            "models_in_memory": ["nomic-embed-text"],
            "services_status": {"embeddings": "healthy"},
        }
    )


def test_workers_table_shows_models_load_and_services(
    run: Run, scenario_1: Registry, registry: Registry
) -> None:
    scenario_1.publish(embedder())
    registry.claim_many({"gpu-2": ["a", "b", "c"]}, [], keep=0)
    code, out, err = run("workers")
    assert (code, err) == (0, "")
    assert "3 live workers" in out
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│")}
    assert set(rows) == {"gpu-1", "gpu-2", "cpu-3"}
    assert all(word in rows["gpu-1"] for word in ("gpu", "healthy", "ocr", "llama-vision", "20"))
    assert "2/3" in rows["gpu-2"]  # active requests / in flight
    assert "nomic-embed-text*, bge-m3" in rows["cpu-3"]  # in memory first, marked
    assert "embeddings (healthy)" in rows["cpu-3"]
    assert "40" in rows["cpu-3"]  # GPU %
    assert "in memory" in out


def test_workers_say_why_a_service_is_down(run: Run, registry: Registry) -> None:
    registry.publish(
        Heartbeat(
            worker_id="w-1",
            services_status={"vllm": "unhealthy", "ocr": "healthy"},
            service_errors={"vllm": "OLLAMA_URL http://10.0.0.5:11434: ConnectError: refused"},
        )
    )
    registry.mark_unreachable("w-1", "ocr", 60.0, "http://10.0.0.5:9000/ocr: ReadTimeout")
    code, out, _ = run("workers", "--json")
    assert code == 0
    (worker,) = json.loads(out)
    assert worker["service_errors"] == {
        "vllm": "OLLAMA_URL http://10.0.0.5:11434: ConnectError: refused",
        "ocr": "http://10.0.0.5:9000/ocr: ReadTimeout",
    }
    code, out, _ = run("workers")
    flat = " ".join(out.split())  # the table wraps long cells
    assert "OLLAMA_URL http://10.0.0.5:11434" in flat
    assert "ReadTimeout" in flat


def test_workers_json_is_the_admin_view(run: Run, scenario_1: Registry, registry: Registry) -> None:
    registry.claim_many({"gpu-2": ["a", "b", "c"]}, [], keep=0)
    code, out, _ = run("workers", "--json")
    assert code == 0
    workers = json.loads(out)
    assert [w["worker_id"] for w in workers] == ["gpu-1", "gpu-2"]
    gpu_2 = workers[1]
    assert (gpu_2["tier_name"], gpu_2["active_requests"], gpu_2["in_flight"]) == ("gpu", 2, 3)
    assert gpu_2["loaded_models"] == ["llama3.2"]
    assert gpu_2["current_load"] == pytest.approx(0.15)


def test_services_table_and_json(run: Run, scenario_1: Registry) -> None:
    scenario_1.publish(embedder())
    code, out, _ = run("services")
    assert code == 0
    assert "3 services" in out
    assert any("ocr" in line and "gpu-1, gpu-2" in line for line in out.splitlines())
    code, out, _ = run("services", "--json")
    assert code == 0
    services = {s["name"]: s for s in json.loads(out)}
    assert sorted(services) == ["embeddings", "ocr", "vllm"]
    assert services["ocr"] == {
        "name": "ocr",
        "worker_count": 2,
        "healthy_count": 0,
        "workers": ["gpu-1", "gpu-2"],
    }
    assert services["embeddings"]["healthy_count"] == 1


def test_decisions_table_and_json(
    run: Run, scenario_1: Registry, app: Celery, settings: CoordinatorSettings
) -> None:
    app.send_task(OCR, args=["aGk="])
    app.send_task(EMBED, args=[["text"]])  # nobody offers embeddings: shared queue
    fleet_of(app).router.claims.flush()
    code, out, _ = run("decisions", "--json")
    assert code == 0
    newest, oldest = json.loads(out)
    assert (newest["task"], newest["outcome"], newest["worker_id"]) == (
        EMBED,
        "fallback_no_worker",
        None,
    )
    assert newest["queue"] == settings.keys.service_queue("embeddings")
    assert (oldest["task"], oldest["model"], oldest["worker_id"]) == (OCR, "llama-vision", "gpu-1")
    assert (oldest["policy"], oldest["unit"], oldest["unnamed"]) == ("cost", CostPolicy.unit, None)
    # The default (cost) policy's breakdowns, named: llama-vision is on gpu-1's disk (a
    # load of the default 4 GB at 1 GB/s), and nowhere on gpu-2 (a download of it at the
    # default 100 MB/s), which has two requests of the default 1 s ahead.
    best, second = oldest["candidates"]
    assert [best["worker_id"], second["worker_id"]] == ["gpu-1", "gpu-2"]
    assert (best["state"], best["queue_s"], best["load_s"], best["download_s"]) == (
        "disk",
        0.0,
        4.0,
        0.0,
    )
    assert (second["state"], second["queue_s"], second["download_s"]) == ("absent", 2.0, 40.0)
    assert set(best) == {"worker_id", *CostPolicy.factors}
    code, out, _ = run("decisions", "--limit", "1", "--json")
    assert [d["task"] for d in json.loads(out)] == [EMBED]
    code, out, _ = run("decisions")
    assert code == 0
    ocr_row = next(line for line in out.splitlines() if OCR in line)
    total = f"{best['total']:.2f}"
    for word in ("llama-vision", "routed", "cost", "gpu-1", total, "gpu-2 ("):
        assert word in ocr_row
    assert f"cost totals: {CostPolicy.unit}" in out
    embed_row = next(line for line in out.splitlines() if EMBED in line)
    assert f"({settings.keys.service_queue('embeddings')})" in embed_row


@pytest.mark.parametrize("policy", [SeedPolicy.name, CostPolicy.name])
@pytest.mark.parametrize(
    ("task", "options", "kwargs", "expected"),
    [
        (OCR, [], None, "gpu-1"),
        (GENERATE, ["--model", "llama3.2:latest"], {"model": "llama3.2:latest"}, "gpu-2"),
    ],
)
def test_explain_matches_the_routers_choice(
    run: Run,
    monkeypatch: pytest.MonkeyPatch,
    scenario_1: Registry,
    settings: CoordinatorSettings,
    redis_conn: redis.Redis,
    policy: str,
    task: str,
    options: list[str],
    kwargs: dict[str, Any] | None,
    expected: str,
) -> None:
    monkeypatch.setenv("ROUTING_POLICY", policy)
    code, out, _ = run("explain", task, *options, "--json")
    assert code == 0
    report = json.loads(out)
    assert (report["winner"], report["policy"]) == (expected, policy)
    totals = [c["total"] for c in report["candidates"]]
    assert totals == sorted(totals, reverse=policy == SeedPolicy.name)
    if policy == SeedPolicy.name:
        assert all(set(FACTORS) <= set(c) for c in report["candidates"])
        assert all(c["tiebreak"] == 0 for c in report["candidates"])
    else:
        assert all(set(CostPolicy.factors) <= set(c) for c in report["candidates"])
        assert report["candidates"][0]["state"] == "disk"
    # The real router, with its random tiebreak, sends the task where explain said.
    app = create_app(settings.model_copy(update={"routing_policy": policy}), main="explained")
    try:
        app.send_task(task, args=["aGk="], kwargs=kwargs)
    finally:
        fleet_of(app).close()
    assert queued_task_names(redis_conn, report["queue"]) == [task]


def test_explain_table_shows_every_factor_and_the_winner(
    run: Run, monkeypatch: pytest.MonkeyPatch, scenario_1: Registry, settings: CoordinatorSettings
) -> None:
    monkeypatch.setenv("ROUTING_POLICY", "seed")
    scenario_1.publish(embedder())
    scenario_1.publish(Heartbeat(worker_id="leaving", status="draining", capabilities=("ocr",)))
    code, out, _ = run("explain", OCR)
    assert code == 0
    assert "service ocr, model llama-vision" in out
    for factor in FACTORS:
        assert factor.replace("_", " ") in out
    gpu_1 = next(line for line in out.splitlines() if "│ gpu-1" in line)
    cells = [cell.strip() for cell in gpu_1.split("│")[3:12]]
    assert cells == ["100.0", "50.0", "30.0", "0.0", "-6.0", "0.0", "0.0", "0.0", "174.0"]
    queue = settings.keys.worker_queue("gpu-1")
    assert f"winner: gpu-1 with 174.0 points -> queue {queue}" in out
    assert "not eligible: cpu-3 (does not offer ocr)" in out
    assert "not eligible: leaving (status draining)" in out
    assert "tiebreak" not in out.split("winner:")[1]  # 174 vs 15.5 is no close call


def test_explain_warns_when_the_tiebreak_can_decide(
    run: Run, monkeypatch: pytest.MonkeyPatch, lasting: Registry
) -> None:
    monkeypatch.setenv("ROUTING_POLICY", "seed")
    lasting.publish(embedder("cpu-a"))
    lasting.publish(embedder("cpu-b"))
    code, out, _ = run("explain", EMBED)
    assert code == 0
    assert "within the router's random tiebreak (0-5 points)" in out
    _, out, _ = run("explain", EMBED, "--json")
    assert json.loads(out)["too_close_to_call"] is True


def test_explain_table_of_the_cost_policy_shows_its_estimates_and_states(
    run: Run, scenario_1: Registry, lasting: Registry, settings: CoordinatorSettings
) -> None:
    """The default policy: gpu-2 holds llama3.2 in memory, gpu-1 is loading it (a lease
    due in 10 s) and gpu-3 has it on disk; the table names each state and estimate."""
    lasting.publish(SCENARIO_1[1].model_copy(update={"models_in_memory": ("llama3.2",)}))
    lasting.publish(
        SCENARIO_1[0].model_copy(update={"worker_id": "gpu-3", "models_on_disk": ("llama3.2",)})
    )
    now = time.time()
    lasting.acquire_lease("llama3.2", "gpu-1", now + 10, now + 60, frozenset(), now)
    code, out, _ = run("explain", GENERATE)
    assert code == 0
    assert f"policy cost: {CostPolicy.unit}" in out
    for factor in CostPolicy.factors:
        assert factor.replace("_", " ") in out
    rows = {line.split("│")[2].strip(): line for line in out.splitlines() if "│ gpu-" in line}
    cells = {worker: [c.strip() for c in line.split("│")[3:-1]] for worker, line in rows.items()}
    assert cells["gpu-2"][:2] == ["memory", "2.00"]  # two requests of 1 s ahead
    assert cells["gpu-1"][0] == "loading"
    assert 9.0 < float(cells["gpu-1"][1]) <= 10.0  # waits for the load under way
    assert cells["gpu-3"][:4] == ["disk", "0.00", "0.00", "4.00"]
    _, as_json, _ = run("explain", GENERATE, "--json")
    report = json.loads(as_json)
    assert (report["policy"], report["unit"], report["winner"]) == (
        "cost",
        CostPolicy.unit,
        "gpu-2",
    )
    total = report["candidates"][0]["total"]
    queue = settings.keys.worker_queue("gpu-2")
    assert f"winner: gpu-2 with {total:.2f} estimated seconds to serve -> queue {queue}" in out
    assert {c["worker_id"]: c["state"] for c in report["candidates"]} == {
        "gpu-1": "loading",
        "gpu-2": "memory",
        "gpu-3": "disk",
    }


def test_explain_without_a_capable_worker_names_the_shared_queue(
    run: Run, lasting: Registry, settings: CoordinatorSettings
) -> None:
    lasting.publish(embedder())
    queue = settings.keys.service_queue("ocr")
    code, out, err = run("explain", OCR)
    assert (code, err) == (0, "")
    assert "no live worker can run worker_tasks.ocr" in out
    assert queue in out
    code, out, _ = run("explain", OCR, "--json")
    report = json.loads(out)
    assert (code, report["winner"], report["queue"], report["candidates"]) == (0, None, queue, [])


def test_explain_an_unknown_task_exits_2_listing_the_known_ones(
    run: Run, lasting: Registry
) -> None:
    code, out, err = run("explain", "worker_tasks.nope")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert "unknown task 'worker_tasks.nope'" in err
    assert all(name in err for name in (OCR, GENERATE, EMBED))


@pytest.mark.parametrize(
    "argv",
    [["workers"], ["services", "--json"], ["decisions"], ["explain", OCR]],
    ids=lambda argv: argv[0],
)
def test_unreachable_redis_is_one_line_and_exit_1(
    run: Run, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("REDIS_URL", url)
    code, out, err = run(*argv)
    assert (code, out) == (1, "")
    assert err.count("\n") == 1
    assert f"cannot reach Redis at {url}: " in err
    assert "Traceback" not in err


def test_a_password_in_redis_url_never_appears(
    run: Run, monkeypatch: pytest.MonkeyPatch, scenario_1: Registry, settings: CoordinatorSettings
) -> None:
    port = free_port()
    monkeypatch.setenv("REDIS_URL", f"redis://:{SECRET}@127.0.0.1:{port}/0")
    code, out, err = run("workers")
    assert code == 1
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0" in err
    assert SECRET not in out + err
    # Against the real server too, whatever it makes of the password.
    monkeypatch.setenv("REDIS_URL", settings.redis_url.replace("://", f"://:{SECRET}@", 1))
    for argv in (["workers"], ["explain", OCR], ["decisions", "--json"], ["services"]):
        code, out, err = run(*argv)
        assert code in (0, 1)
        assert SECRET not in out + err


def test_a_bad_setting_exits_2_naming_it(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEARTBEAT_INTERVAL_S", "-1")
    code, out, err = run("workers")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert "HEARTBEAT_INTERVAL_S='-1'" in err


@pytest.mark.parametrize(
    "argv", [[], ["nope"], ["decisions", "--limit", "0"], ["broadcast", "ping"], ["explain"]]
)
def test_usage_errors_exit_2(run: Run, argv: list[str]) -> None:
    code, _, err = run(*argv)
    assert code == 2
    assert "usage: coordinator" in err


def test_broadcast_of_an_unknown_job_type_exits_2_and_sends_nothing(
    run: Run, tmp_path: Path, redis_conn: redis.Redis, settings: CoordinatorSettings
) -> None:
    data = tmp_path / "data.json"
    data.write_text("{}")
    code, out, err = run("broadcast", "nope", "--data", str(data))
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert "unknown job type 'nope'" in err
    assert list(redis_conn.scan_iter(match=f"{settings.namespace}.*")) == []


@pytest.mark.parametrize(
    ("stdin", "message"),
    [("[1, 2", "cannot read --data -"), ("[1, 2]", "must hold a JSON object")],
)
def test_broadcast_with_unusable_data_exits_2(
    run: Run, monkeypatch: pytest.MonkeyPatch, stdin: str, message: str
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code, out, err = run("broadcast", "ping", "--data", "-")
    assert (code, out) == (2, "")
    assert message in err


@pytest.mark.e2e
def test_broadcast_ping_to_a_real_worker(
    run: Run,
    tmp_path: Path,
    start_worker: WorkerFactory,
    fake_server: Callable[..., SimulatedModelServer],
) -> None:
    start_worker("cli-gpu", tier="gpu", server=fake_server("cli-box", ["llama3.2"]))
    data = tmp_path / "data.json"
    data.write_text("{}")
    code, out, err = run("broadcast", "ping", "--data", str(data), "--timeout", "30", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["job_type"], result["broadcasted_to"], result["successful"]) == ("ping", 1, 1)
    [worker] = result["workers"]
    assert (worker["worker_id"], worker["status"], worker["status_code"]) == (
        "cli-gpu",
        "accepted",
        200,
    )
    assert worker["result"] == {"pong": True}
    code, out, _ = run("broadcast", "ping", "--data", str(data), "--timeout", "30")
    assert code == 0
    row = next(line for line in out.splitlines() if "cli-gpu" in line)
    assert all(word in row for word in ("accepted", "200", '{"pong": true}'))
    assert "aggregated:" in out


def test_python_dash_m_coordinator() -> None:
    def python_m(*argv: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "coordinator", *argv]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)

    helped = python_m("--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("workers", "services", "decisions", "explain", "broadcast", "serve", "demo"):
        assert command in helped.stdout
    unknown = python_m("explain", "nope")
    assert unknown.returncode == 2
    assert "unknown task 'nope'" in unknown.stderr


def test_serve_answers_on_loopback_and_stops(settings: CoordinatorSettings) -> None:
    """``coordinator serve`` as operators run it: a real uvicorn process."""
    port = free_port()
    env = {**os.environ, "REDIS_URL": settings.redis_url, "NAMESPACE": settings.namespace}
    env.pop("COORDINATOR_API_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 30.0, "coordinator serve to answer /healthz")
        workers = httpx.get(f"http://127.0.0.1:{port}/api/admin/workers", timeout=5)
        assert workers.json() == {"workers": []}
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert "loopback only" in output


def test_a_redis_url_without_a_scheme_is_one_line_naming_it(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "localhost:6379")
    code, out, err = run("workers")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert "REDIS_URL='localhost:6379'" in err
    assert "redis://" in err


def test_serving_beyond_loopback_without_a_token_is_one_line(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COORDINATOR_API_TOKEN", raising=False)
    code, out, err = run("serve", "--host", "0.0.0.0")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert "COORDINATOR_API_TOKEN" in err


def test_a_reader_that_leaves_early_is_no_error(
    lasting: Registry, settings: CoordinatorSettings
) -> None:
    for n in range(300):  # far more JSON than a pipe holds
        lasting.publish(Heartbeat(worker_id=f"w{n:03}", services_status={"vllm": "healthy"}))
    env = {**os.environ, "REDIS_URL": settings.redis_url, "NAMESPACE": settings.namespace}
    command = [sys.executable, "-m", "coordinator", "workers", "--json"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stderr is not None
    assert proc.stdout.read(10)  # like `| head -c 10`, then gone
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""
