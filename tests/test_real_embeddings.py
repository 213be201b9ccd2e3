"""Real embeddings in the simulated servers: WordLlama's vectors, computed from the weights
in its wheel. First the simulated TEI's ``/embed`` against TEI's contract and the vectors'
meaning, without workers; then ``rag_ingestion`` on real workers talking to simulated TEI
servers, and searches whose right answers are known."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery

from coordinator.broadcast.client import broadcast
from coordinator.broadcast.rag import search
from coordinator.core.settings import CoordinatorSettings
from coordinator.dispatch.app import create_app, fleet_of
from coordinator.fleet.registry import Registry
from coordinator.sim.servers import embeddings
from coordinator.sim.servers.ollama import SimulatedModelServer
from coordinator.sim.servers.openai_api import SimulatedOpenAIServer
from coordinator.sim.servers.tei import MAX_INPUT_LENGTH, SimulatedTEIServer
from tests.conftest import ROOT, WorkerFactory, wait_for_worker

EMBEDDER = "nomic-embed-text"  # rag_ingestion's default model: what the TEI servers serve

CORPUS = {
    "sourdough": "To bake sourdough bread, feed the starter the night before, mix flour, "
    "water and salt, let the dough rise slowly, then bake it in a hot oven until the crust "
    "is dark.",
    "volcanoes": "Volcanoes erupt when molten rock, called magma, rises through the crust; "
    "lava flows, ash clouds and volcanic gases follow the eruption.",
    "tax-return": "File your income tax return before the April deadline; list your salary, "
    "deductions and receipts so the tax office can compute what you owe.",
    "football": "The football team scored two goals in the second half, and the goalkeeper "
    "saved a penalty to win the championship match.",
    "vaccines": "A vaccine trains the immune system: antibodies learn to recognise the virus, "
    "so the body fights the infection before the disease spreads.",
    "python-lists": "In Python, a list is a mutable sequence; append adds an element, sort "
    "orders the items and a loop iterates over the list.",
    "orbits": "Planets orbit the sun under gravity; the moon circles the earth, and telescopes "
    "let astronomers watch distant stars and galaxies.",
    "guitar": "Tune the guitar strings, practise the chords with your left hand and strum the "
    "rhythm with your right to play a song.",
}
QUERIES = {
    "How do I make bread with a starter?": "sourdough",
    "magma and ash from a mountain": "volcanoes",
    "When is the deadline to pay income tax?": "tax-return",
    "the striker and the goalie in the final": "football",
    "How does the immune system fight a virus?": "vaccines",
    "How do I sort a list in Python?": "python-lists",
    "astronomy: the solar system and gravity": "orbits",
    "strumming a musical instrument": "guitar",
}
"""A question for each document; some share few words with it."""


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture(scope="module")
def tei() -> Iterator[SimulatedTEIServer]:
    with SimulatedTEIServer("tei-unit", EMBEDDER, queue_size=2) as server:
        yield server


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def post_embed(http: httpx.Client, tei: SimulatedTEIServer, body: object) -> httpx.Response:
    return http.post(f"{tei.url}/embed", json=body)


def vectors_of(http: httpx.Client, tei: SimulatedTEIServer, texts: list[str]) -> list[Any]:
    answer = post_embed(http, tei, {"inputs": texts})
    assert answer.status_code == 200, answer.text
    found: list[Any] = answer.json()
    return found


# -- TEI's contract ------------------------------------------------------------------------


def test_embed_answers_a_list_of_float_lists_as_tei_does(
    http: httpx.Client, tei: SimulatedTEIServer
) -> None:
    one = post_embed(http, tei, {"inputs": "What is Deep Learning?"})
    assert one.status_code == 200
    assert one.headers["content-type"].startswith("application/json")
    (vector,) = one.json()
    assert len(vector) == embeddings.DIMENSIONS
    assert all(isinstance(x, float) for x in vector)
    assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-5)
    assert vector == tei.embed("What is Deep Learning?")

    batch = vectors_of(http, tei, ["one", "two", "What is Deep Learning?"])
    assert len(batch) == 3
    assert batch[2] == vector
    body = {"inputs": ["What is Deep Learning?"], "normalize": False, "truncate": False}
    raw = post_embed(http, tei, body).json()[0]
    assert math.fsum(x * x for x in raw) != pytest.approx(1.0)
    assert cosine(raw, vector) == pytest.approx(1.0)


def test_info_and_metrics_keep_their_fields(http: httpx.Client, tei: SimulatedTEIServer) -> None:
    info = http.get(f"{tei.url}/info").json()
    assert info["model_id"] == EMBEDDER
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert (info["max_input_length"], info["max_client_batch_size"]) == (MAX_INPUT_LENGTH, 32)
    assert info["auto_truncate"] is False
    metrics = http.get(f"{tei.url}/metrics").text
    assert "te_queue_size 2.0" in metrics
    assert "te_request_count" in metrics


@pytest.mark.parametrize(
    ("body", "status", "error_type", "message"),
    [
        ({"inputs": []}, 400, "Empty", "`inputs` cannot be empty"),
        ({"inputs": ["x"] * 33}, 413, "Validation", "batch size 33 > maximum allowed batch"),
        ({"inputs": ["fine", ""]}, 413, "Validation", "`inputs` cannot be empty"),
        ({"inputs": "x", "prompt_name": "query"}, 413, "Validation", "no prompts were found"),
        ({"inputs": "word " * 600}, 413, "Validation", "must have less than 512 tokens."),
        ({"inputs": 3}, 422, "Validation", "`inputs`"),
        ({"inputs": "x", "normalize": "yes"}, 422, "Validation", "`normalize`"),
        ({"inputs": "x", "truncation_direction": "up"}, 422, "Validation", "Left or Right"),
        (["x"], 422, "Validation", "JSON object"),
    ],
)
def test_refusals_are_teis_error_json(
    http: httpx.Client,
    tei: SimulatedTEIServer,
    body: object,
    status: int,
    error_type: str,
    message: str,
) -> None:
    answer = post_embed(http, tei, body)
    assert answer.status_code == status
    assert answer.json()["error_type"] == error_type
    assert message in answer.json()["error"]
    assert set(answer.json()) == {"error", "error_type"}


def test_truncate_keeps_the_first_or_the_last_tokens(
    http: httpx.Client, tei: SimulatedTEIServer
) -> None:
    text = "the harbour at dawn " * 100 + "volcanic ash over the city " * 100
    ids = embeddings.tokens(text)
    assert len(ids) > MAX_INPUT_LENGTH
    right = post_embed(http, tei, {"inputs": text, "truncate": True}).json()[0]
    left = {"inputs": text, "truncate": True, "truncation_direction": "Left"}
    assert right == embeddings.vector(ids[:MAX_INPUT_LENGTH])
    assert post_embed(http, tei, left).json()[0] == embeddings.vector(ids[-MAX_INPUT_LENGTH:])
    with SimulatedTEIServer("auto", EMBEDDER, auto_truncate=True) as auto:
        assert post_embed(http, auto, {"inputs": text}).json()[0] == right


# -- what the vectors mean -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("anchor", "close", "unrelated"),
    [
        ("The cat sat on the mat.", "A kitten was sleeping on the rug.", "Stocks fell sharply."),
        ("How do I reset my password?", "I forgot my login password.", "The volcano erupted."),
        (
            "The doctor prescribed antibiotics for the infection.",
            "The physician gave her medicine to treat the bacterial illness.",
            "The train leaves the station at noon.",
        ),
        ("Lava and ash poured down the mountain.", "The volcano erupted.", "I love pasta."),
    ],
)
def test_close_texts_are_nearer_than_unrelated_ones(
    http: httpx.Client, tei: SimulatedTEIServer, anchor: str, close: str, unrelated: str
) -> None:
    a, b, c = vectors_of(http, tei, [anchor, close, unrelated])
    assert cosine(a, b) > cosine(a, c) + 0.2


def test_each_query_is_nearest_to_its_document(http: httpx.Client, tei: SimulatedTEIServer) -> None:
    documents = vectors_of(http, tei, list(CORPUS.values()))
    for query, expected in QUERIES.items():
        (q,) = vectors_of(http, tei, [query])
        ranked = sorted(zip(CORPUS, documents, strict=True), key=lambda d: -cosine(q, d[1]))
        assert ranked[0][0] == expected, (query, [name for name, _ in ranked[:3]])


def test_the_vectors_are_wordllamas(http: httpx.Client, tei: SimulatedTEIServer) -> None:
    import wordllama
    from wordllama import WordLlama

    texts = list(CORPUS.values())[:4]
    package = Path(wordllama.__file__).parent
    model = WordLlama.load(cache_dir=package, disable_download=True)
    expected = model.embed(texts, norm=True).tolist()
    served = vectors_of(http, tei, texts)
    for got, want in zip(served, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-6)


def test_ollama_and_vllm_embed_with_the_same_model_unless_told_a_size(
    http: httpx.Client, tei: SimulatedTEIServer
) -> None:
    text = "Volcanoes erupt."
    (expected,) = vectors_of(http, tei, [text])
    with SimulatedModelServer("ollama", [EMBEDDER]) as ollama:
        body = {"model": EMBEDDER, "input": [text]}
        answer = http.post(f"{ollama.url}/api/embed", json=body).json()
        assert answer["embeddings"] == [expected]
    with SimulatedOpenAIServer("vllm", [EMBEDDER]) as vllm:
        answer = http.post(f"{vllm.url}/v1/embeddings", json=body | {"input": text}).json()
        assert answer["data"][0]["embedding"] == expected
    with SimulatedModelServer("hashing", [EMBEDDER], embedding_dim=8) as hashing:
        answer = http.post(f"{hashing.url}/api/embed", json=body).json()
        assert len(answer["embeddings"][0]) == 8


# -- nothing downloaded, nothing loaded early ----------------------------------------------

_OFFLINE = """
import socket, time
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args[:2])
    raise OSError("no network in this test")
socket.socket.connect = refuse
socket.getaddrinfo = refuse
socket.create_connection = refuse
from coordinator.sim.servers import embeddings
started = time.monotonic()
embeddings.load()
print(f"loaded in {time.monotonic() - started:.2f} s")
print(len(embeddings.embed(["offline"])[0]), attempts)
"""


def test_the_model_is_read_from_the_wheel_and_nothing_is_downloaded(tmp_path: Path) -> None:
    # An empty home: no ~/.cache/wordllama to find, so a download would be the only way.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", _OFFLINE],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"{embeddings.DIMENSIONS} []"
    assert list(tmp_path.iterdir()) == []
    assert done.stderr == ""  # wordllama's logging.basicConfig was undone


def test_importing_the_simulated_servers_reads_no_model() -> None:
    code = (
        "import sys\n"
        "import coordinator.sim.demo, coordinator.sim.servers.tei\n"
        "import coordinator.sim.servers.ollama, coordinator.sim.servers.openai_api\n"
        "print(sorted(m for m in ('wordllama', 'tokenizers', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- real workers ------------------------------------------------------------------------


@pytest.fixture
def rag_app(settings: CoordinatorSettings, chroma_url: str) -> Iterator[Celery]:
    """The test app, pointed at the session's ChromaDB."""
    app = create_app(settings.model_copy(update={"chromadb_url": chroma_url}), main="real-rag")
    yield app
    fleet_of(app).close()


@pytest.mark.e2e
def test_rag_ingestion_on_tei_workers_then_search_finds_each_querys_document(
    rag_app: Celery,
    start_worker: WorkerFactory,
    registry: Registry,
    settings: CoordinatorSettings,
    chroma_url: str,
) -> None:
    servers = [SimulatedTEIServer(f"tei-{n}", EMBEDDER).start() for n in range(2)]
    try:
        workers = [
            start_worker(
                f"embedder-{n}",
                tier="cpu",
                server=None,
                extra_env={"EMBEDDINGS_URL": tei.url, "CHROMADB_URL": chroma_url},
                wait=False,
            )
            for n, tei in enumerate(servers)
        ]
        for worker in workers:
            wait_for_worker(registry, worker)
        collection = f"real-{settings.namespace}"
        job = {
            "documents": [{"id": name, "text": text} for name, text in CORPUS.items()],
            "collection": collection,
            "chunk_size": 512,
            "chunk_overlap": 32,
        }
        ingested = broadcast("rag_ingestion", job, timeout_s=60, app=rag_app)
        assert (ingested.successful, ingested.failed) == (2, 0)
        assert ingested.aggregated == {
            "documents": len(CORPUS),
            "chunks": len(CORPUS),  # each document is shorter than a chunk
            "failed_documents": [],
        }
        # Each worker embedded its share on its own TEI.
        assert all(tei.request_count("POST", "/embed") > 0 for tei in servers)

        for query, expected in QUERIES.items():
            hits = search(collection, query, n_results=3, app=rag_app)
            ranked = [hit["document_id"] for hit in hits]
            assert ranked[0] == expected, (query, ranked)
            assert hits[0]["distance"] < hits[1]["distance"]
    finally:
        for tei in servers:
            tei.stop()
