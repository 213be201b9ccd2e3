"""Each backend against a simulated server that speaks the real API (contract tests on the
shapes vLLM, llama.cpp and TEI document), then real workers on OpenAI-compatible and TEI
servers, routed by the load those servers publish."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from coordinator.core.errors import ModelNotFoundError
from coordinator.core.heartbeat import ServerLoad
from coordinator.core.settings import Endpoint
from coordinator.fleet.registry import Registry
from coordinator.sim.servers.ollama import SimulatedModelServer
from coordinator.sim.servers.openai_api import SimulatedOpenAIServer
from coordinator.sim.servers.tei import SimulatedTEIServer
from tests.conftest import WorkerFactory, wait_for, wait_for_worker
from worker_tasks import model_servers
from worker_tasks.model_servers.server_metrics import parse_load
from worker_tasks.tasks import embed, generate

MODEL, EMBEDDER = "llama3.2", "bge-small-en"

# vLLM 0.10's /metrics, trimmed: two engines of one model, histograms around the gauges.
VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama3.2"} 3.0
vllm:num_requests_running{engine="1",model_name="llama3.2"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama3.2"} 7.0
vllm:num_requests_waiting{engine="1",model_name="llama3.2"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama3.2"} 0.93
vllm:kv_cache_usage_perc{engine="1",model_name="llama3.2"} 0.2
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="llama3.2"} 2.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="llama3.2"} 2.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="llama3.2"} 0.5
"""


@pytest.mark.parametrize(
    ("text", "load"),
    [
        (VLLM_METRICS, ServerLoad(waiting=7, running=4, kv_cache_usage=0.93)),
        (  # an older vLLM
            "# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc 0.5\n",
            ServerLoad(kv_cache_usage=0.5),
        ),
        (
            "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 2\n"
            "# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 5\n"
            "# TYPE llamacpp:kv_cache_usage_ratio gauge\nllamacpp:kv_cache_usage_ratio 0.25\n",
            ServerLoad(waiting=5, running=2, kv_cache_usage=0.25),
        ),
        ("# TYPE te_queue_size gauge\nte_queue_size 12\n", ServerLoad(waiting=12)),
        ("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 3\n", None),
    ],
)
def test_the_load_servers_publish_is_read_from_their_metrics(
    text: str, load: ServerLoad | None
) -> None:
    assert parse_load(text) == load


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as http:
        yield http


@pytest.fixture
def openai_server() -> Iterator[SimulatedOpenAIServer]:
    with SimulatedOpenAIServer("vllm-a", [MODEL], waiting=50, running=2) as server:
        yield server


@pytest.fixture
def tei_server() -> Iterator[SimulatedTEIServer]:
    with SimulatedTEIServer("tei-a", EMBEDDER, queue_size=3) as server:
        yield server


def endpoint(url: str, api: str = "auto", key: str | None = None) -> Endpoint:
    return Endpoint("vllm", url, api, key)  # type: ignore[arg-type]


def test_auto_detects_each_api(
    client: httpx.Client, openai_server: SimulatedOpenAIServer, tei_server: SimulatedTEIServer
) -> None:
    with SimulatedModelServer("ollama-a", [MODEL]) as ollama:
        found = {
            url: model_servers.backend(client, endpoint(url)).api
            for url in (ollama.url, openai_server.url, tei_server.url)
        }
    assert found == {ollama.url: "ollama", openai_server.url: "openai", tei_server.url: "tei"}


def test_openai_compatible_probe_generate_ocr_and_embed(
    client: httpx.Client, openai_server: SimulatedOpenAIServer
) -> None:
    where = endpoint(openai_server.url, "openai")
    backend = model_servers.BACKENDS["openai"]
    state = backend.probe(client, where)
    assert (state.healthy, state.in_memory, state.on_disk) == (True, (MODEL,), (MODEL,))
    assert state.load == ServerLoad(waiting=50, running=2, kv_cache_usage=0.0)
    answer = backend.generate(client, where, model=MODEL, prompt="hello there")
    assert answer["response"] == f"[vllm-a] {MODEL}: hello there"
    assert answer["eval_count"] > 0
    seen = backend.generate(client, where, model=MODEL, prompt="read", images=["aGk="])
    assert seen["response"].endswith("images=1")
    vectors = backend.embed(client, where, model=MODEL, texts=["a", "b"])["embeddings"]
    assert len(vectors) == 2
    assert vectors[0] != vectors[1]
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        backend.generate(client, where, model="nope", prompt="hi")


def test_tei_gets_at_most_its_batch_limit_per_request_and_long_texts_truncated(
    client: httpx.Client, tei_server: SimulatedTEIServer
) -> None:
    texts = [f"text number {n}" for n in range(70)]
    texts[5] = "a very long text " * 400  # over the model's 512 tokens
    answer = model_servers.BACKENDS["tei"].embed(
        client, endpoint(tei_server.url, "tei"), model=EMBEDDER, texts=texts
    )
    assert len(answer["embeddings"]) == 70
    assert answer["embeddings"][0] == tei_server.embed(texts[0])
    # TEI refuses a request over max_client_batch_size (32 by default) with 413.
    assert tei_server.request_count("POST", "/embed") == 3


def test_an_api_key_is_sent_and_its_absence_reported(client: httpx.Client) -> None:
    with SimulatedOpenAIServer("keyed", [MODEL], api_key="s3cret") as server:
        backend = model_servers.BACKENDS["openai"]
        refused = backend.probe(client, endpoint(server.url, "openai"))
        assert not refused.healthy
        assert refused.error is not None
        assert "401" in refused.error
        assert "s3cret" not in repr(endpoint(server.url, "openai", "s3cret"))
        assert backend.probe(client, endpoint(server.url, "openai", "s3cret")).healthy


def test_llama_server_metrics(client: httpx.Client) -> None:
    with SimulatedOpenAIServer("llama", [MODEL], flavour="llamacpp", waiting=4) as server:
        state = model_servers.BACKENDS["openai"].probe(client, endpoint(server.url, "openai"))
    assert state.load == ServerLoad(waiting=4, running=0, kv_cache_usage=0.0)


def test_tei_probe_and_embed(client: httpx.Client, tei_server: SimulatedTEIServer) -> None:
    where = endpoint(tei_server.url, "tei")
    backend = model_servers.BACKENDS["tei"]
    state = backend.probe(client, where)
    assert (state.in_memory, state.load) == ((EMBEDDER,), ServerLoad(waiting=3))
    vectors = backend.embed(client, where, model=EMBEDDER, texts=["x", "y", "z"])["embeddings"]
    assert vectors == [tei_server.embed(t) for t in "xyz"]
    with pytest.raises(ModelNotFoundError, match="TEI serves 'bge-small-en'"):
        backend.embed(client, where, model="nomic-embed-text", texts=["x"])
    with pytest.raises(Exception, match="generates no text"):
        backend.generate(client, where, model=EMBEDDER, prompt="hi")


# -- real workers -----------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.usefixtures("app")
def test_workers_on_openai_and_tei_servers_serve_tasks_and_report_their_load(
    start_worker: WorkerFactory,
    registry: Registry,
    openai_server: SimulatedOpenAIServer,
    tei_server: SimulatedTEIServer,
) -> None:
    env = {"VLLM_URL": openai_server.url, "EMBEDDINGS_URL": tei_server.url}
    start_worker("mixed", tier="gpu", server=None, extra_env=env)
    (heartbeat,) = registry.live_workers()
    assert heartbeat.services_status["vllm"] == "healthy"
    assert heartbeat.services_status["embeddings"] == "healthy"
    assert set(heartbeat.models_in_memory) == {MODEL, EMBEDDER}
    assert heartbeat.server_load["vllm"].waiting == 50
    assert heartbeat.server_load["embeddings"].waiting == 3

    answer = generate.delay("hi", model=MODEL).get(timeout=30)
    assert (answer["worker_id"], answer["response"]) == ("mixed", f"[vllm-a] {MODEL}: hi")
    vectors = embed.delay(["one", "two"], model=EMBEDDER).get(timeout=30)["embeddings"]
    assert vectors == [tei_server.embed("one"), tei_server.embed("two")]


@pytest.mark.e2e
@pytest.mark.usefixtures("app")
def test_the_router_leaves_a_server_busy_with_other_clients(
    start_worker: WorkerFactory, registry: Registry
) -> None:
    busy = SimulatedOpenAIServer("busy", [MODEL], waiting=50).start()
    idle = SimulatedOpenAIServer("idle", [MODEL]).start()
    try:
        workers = [
            start_worker(name, tier="gpu", server=None, extra_env={"VLLM_URL": s.url}, wait=False)
            for name, s in (("on-busy", busy), ("on-idle", idle))
        ]
        for worker in workers:
            wait_for_worker(registry, worker)
        results = [generate.delay(f"n{n}", model=MODEL) for n in range(20)]
        ran_on = {r.get(timeout=60)["worker_id"] for r in results}
        assert ran_on == {"on-idle"}
        # The heartbeat follows the server's queue as it drains.
        busy.waiting = 0
        wait_for(
            lambda: all(hb.server_load["vllm"].waiting == 0 for hb in registry.live_workers()),
            30,
            "the drained queue in the busy server's heartbeat",
        )
    finally:
        busy.stop()
        idle.stop()


def test_a_process_keeps_one_pooled_client_until_it_closes_it() -> None:
    client = model_servers.shared_client(7.0)
    assert model_servers.shared_client(7.0) is client
    model_servers.close_clients()
    assert client.is_closed
    fresh = model_servers.shared_client(7.0)
    assert fresh is not client
    assert not fresh.is_closed
    model_servers.close_clients()


def test_a_forked_pool_child_makes_its_own_client_even_while_the_lock_was_held() -> None:
    parent = model_servers.shared_client(7.0)
    with model_servers._lock:  # a probe thread holds it as the prefork pool forks
        pid = os.fork()
        if pid == 0:  # the child: a client of its own, at once, not the parent's
            ok = model_servers.shared_client(7.0) is not parent
            os._exit(0 if ok else 1)
    done = wait_for(lambda: (r := os.waitpid(pid, os.WNOHANG))[0] and r, 10.0, "the child")
    assert isinstance(done, tuple)
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert not parent.is_closed  # the parent's stays the parent's
    model_servers.close_clients()
