"""What broadcasting buys: sharded RAG ingestion on 1, 2 and 3 workers, and a ping's latency.

Starts a real ChromaDB (``chroma run``), one fake Ollama embedder per worker, and for each
worker count N exactly N ``celery -A worker_tasks worker`` subprocesses (CPU tier). Each
round ingests ``--documents`` short synthetic documents (one chunk each) into a
fresh collection with ``broadcast("rag_ingestion", ...)``, timed from the call to the
aggregated answer; the stored chunk count is checked against the aggregate. Worker start-up
and one small warm-up ingestion per configuration (imports, connections) are not timed.
Then, with the largest worker count, times ``--pings`` empty ``ping`` broadcasts.

    .venv/bin/python -m bench.broadcast [--documents 2000] [--workers 1,2,3] [--rounds 2]
                                        [--pings 20] [--redis-url URL]

Everything runs on this machine, so workers, Chroma, the embedders and Redis share its
cores. Only keys under a fresh ``bench-<hex>`` namespace are written; all are deleted at the
end, with the temporary Chroma directory.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from celery import Celery

from coordinator.broadcast.client import BroadcastResult, broadcast_async
from coordinator.broadcast.rag import chroma_client
from coordinator.core.settings import CoordinatorSettings
from coordinator.dispatch.app import create_app, fleet_of
from coordinator.sim.servers.ollama import SimulatedModelServer
from worker_tasks.chroma_server import ChromaServer

ROOT: Final = Path(__file__).resolve().parent.parent
EMBED_MODEL: Final = "nomic-embed-text"
HEARTBEAT_S: Final = 2.0
START_TIMEOUT_S: Final = 90.0
VOCABULARY: Final = (
    "pump valve seal torque bolt filter manual service check record pressure gauge motor "
    "belt bearing coolant sensor reading install replace inspect clean adjust warranty unit "
    "technician schedule monthly annual lid flange gasket outlet inlet switch relay fuse"
)


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def documents(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """``count`` reproducible documents of 200-400 characters with unique ids."""
    rng, vocabulary = random.Random(seed), VOCABULARY.split()
    docs = []
    for i in range(count):
        target, words = rng.randint(200, 390), [f"doc{i}"]
        while len(" ".join(words)) < target:
            words.append(rng.choice(vocabulary))
        docs.append({"id": f"doc-{i:05d}", "text": " ".join(words)})
    return docs


class Fleet:
    """Worker subprocesses of the bench, each with its own fake embedder."""

    def __init__(self, app: Celery, chroma_url: str, servers: list[SimulatedModelServer]) -> None:
        self.app, self.chroma_url, self.servers = app, chroma_url, servers
        self.logdir = Path(tempfile.mkdtemp(prefix="bench-broadcast-logs-"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, count: int) -> list[str]:
        """Start ``count`` workers and wait until each heartbeats with ``embeddings``."""
        settings = fleet_of(self.app).settings
        for index in range(count):
            worker_id = f"bench-w{index + 1}"
            url = self.servers[index].url
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "REDIS_URL": settings.redis_url,
                "NAMESPACE": settings.namespace,
                "WORKER_ID": worker_id,
                "WORKER_TIER": "cpu",
                "OLLAMA_URL": url,
                "EMBEDDINGS_URL": url,
                "OCR_URL": url,
                "CHROMADB_URL": self.chroma_url,
                "HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
            }
            command = [sys.executable, "-m", "celery", "-A", "worker_tasks", "worker"]
            command += ["-n", f"{worker_id}@%h", "-P", "solo", "-l", "WARNING"]
            command += ["--without-mingle", "--without-gossip"]
            with (self.logdir / f"{worker_id}.log").open("ab") as log_file:
                self.procs[worker_id] = subprocess.Popen(
                    command, env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT
                )
        self._wait_for(set(self.procs))
        return sorted(self.procs)

    def _wait_for(self, ids: set[str]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for worker_id, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{worker_id} exited early:\n{self.log_tail(worker_id)}")
            live = {
                hb.worker_id
                for hb in fleet_of(self.app).registry.live_workers()
                if "embeddings" in hb.capabilities
            }
            if live == ids:
                return
            time.sleep(0.1)
        raise RuntimeError(f"workers {sorted(ids)} did not all register with embeddings")

    def log_tail(self, worker_id: str) -> str:
        """The end of a worker's log."""
        return (self.logdir / f"{worker_id}.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """SIGTERM every worker (they deregister) and wait for them to exit."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()
        for hb in fleet_of(self.app).registry.live_workers():  # a crashed worker would linger
            fleet_of(self.app).registry.remove(hb.worker_id)


def timed(app: Celery, job: str, data: dict[str, Any]) -> tuple[BroadcastResult, float]:
    """``broadcast()`` (which is ``broadcast_async().wait()``) and its seconds, call to answer.

    Afterwards the header's result channels are unsubscribed: the chord's GroupResult has each
    one subscribed in this process's result consumer and nothing drains them, so they pile up
    (one per recipient per call) and their ``__del__`` fails noisily at interpreter exit.
    """
    started = time.perf_counter()
    handle = broadcast_async(job, data, timeout_s=600, app=app)
    try:
        result = handle.wait()
        elapsed = time.perf_counter() - started
    finally:
        consumer = getattr(app.backend, "result_consumer", None)  # Redis: an async backend
        for child in handle.header.results or []:
            if consumer is not None:
                consumer.cancel_for(child.id)
    return result, elapsed


def ingest(app: Celery, docs: list[dict[str, Any]], collection: str) -> tuple[float, list[int]]:
    """Ingest into a fresh collection; returns the seconds taken and each worker's documents."""
    job = {"documents": docs, "collection": collection, "chunk_size": 512, "chunk_overlap": 64}
    result, elapsed = timed(app, "rag_ingestion", job)
    check(result, len(docs))
    stored = chroma_client(fleet_of(app).settings.chromadb_url).get_collection(collection).count()
    if stored != result.aggregated["chunks"]:
        raise RuntimeError(f"{collection}: {stored} chunks stored, {result.aggregated} reported")
    shares = [int((o.result or {}).get("documents", 0)) for o in result.workers]
    return elapsed, shares


def check(result: BroadcastResult, expected_docs: int | None) -> None:
    """Raise unless every worker accepted and (for ingestion) every document was stored."""
    problems = [f"{o.worker_id}: {o.status} {o.error}" for o in result.workers if o.error]
    if result.failed or problems:
        raise RuntimeError(f"{result.job_type} failed on some workers: {problems}")
    if expected_docs is not None and result.aggregated["documents"] != expected_docs:
        raise RuntimeError(f"expected {expected_docs} documents, got {result.aggregated}")


@dataclass
class Results:
    """What the rounds measured, by worker count."""

    rates: dict[int, list[float]]
    """Documents per second, one per round."""
    shares: dict[int, list[int]] = field(default_factory=dict)
    """Each worker's documents in the last round."""
    pings_ms: list[float] = field(default_factory=list)
    """Ping broadcasts' latencies, with the largest worker count only."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--workers", default="1,2,3", help="worker counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pings", type=int, default=20)
    return parser.parse_args()


def measure_ingestion(
    app: Celery,
    docs: list[dict[str, Any]],
    namespace: str,
    workers: int,
    rounds: int,
    out: Results,
) -> None:
    """One untimed warm-up ingestion, then ``rounds`` timed ones with ``workers`` workers."""
    ingest(app, docs[: 16 * workers], f"{namespace}-warm-{workers}")  # untimed warm-up
    for round_ in range(rounds):
        elapsed, out.shares[workers] = ingest(app, docs, f"{namespace}-{workers}w-r{round_ + 1}")
        out.rates[workers].append(len(docs) / elapsed)
        print(f"{workers} worker(s), round {round_ + 1}: {out.rates[workers][-1]:.0f} docs/s")


def measure_pings(app: Celery, pings: int, ids: list[str], out: Results) -> None:
    """One untimed warm-up ping, then ``pings`` timed ones that must reach every worker."""
    check(timed(app, "ping", {})[0], None)  # warm-up
    for _ in range(pings):
        result, elapsed = timed(app, "ping", {})
        out.pings_ms.append(1000 * elapsed)
        check(result, None)
        if result.successful != len(ids):
            raise RuntimeError(f"ping reached {result.successful} of {ids}")


def measure(
    app: Celery,
    fleet: Fleet,
    docs: list[dict[str, Any]],
    counts: list[int],
    args: argparse.Namespace,
) -> Results:
    """Each worker count in turn, on a fleet of exactly that many workers."""
    namespace = fleet_of(app).settings.namespace
    out = Results(rates={n: [] for n in counts})
    for n in counts:
        ids = fleet.start(n)
        try:
            measure_ingestion(app, docs, namespace, n, args.rounds, out)
            if n == max(counts):
                measure_pings(app, args.pings, ids, out)
        finally:
            fleet.stop()
    return out


def shut_down(
    app: Celery, fleet: Fleet, servers: list[SimulatedModelServer], chroma: ChromaServer
) -> int:
    """Stop everything, delete the namespace's keys and the temporary directories; returns
    how many keys were deleted."""
    fleet.stop()
    for server in servers:
        server.stop()
    chroma.stop()
    client = fleet_of(app).registry.client
    deleted = 0
    # Best effort: cleaning up must not hide why the bench stopped.
    with contextlib.suppress(Exception):
        pattern = f"*{fleet_of(app).settings.namespace}*"
        deleted = sum(client.unlink(k) for k in client.scan_iter(match=pattern))
    fleet_of(app).close()
    shutil.rmtree(chroma.path, ignore_errors=True)
    shutil.rmtree(fleet.logdir, ignore_errors=True)
    return deleted


def print_results(args: argparse.Namespace, counts: list[int], results: Results) -> None:
    base = statistics.median(results.rates[min(counts)])
    print(f"\n{args.documents} documents (200-400 chars, chunk_size 512) x {args.rounds} rounds")
    print(f"{'workers':>7}{'docs/s':>9}{'speed-up':>10}  documents per worker (last round)")
    for n in counts:
        rate = statistics.median(results.rates[n])
        split = " / ".join(str(s) for s in results.shares[n])
        print(f"{n:>7}{rate:>9.0f}{rate / base:>10.2f}  {split}")
    print(f"(speed-up relative to {min(counts)} worker(s))")
    if results.pings_ms:
        pings = sorted(results.pings_ms)
        p95 = pings[math.ceil(0.95 * len(pings)) - 1]  # nearest rank
        print(
            f"\nping broadcast to {max(counts)} workers, call to aggregated answer, "
            f"{len(pings)} calls: median {statistics.median(pings):.1f} ms, p95 {p95:.1f} ms"
        )
    print(
        f"\nos.cpu_count() = {os.cpu_count()}: workers, ChromaDB, the fake embedders and Redis "
        "all share these cores, so the speed-up is bounded by them, not by the broadcast."
    )


def main() -> None:
    args = parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    namespace = f"bench-{uuid.uuid4().hex[:12]}"
    docs = documents(args.documents)

    chroma_dir = tempfile.mkdtemp(prefix="bench-broadcast-chroma-")
    port = free_port()
    chroma = ChromaServer(chroma_dir, "127.0.0.1", port, f"http://127.0.0.1:{port}")
    servers = [SimulatedModelServer(f"embed-{i + 1}", [EMBED_MODEL]) for i in range(max(counts))]
    settings = CoordinatorSettings(
        redis_url=args.redis_url,
        namespace=namespace,
        heartbeat_interval_s=HEARTBEAT_S,
        registry_refresh_s=0.0,
        chromadb_url=chroma.url,
    )
    app = create_app(settings, main=f"bench-{namespace}")
    fleet = Fleet(app, chroma.url, servers)
    try:
        chroma.start()
        for server in servers:
            server.start()
        results = measure(app, fleet, docs, counts, args)
    finally:
        deleted = shut_down(app, fleet, servers, chroma)

    print_results(args, counts, results)
    print(f"cleaned up {deleted} keys under {namespace}")


if __name__ == "__main__":
    main()
