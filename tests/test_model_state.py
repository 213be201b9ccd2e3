"""The per-model state workers report for cost-aware routing: sizes, least recently used
order, eviction, task times and load bandwidth, from the probes to the heartbeat."""

from __future__ import annotations

import json
import math
import multiprocessing
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery

from coordinator.core.heartbeat import MAX_HEARTBEAT_BYTES, Heartbeat
from coordinator.core.settings import CoordinatorSettings, Endpoint, WorkerSettings
from coordinator.fleet.registry import Registry
from coordinator.sim.servers.ollama import SimulatedModelServer, _model_entry
from tests.conftest import ROOT, WorkerFactory, free_port, wait_for
from worker_tasks.heartbeat_sender import HeartbeatSender
from worker_tasks.model_servers.base import ServerState
from worker_tasks.model_servers.ollama import OllamaBackend
from worker_tasks.model_stats import ModelStats, answer_times
from worker_tasks.probes import probe_services
from worker_tasks.tasks import generate

GB = 1_000_000_000


def size_of(model: str) -> int:
    """The size the simulated server reports for ``model``."""
    return int(_model_entry(model)["size"])


@pytest.fixture
def servers() -> Iterator[list[SimulatedModelServer]]:
    """Simulated servers a test configures itself; all are stopped at teardown."""
    started: list[SimulatedModelServer] = []
    yield started
    for server in started:
        server.stop()


def serve(servers: list[SimulatedModelServer], *args: Any, **kwargs: Any) -> SimulatedModelServer:
    server = SimulatedModelServer(*args, **kwargs).start()
    servers.append(server)
    return server


def use(server: SimulatedModelServer, model: str) -> dict[str, Any]:
    answer = httpx.post(
        f"{server.url}/api/generate",
        json={"model": model, "prompt": "hi", "stream": False},
        timeout=10,
    )
    answer.raise_for_status()
    body: dict[str, Any] = answer.json()
    return body


def ps_names(server: SimulatedModelServer) -> list[str]:
    models = httpx.get(f"{server.url}/api/ps", timeout=10).json()["models"]
    return [m["name"].removesuffix(":latest") for m in models]


# --- the simulated server -----------------------------------------------------------------


def test_ps_lists_the_most_recently_used_first_like_ollama(
    servers: list[SimulatedModelServer],
) -> None:
    server = serve(servers, "s", ["a", "b", "c"], models_in_memory=["a", "b"])
    assert ps_names(server) == ["b", "a"]
    use(server, "a")
    assert ps_names(server) == ["a", "b"]


def test_max_loaded_evicts_the_least_recently_used(servers: list[SimulatedModelServer]) -> None:
    server = serve(servers, "s", ["a", "b", "c"], models_in_memory=["a", "b"], max_loaded=2)
    use(server, "a")  # b is now the least recently used
    assert use(server, "c")["load_duration"] > 0
    assert sorted(server.loaded_models()) == ["a", "c"]
    assert ps_names(server) == ["c", "a"]
    use(server, "b")  # evicts a, used before c
    assert sorted(server.loaded_models()) == ["b", "c"]


def test_without_max_loaded_nothing_is_evicted(servers: list[SimulatedModelServer]) -> None:
    server = serve(servers, "s", ["a", "b", "c"], models_in_memory=["a"])
    use(server, "b")
    use(server, "c")
    assert sorted(server.loaded_models()) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_loaded": 0}, "max_loaded"),
        ({"max_loaded": 1, "models_in_memory": ["a", "b"]}, "max_loaded=1"),
        ({"load_bps": 0.0}, "load_bps"),
        ({"load_bps": math.nan}, "load_bps"),
    ],
)
def test_bad_simulator_settings_are_refused(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        SimulatedModelServer("s", ["a", "b"], **kwargs)


def test_load_bps_sets_the_reported_load_duration_without_sleeping(
    servers: list[SimulatedModelServer],
) -> None:
    server = serve(servers, "s", ["a"], load_bps=100 * GB)
    first = use(server, "a")
    simulated_ns = size_of("a") / (100 * GB) * 1e9
    assert simulated_ns <= first["load_duration"] < simulated_ns + 0.5e9
    assert first["total_duration"] >= first["load_duration"]
    assert use(server, "a")["load_duration"] < simulated_ns  # in memory now


def test_the_max_loaded_and_load_bps_flags(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "coordinator.sim.servers.ollama", "--name", "s"]
    command += ["--models", "a,b", "--loaded", "a", "--port", str(port)]
    command += ["--max-loaded", "1", "--load-bps", str(100 * GB)]
    with (tmp_path / "out").open("wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: b"READY" in (tmp_path / "out").read_bytes(), 10.0, "READY")
        answer = httpx.post(f"{url}/api/embed", json={"model": "b", "input": "x"}, timeout=5)
        assert answer.json()["load_duration"] >= size_of("b") / (100 * GB) * 1e9
        models = httpx.get(f"{url}/api/ps", timeout=5).json()["models"]
        assert [m["name"] for m in models] == ["b:latest"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    for bad in (["--max-loaded", "0"], ["--load-bps", "-5"]):
        refused = subprocess.run(
            [*command[:5], *bad], cwd=ROOT, capture_output=True, timeout=30, check=False
        )
        assert refused.returncode == 2
        assert bad[0].lstrip("-").replace("-", "_").encode() in refused.stderr


# --- probes ----------------------------------------------------------------------------


def probe_ollama(client: httpx.Client, url: str) -> ServerState:
    return OllamaBackend().probe(client, Endpoint("vllm", url, "ollama"))


def test_probes_report_sizes_and_least_recently_used_first(
    servers: list[SimulatedModelServer],
) -> None:
    server = serve(servers, "s", ["a", "b", "c"], models_in_memory=["b", "a"])
    use(server, "b")
    with httpx.Client(timeout=5) as client:
        state = probe_ollama(client, server.url)
        probed = probe_services(client, WorkerSettings(ollama_url=server.url))
    assert ps_names(server) == ["b", "a"]
    assert state.in_memory == ("a", "b")  # a's expires_at is the earliest
    assert state.sizes == {m: size_of(m) for m in "abc"}
    assert set(state.on_disk) == {"a", "b", "c"}
    assert probed.models_in_memory == ("a", "b")
    assert probed.model_bytes == {m: size_of(m) for m in "abc"}


def ps_entry(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": f"{name}:latest", "model": f"{name}:latest", **fields}


GOOD_A = ps_entry("a", size=3 * GB, size_vram=3 * GB, expires_at="2030-01-01T00:00:02Z")
GOOD_B = ps_entry("b", size=2 * GB, expires_at="2030-01-01T00:00:01.5-00:00")
AB_SIZES = {"a": 3 * GB, "b": 2 * GB}


@pytest.mark.parametrize(
    ("models", "in_memory", "sizes"),
    [
        # Sizes as strings or otherwise odd are unknown; the models are still in memory.
        (
            [ps_entry("a", size="3000"), ps_entry("b", size=-1), ps_entry("c", size=True)],
            ("a", "b", "c"),
            {},
        ),
        ([ps_entry("a", size=1e300), ps_entry("b", size=2.5e9)], ("a", "b"), {"b": 2_500_000_000}),
        # Missing or malformed fields: an entry without a usable name is skipped.
        ([{}, {"size": 5}, ps_entry("a"), {"name": 7, "model": "b"}], ("a", "b"), {}),
        ([GOOD_A, "junk", 42, None, ["x"], {"name": "x" * 200}], ("a",), {"a": 3 * GB}),
        # Unknown expiry sorts last; the others by expires_at, earliest first.
        ([ps_entry("c", expires_at="soon"), GOOD_A, GOOD_B], ("b", "a", "c"), AB_SIZES),
        ([ps_entry("c", expires_at=12), GOOD_B, GOOD_A], ("b", "a", "c"), AB_SIZES),
    ],
)
def test_malformed_ps_entries_are_skipped_never_raised(
    servers: list[SimulatedModelServer],
    models: list[Any],
    in_memory: tuple[str, ...],
    sizes: dict[str, int],
) -> None:
    server = serve(servers, "s", ["a", "b", "c"])
    server.garble("/api/ps", json.dumps({"models": models}))
    with httpx.Client(timeout=5) as client:
        state = probe_ollama(client, server.url)
    assert state.healthy
    assert state.in_memory == in_memory
    tags_sizes = {m: size_of(m) for m in "abc"}
    assert state.sizes == tags_sizes  # /api/tags's size wins where it has one
    # What /api/ps alone says:
    server.garble("/api/tags", json.dumps({"models": []}))
    with httpx.Client(timeout=5) as client:
        assert probe_ollama(client, server.url).sizes == sizes


@pytest.mark.parametrize(
    "body", ['{"models": "a"}', "[]", "null", '{"models": [{"name": NaN, "size": NaN}]}', "{"]
)
def test_a_malformed_ps_answer_leaves_nothing_in_memory(
    servers: list[SimulatedModelServer], body: str
) -> None:
    server = serve(servers, "s", ["a"], models_in_memory=["a"])
    server.garble("/api/ps", body)
    with httpx.Client(timeout=5) as client:
        state = probe_ollama(client, server.url)
    assert state.in_memory == ()
    if state.healthy:  # broken JSON makes the service unhealthy instead
        assert state.on_disk == ("a",)


# --- model statistics ------------------------------------------------------------------


@pytest.fixture
def stats() -> Iterator[ModelStats]:
    model_stats = ModelStats(alpha=0.5)
    yield model_stats
    model_stats.close()


def test_service_time_is_an_exponentially_weighted_mean_per_model(stats: ModelStats) -> None:
    assert stats.service_s() == {}
    assert stats.mean_service_s() is None
    stats.record("a", 1.0)
    stats.record("a:latest", 3.0)  # the same model
    assert stats.service_s() == {"a": 2.0}
    stats.record("b", 10.0)
    stats.record("a", 4.0)
    assert stats.service_s() == {"a": 3.0, "b": 10.0}
    # Over all calls, in order: 1, 3 -> 2; 10 -> 6; 4 -> 5.
    assert stats.mean_service_s() == 5.0


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, -math.inf, 86_401.0, None])
def test_service_times_that_are_not_finite_and_positive_are_ignored(
    stats: ModelStats, bad: float | None
) -> None:
    stats.record("a", bad)
    assert stats.service_s() == {}
    stats.record("a", 2.0)
    stats.record("a", bad)
    assert stats.service_s() == {"a": 2.0}
    assert stats.mean_service_s() == 2.0


def test_load_bandwidth_weighs_bytes_and_seconds(stats: ModelStats) -> None:
    stats.sizes = {"big": 4 * GB, "small": 1 * GB}
    assert stats.load_bps() is None
    stats.record("big", 1.0, load_s=2.0)
    assert stats.load_bps() == 2 * GB
    stats.record("small", 1.0, load_s=1.0)
    # Means of bytes (2.5 GB) and of seconds (1.5 s), not of rates (1.5 GB/s).
    assert stats.load_bps() == pytest.approx(2.5 * GB / 1.5)


@pytest.mark.parametrize(
    ("model", "load_s"),
    [
        ("big", 0.01),  # too short to be a load: the model was in memory
        ("unknown", 2.0),  # no size known
        ("big", math.nan),
        ("big", math.inf),
        ("big", -2.0),
        ("big", None),
        ("zero", 2.0),  # a size of 0 is no size
    ],
)
def test_loads_that_say_nothing_about_bandwidth_are_ignored(
    stats: ModelStats, model: str, load_s: float | None
) -> None:
    stats.sizes = {"big": 4 * GB, "zero": 0}
    stats.record(model, 1.0, load_s=load_s)
    assert stats.load_bps() is None


def test_only_the_most_recent_models_are_kept() -> None:
    stats = ModelStats(max_models=3)
    try:
        for name in ("a", "b", "c", "a", "d"):
            stats.record(name, 1.0)
        assert list(stats.service_s()) == ["c", "a", "d"]
    finally:
        stats.close()


@pytest.mark.parametrize(
    ("answer", "wall_s", "expected"),
    [
        ({"total_duration": 3_000_000_000, "load_duration": 1_000_000_000}, 9.0, (2.0, 1.0)),
        ({"total_duration": 3_000_000_000}, 9.0, (3.0, None)),
        ({"load_duration": 1_000_000_000}, 9.0, (8.0, 1.0)),  # no total: the wall time
        ({}, 9.0, (9.0, None)),
        ({"total_duration": 1_000_000_000, "load_duration": 2_000_000_000}, 9.0, (7.0, 2.0)),
        ({"total_duration": "3", "load_duration": True}, 9.0, (9.0, None)),
        ({"total_duration": -5, "load_duration": math.nan}, 9.0, (9.0, None)),
    ],
)
def test_answer_times_read_ollama_durations(
    answer: dict[str, Any], wall_s: float, expected: tuple[float, float | None]
) -> None:
    assert answer_times(answer, wall_s) == expected


def _record_in_child(stats: ModelStats) -> None:
    stats.record("a", 4.0, load_s=2.0)
    stats.record("a", 2.0)


def test_samples_recorded_in_a_forked_child_reach_the_owner(stats: ModelStats) -> None:
    """What a prefork pool child records is read where the heartbeat is built."""
    stats.sizes = {"a": 4 * GB}
    child = multiprocessing.get_context("fork").Process(target=_record_in_child, args=(stats,))
    child.start()
    child.join(timeout=10)
    assert child.exitcode == 0
    assert stats.service_s() == {"a": 3.0}
    assert stats.load_bps() == 2 * GB


def test_closing_twice_and_reading_after_close_are_harmless() -> None:
    stats = ModelStats()
    stats.close()
    stats.close()
    stats.record("a", 1.0)
    assert stats.service_s() == {"a": 1.0}


# --- the heartbeat -----------------------------------------------------------------------


SenderFactory = Callable[..., HeartbeatSender]


@pytest.fixture
def sender_for(
    settings: CoordinatorSettings, registry: Registry, stats: ModelStats
) -> Iterator[SenderFactory]:
    """Heartbeat senders of worker ``w1`` on a given server, not started; stopped at the end."""
    senders: list[HeartbeatSender] = []

    def make(server: SimulatedModelServer, **worker: Any) -> HeartbeatSender:
        worker_settings = WorkerSettings(
            redis_url=settings.redis_url,
            namespace=settings.namespace,
            worker_id="w1",
            ollama_url=server.url,
            embeddings_url=server.url,
            ocr_url=server.url,
            probe_timeout_s=2.0,
            **worker,
        )
        sender = HeartbeatSender(
            settings=worker_settings,
            registry=registry,
            tier="gpu",
            queue="q",
            active_requests=lambda: 0,
            stats=stats,
        )
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        sender.stop(deregister=True)


def published(registry: Registry) -> Heartbeat:
    (heartbeat,) = registry.live_workers()
    return heartbeat


def test_the_heartbeat_carries_the_model_state(
    servers: list[SimulatedModelServer],
    sender_for: SenderFactory,
    registry: Registry,
    stats: ModelStats,
) -> None:
    server = serve(servers, "s", ["a", "b", "c"], models_in_memory=["a", "b"], max_loaded=2)
    sender = sender_for(server, worker_model_slots=2, worker_download_bps=5e7)
    sender.refresh_probes()
    stats.record("a", 0.5, load_s=2.0)
    assert sender.beat() is not None
    heartbeat = published(registry)
    assert heartbeat.model_bytes == {m: size_of(m) for m in "abc"}
    assert heartbeat.service_s == {"a": 0.5}
    assert heartbeat.mean_service_s == 0.5
    assert heartbeat.load_bps == size_of("a") / 2.0
    assert heartbeat.model_slots == 2
    assert heartbeat.download_bps == 5e7
    assert heartbeat.would_evict == "a"
    use(server, "a")
    sender.refresh_probes()
    sender.beat()
    assert published(registry).would_evict == "b"


def test_no_victim_while_there_is_room_or_no_slot_count(
    servers: list[SimulatedModelServer],
    sender_for: SenderFactory,
    registry: Registry,
    stats: ModelStats,
) -> None:
    server = serve(servers, "s", ["a", "b"], models_in_memory=["a"])
    for slots in (2, None):
        sender = sender_for(server, worker_model_slots=slots)
        sender.refresh_probes()
        heartbeat = sender.build()
        assert heartbeat.would_evict is None
        assert heartbeat.model_slots == slots
        assert heartbeat.load_bps is None
        assert heartbeat.service_s == {}


def test_a_malformed_ps_does_not_break_the_heartbeat(
    servers: list[SimulatedModelServer],
    sender_for: SenderFactory,
    registry: Registry,
    stats: ModelStats,
) -> None:
    server = serve(servers, "s", ["a", "b"], models_in_memory=["a", "b"])
    garbage = [
        ps_entry("a", size="4 GB", expires_at=None),
        {"model": "b:latest"},
        {"name": ["b"], "size": {"x": 1}},
        ps_entry("c" * 300, size=1),
        "junk",
    ]
    server.garble("/api/ps", json.dumps({"models": garbage}))
    sender = sender_for(server, worker_model_slots=2)
    sender.refresh_probes()
    assert sender.beat() is not None
    heartbeat = published(registry)
    assert heartbeat.models_in_memory == ("a", "b")
    assert heartbeat.would_evict == "a"
    assert heartbeat.model_bytes == {"a": size_of("a"), "b": size_of("b")}  # from /api/tags
    assert heartbeat.services_status == {
        "vllm": "healthy",
        "embeddings": "healthy",
        "ocr": "healthy",
    }


def test_a_heartbeat_with_many_long_model_names_stays_under_the_limit(
    servers: list[SimulatedModelServer],
    sender_for: SenderFactory,
    registry: Registry,
    stats: ModelStats,
) -> None:
    names = [f"{i:03d}-" + "m" * 116 for i in range(256)]
    server = serve(servers, "s", names, models_in_memory=names[:2])
    sender = sender_for(server, worker_model_slots=2)
    sender.refresh_probes()
    for name in names[:64]:
        stats.record(name, 1.0)
    heartbeat = sender.build()
    assert len(heartbeat.to_json().encode()) <= MAX_HEARTBEAT_BYTES
    assert len(heartbeat.models_on_disk) == 256
    # What routing needs most stays: the models in memory, their sizes and times.
    assert set(heartbeat.model_bytes) == set(heartbeat.service_s) == set(names[:2])
    assert heartbeat.would_evict == names[0]
    sender.beat()
    assert published(registry).worker_id == "w1"


@pytest.mark.e2e
def test_a_prefork_worker_reports_what_its_tasks_measured(
    app: Celery,
    servers: list[SimulatedModelServer],
    start_worker: WorkerFactory,
    registry: Registry,
    settings: CoordinatorSettings,
) -> None:
    """A real worker whose tasks run in pool children: their timings reach its heartbeat."""
    load_bps = 10 * GB  # every model takes 100-500 ms to load: real loads
    server = serve(
        servers, "s", ["a", "b", "c"], models_in_memory=["a"], max_loaded=2, load_bps=load_bps
    )
    worker = start_worker(
        "w1",
        tier="gpu",
        server=server,
        extra_env={"WORKER_MODEL_SLOTS": "2", "WORKER_DOWNLOAD_BPS": "50000000"},
        args=["-P", "prefork", "-c", "1"],
    )
    assert "(prefork)" in worker.log()
    queue = settings.keys.worker_queue("w1")

    def run(model: str) -> None:
        result = generate.apply_async(args=("hi",), kwargs={"model": model}, queue=queue)
        assert result.get(timeout=30)["worker_id"] == "w1"

    def heartbeat_where(what: str, check: Any) -> Heartbeat:
        def found() -> Heartbeat | None:
            live = {hb.worker_id: hb for hb in registry.live_workers()}
            hb = live.get("w1")
            return hb if hb is not None and check(hb) else None

        found_hb = wait_for(found, what=what)
        assert isinstance(found_hb, Heartbeat)
        return found_hb

    run("a")
    run("b")
    full = heartbeat_where("memory full, a next out", lambda hb: hb.would_evict == "a")
    assert full.models_in_memory == ("a", "b")
    run("c")  # evicts a
    hb = heartbeat_where(
        "c loaded, b next out, c timed",
        lambda hb: hb.would_evict == "b" and "c" in hb.service_s,
    )
    assert hb.models_in_memory == ("b", "c")
    assert set(hb.service_s) == {"a", "b", "c"}
    assert all(0 < t < 5 for t in hb.service_s.values())
    assert hb.mean_service_s is not None
    assert hb.model_bytes == {m: size_of(m) for m in "abc"}
    assert hb.model_slots == 2
    assert hb.download_bps == 50_000_000
    assert hb.load_bps == pytest.approx(load_bps, rel=0.05)
    assert server.loaded_models() == ["b", "c"]
