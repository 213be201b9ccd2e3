"""What a SIGKILLed worker costs: tasks lost (none), tasks run twice, and time.

Starts one simulated Ollama server per worker (every request takes ``--task-ms``), three
``celery -A worker_tasks worker -P solo`` subprocesses and a :class:`Reaper` in a thread of
this process, as ``coordinator serve`` runs it. Each run sends ``--tasks`` ``generate`` tasks
with plain ``.delay()`` (the router spreads them) and times the first send to the last
result (``date_done``). Run A kills nobody; run B SIGKILLs the worker with the longest
queue once half the results are in. Heartbeats are fast (interval 0.5 s, TTL 1.5 s, reaper
grace 0.5 s) so the death is noticed within about 2.5 s.

    .venv/bin/python -m bench.failover [--tasks 1000] [--task-ms 20] [--redis-url URL]

Only keys under a fresh ``bench-<hex>`` namespace are written; all are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from celery import Celery

from coordinator.core.settings import CoordinatorSettings
from coordinator.dispatch.app import create_app, fleet_of
from coordinator.recovery.reaper import Reaper
from coordinator.sim.servers.ollama import SimulatedModelServer
from worker_tasks.tasks import generate

ROOT: Final = Path(__file__).resolve().parent.parent
WORKERS: Final = 3
INTERVAL_S, TTL_S, GRACE_S = 0.5, 1.5, 0.5


@dataclass
class Run:
    seconds: float = 0.0
    lost: int = 0
    twice: int = 0
    kill_to_last_s: float | None = None
    victim: str | None = None
    held_at_kill: tuple[int, int] = (0, 0)
    """The victim's messages right after the kill: queued, and unacknowledged."""
    lost_prompts: list[str] = field(default_factory=list)
    by_worker: Counter[str] = field(default_factory=Counter)
    requests: dict[str, int] = field(default_factory=dict)


def start_workers(
    app: Celery, servers: list[SimulatedModelServer], logdir: Path
) -> dict[str, subprocess.Popen[bytes]]:
    """Start one worker per server; return once all heartbeat offering ``vllm``."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for index, server in enumerate(servers):
        worker_id = f"bench-w{index + 1}"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "REDIS_URL": fleet_of(app).settings.redis_url,
            "NAMESPACE": fleet_of(app).settings.namespace,
            "WORKER_ID": worker_id,
            "WORKER_TIER": "cpu",
            "OLLAMA_URL": server.url,
            "EMBEDDINGS_URL": server.url,
            "OCR_URL": server.url,
            "HEARTBEAT_INTERVAL_S": str(INTERVAL_S),
            "HEARTBEAT_TTL_S": str(TTL_S),
        }
        command = [sys.executable, "-m", "celery", "-A", "worker_tasks", "worker", "-n"]
        command += [f"{worker_id}@%h", "-P", "solo", "-l", "WARNING", "--without-mingle"]
        command += ["--without-gossip"]
        with (logdir / f"{worker_id}.log").open("ab") as log_file:
            procs[worker_id] = subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT
            )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs.values()):
            raise RuntimeError(f"a worker exited early; logs in {logdir}")
        live = {
            hb.worker_id
            for hb in fleet_of(app).registry.live_workers()
            if "vllm" in hb.capabilities
        }
        if live == set(procs):
            return procs
        time.sleep(0.1)
    raise RuntimeError(f"workers did not all register; logs in {logdir}")


def run(
    app: Celery,
    servers: list[SimulatedModelServer],
    procs: dict[str, subprocess.Popen[bytes]],
    tasks: int,
    kill_at: int | None,
    timeout_s: float,
) -> Run:
    """Send ``tasks`` tasks, optionally SIGKILL a worker after ``kill_at`` results."""
    client, ns, out = fleet_of(app).registry.client, fleet_of(app).settings.namespace, Run()
    served = dict(zip(procs, servers, strict=True))  # worker id -> its model server
    before = {w: s.request_count("POST", "/api/generate") for w, s in served.items()}
    started = time.time()
    ids = {generate.delay(f"task {n}").id: n for n in range(tasks)}
    fleet_of(app).router.claims.flush()
    pending, done_at, killed_at = dict(ids), [], None
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        keys = [f"{ns}:celery-task-meta-{task_id}" for task_id in pending]
        for task_id, raw in zip(list(pending), client.mget(keys), strict=True):
            meta = json.loads(raw) if raw else {}
            if meta.get("status") != "SUCCESS":
                continue
            answer = meta["result"]
            if not answer["response"].endswith(f": task {pending.pop(task_id)}"):
                raise RuntimeError(f"wrong answer for {task_id}: {answer}")
            out.by_worker[answer["worker_id"]] += 1
            stamp = datetime.fromisoformat(meta["date_done"])
            done_at.append((stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp())
        if kill_at is not None and killed_at is None and tasks - len(pending) >= kill_at:
            alive = [w for w, p in procs.items() if p.poll() is None]
            out.victim = max(
                alive, key=lambda w: client.llen(fleet_of(app).settings.keys.worker_queue(w))
            )
            killed_at = time.time()
            os.kill(procs[out.victim].pid, signal.SIGKILL)
            procs[out.victim].wait(timeout=10)
            queue = fleet_of(app).settings.keys.worker_queue(out.victim)
            unacked = [
                e
                for _, e in client.hscan_iter(fleet_of(app).settings.keys.unacked)
                if json.loads(e)[2] == queue
            ]
            out.held_at_kill = (client.llen(queue), len(unacked))
        time.sleep(0.02)
    consumer = getattr(app.backend, "result_consumer", None)
    for task_id in ids:  # drop this process's result subscriptions
        if consumer is not None:
            consumer.cancel_for(task_id)
    out.lost, out.lost_prompts = len(pending), [f"task {n}" for n in pending.values()]
    last = max(done_at, default=time.time())
    out.seconds = last - started
    out.kill_to_last_s = None if killed_at is None else last - killed_at
    out.requests = {
        w: s.request_count("POST", "/api/generate") - before[w] for w, s in served.items()
    }
    out.twice = sum(out.requests.values()) - (tasks - out.lost)
    return out


@dataclass
class Harness:
    """Everything the bench starts, kept together so shutdown can stop whatever got started."""

    app: Celery
    servers: list[SimulatedModelServer]
    logdir: Path
    stop: threading.Event
    reaper: threading.Thread
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--task-ms", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    return parser.parse_args()


def build_harness(redis_url: str, namespace: str) -> Harness:
    """The app with fast heartbeats, the model servers and the (not yet started) reaper."""
    settings = CoordinatorSettings(
        redis_url=redis_url,
        namespace=namespace,
        heartbeat_interval_s=INTERVAL_S,
        heartbeat_ttl_s=TTL_S,
        reaper_grace_s=GRACE_S,
        registry_refresh_s=0.2,
    )
    app = create_app(settings, main=f"bench-{namespace}")
    servers = [
        SimulatedModelServer(f"model-{i + 1}", ["llama3.2"], models_in_memory=["llama3.2"])
        for i in range(WORKERS)
    ]
    logdir = Path(tempfile.mkdtemp(prefix="bench-failover-logs-"))
    stop = threading.Event()
    reaper = threading.Thread(
        target=Reaper(app, settings.reaper_grace_s).run,
        args=(INTERVAL_S, stop),
        name="reaper",
    )
    return Harness(app, servers, logdir, stop, reaper)


def measure(h: Harness, tasks: int, task_ms: float, timeout_s: float) -> dict[str, Run]:
    """Start the fleet, warm it up, then run A (nobody killed) and B (a kill at the midpoint)."""
    for server in h.servers:
        server.start().set_fault(delay_s=task_ms / 1000)
    h.procs = start_workers(h.app, h.servers, h.logdir)
    h.reaper.start()
    run(h.app, h.servers, h.procs, 60, None, timeout_s)  # untimed warm-up
    results = {"A: no kill": run(h.app, h.servers, h.procs, tasks, None, timeout_s)}
    results["B: kill -9 at midpoint"] = run(h.app, h.servers, h.procs, tasks, tasks // 2, timeout_s)
    return results


def stop_workers(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM every worker still running, then wait for all (SIGKILL after 30 s)."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def shut_down(h: Harness, namespace: str, keep_logs: bool) -> int:
    """Stop everything started and delete the namespace's keys; returns how many."""
    h.stop.set()
    h.reaper.join(timeout=10)
    stop_workers(h.procs)
    for server in h.servers:
        server.stop()
    client, deleted = fleet_of(h.app).registry.client, 0
    try:
        for key in client.scan_iter(match=f"*{namespace}*", count=1000):
            deleted += client.unlink(key)
    finally:
        fleet_of(h.app).close()
        if not keep_logs:
            shutil.rmtree(h.logdir, ignore_errors=True)
    return deleted


def print_results(
    tasks: int, task_ms: float, results: dict[str, Run], reaper_log: list[logging.LogRecord]
) -> None:
    print(
        f"\n{tasks} generate tasks of {task_ms:.0f} ms, {WORKERS} workers (-P solo); "
        f"heartbeat {INTERVAL_S} s, TTL {TTL_S} s, reaper grace {GRACE_S} s every {INTERVAL_S} s"
    )
    print(f"{'run':<24}{'seconds':>9}{'lost':>6}{'twice':>7}  per worker: results/model calls")
    for name, r in results.items():
        split = ", ".join(f"{w} {r.by_worker[w]}/{n}" for w, n in r.requests.items())
        print(f"{name:<24}{r.seconds:>9.2f}{r.lost:>6}{r.twice:>7}  {split}")
    a, b = results["A: no kill"], results["B: kill -9 at midpoint"]
    print(f"\nslowdown B/A: {b.seconds / a.seconds:.2f}x; killed {b.victim}; ", end="")
    print(f"kill -9 to last completion: {b.kill_to_last_s or 0.0:.2f} s")
    print(f"{b.victim} held at the kill: {b.held_at_kill[0]} queued + {b.held_at_kill[1]} unacked")
    for record in reaper_log:
        print(f"reaper: {record.getMessage()}")
    for name, r in results.items():
        if r.lost:
            print(f"{name}: never finished: {', '.join(r.lost_prompts[:10])}")
    print(f"os.cpu_count() = {os.cpu_count()}: the workers, Redis and this process share them")


def main() -> None:
    args = parse_args()
    namespace = f"bench-{uuid.uuid4().hex[:12]}"
    harness = build_harness(args.redis_url, namespace)
    reaper_log = logging.handlers.BufferingHandler(10_000)  # what the reaper reports
    logging.getLogger("coordinator.recovery.reaper").addHandler(reaper_log)
    keep_logs = True  # unless both runs finish with nothing lost
    try:
        results = measure(harness, args.tasks, args.task_ms, args.timeout)
        keep_logs = any(r.lost for r in results.values())
    finally:
        deleted = shut_down(harness, namespace, keep_logs)

    print_results(args.tasks, args.task_ms, results, reaper_log.buffer)
    a, b = results["A: no kill"], results["B: kill -9 at midpoint"]
    verdict = "none lost" if a.lost == b.lost == 0 else f"LOST {a.lost} + {b.lost}"
    print(f"{verdict}; cleaned up {deleted} keys under {namespace}")
    if keep_logs:
        print(f"worker logs kept in {harness.logdir}")


if __name__ == "__main__":
    main()
