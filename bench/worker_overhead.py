"""What a model task costs the worker: the fleet's ``generate`` against a plain Celery task
making the same HTTP call through a pooled client.

One simulated Ollama (its own process) answers both. Two sets of ``--workers`` real
``celery worker`` processes run side by side on the same Redis, each ``-P prefork -c 2``
(as ``bench/chaos.py``; 2 is also Celery's default concurrency on a 2-core machine):

* **fleet**: ``celery -A worker_tasks worker`` on the fleet's defaults (``coordinator.install``
  settings, the router choosing each task's worker, heartbeats, claims, statistics).
* **plain**: ``celery -A bench.plain_celery worker``, one shared queue, no coordinator; its task
  posts the same ``/api/generate`` body through one pooled ``httpx.Client`` per process.

Each round sends ``--tasks`` tasks at once to one side and waits for every result; the sides
alternate (and swap who goes first) over ``--rounds`` rounds. Measured per round: the CPU
(user + system) of that side's worker processes, main processes and pool children together,
per task; tasks per second from the first send to the last result; and the simulated
server's CPU per request. Printed: medians, and the fleet/plain ratio of worker CPU per task
against the 1.5x target. Both sides make the same HTTP call, so the ratio measures what the
worker does beyond it; the call itself (wall time, and the client's CPU through a pooled
client) is measured once from this process and printed above the table.

    .venv/bin/python -m bench.worker_overhead [--tasks 400] [--rounds 5] [--workers 3]

Writes only keys naming a fresh ``wo-<hex>`` namespace (and this run's entries in kombu's
shared sets), deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx
import psutil
import redis
from celery import Celery

from bench.processes import ROOT, celery_worker, stop_group
from coordinator.core.settings import CoordinatorSettings
from coordinator.dispatch.app import create_app, fleet_of
from coordinator.sim.servers.ollama import SimulatedModelServer

RATIO_TARGET: Final = 1.5
CONCURRENCY: Final = 2
PIDBOX_BINDINGS: Final = "_kombu.binding.celery.pidbox"
"""Plain Celery's remote-control bindings, shared by every plain worker on this Redis."""


@dataclass
class Side:
    """One set of workers and how to send it a task."""

    name: str
    send: Callable[[str], str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)


def serve() -> None:
    """Run the simulated Ollama here until SIGTERM; print ``READY <url>`` once listening."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with SimulatedModelServer("bench", ["llama3.2"], ["llama3.2"]) as server:
        print(f"READY {server.url}", flush=True)
        stop.wait()


def start_server(logdir: Path) -> tuple[subprocess.Popen[str], str]:
    """The simulated Ollama in a process of its own, so its CPU is not the workers'."""
    command = [sys.executable, "-m", "bench.worker_overhead", "--serve"]
    with (logdir / "server.log").open("w") as log_file:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            start_new_session=True,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        raise SystemExit(f"simulated server did not start: {line!r} (see {logdir})")
    return proc, line.removeprefix("READY ")


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) of these processes, their living children and the
    children they have reaped."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            main = psutil.Process(pid)
            times = main.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
            for child in main.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child_times = child.cpu_times()
                    total += child_times.user + child_times.system
    return total


def wait_done(
    client: redis.Redis, namespace: str, ids: list[str], timeout_s: float
) -> float | None:
    """Wait for every result (success or failure); when the last one was seen, or ``None``
    on timeout. Raises when a task failed: the figures would be meaningless."""
    pending = list(ids)
    deadline = time.monotonic() + timeout_s
    while pending:
        if time.monotonic() > deadline:
            return None
        raws = client.mget([f"{namespace}:celery-task-meta-{i}" for i in pending])
        still = []
        for task_id, raw in zip(pending, raws, strict=True):
            status = json.loads(raw).get("status") if raw else None
            if status == "FAILURE":
                raise SystemExit(f"task {task_id} failed: {json.loads(raw or '{}')}")
            if status != "SUCCESS":
                still.append(task_id)
        pending = still
        if pending:
            time.sleep(0.01)
    return time.monotonic()


def run_round(
    side: Side, tasks: int, client: redis.Redis, namespace: str, server: psutil.Process
) -> tuple[float, float, float]:
    """Send ``tasks`` tasks at once and wait for them: worker CPU ms per task, tasks/s, and
    the server's CPU ms per task."""
    pids = [p.pid for p in side.procs]
    cpu_before, server_before = tree_cpu_s(pids), _cpu_s(server)
    started = time.monotonic()
    ids = [side.send(f"{side.name} {uuid.uuid4().hex[:8]}") for _ in range(tasks)]
    finished = wait_done(client, namespace, ids, timeout_s=60 + tasks)
    if finished is None:
        raise SystemExit(f"{side.name}: results missing after {60 + tasks} s")
    cpu_ms = (tree_cpu_s(pids) - cpu_before) * 1000 / tasks
    server_ms = (_cpu_s(server) - server_before) * 1000 / tasks
    return cpu_ms, tasks / (finished - started), server_ms


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def http_call_cost(url: str, calls: int = 300) -> tuple[float, float]:
    """The HTTP call itself through a pooled client, from this process: wall ms and client
    CPU ms per call (after a warm-up, so the client's creation is not counted)."""
    body = {"model": "llama3.2", "prompt": "calibration", "stream": False}
    with httpx.Client(timeout=60) as http:
        for _ in range(20):
            http.post(f"{url}/api/generate", json=body).raise_for_status()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            http.post(f"{url}/api/generate", json=body).raise_for_status()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall * 1000 / calls, cpu * 1000 / calls


def wait_for_fleet(app: Celery, worker_ids: set[str], timeout_s: float = 60.0) -> None:
    """Until every fleet worker heartbeats (it consumes its queues by then)."""
    registry = fleet_of(app).registry
    deadline = time.monotonic() + timeout_s
    while {hb.worker_id for hb in registry.live_workers()} < worker_ids:
        if time.monotonic() > deadline:
            raise SystemExit("fleet workers did not heartbeat in time (see their logs)")
        time.sleep(0.2)


def make_sides(
    args: argparse.Namespace, namespace: str, url: str, logdir: Path
) -> tuple[Celery, list[Side]]:
    """Both sets of workers started, and the fleet app that sends to its side."""
    settings = CoordinatorSettings(redis_url=args.redis_url, namespace=namespace)
    app = create_app(settings, main=f"bench-{namespace}")
    plain_queue = f"{namespace}.plain"
    plain = Celery("plain-sender", broker=args.redis_url, set_as_current=False)
    plain.conf.update(task_serializer="json", accept_content=["json"])
    fleet_side = Side("fleet", lambda p: app.send_task("worker_tasks.generate", args=[p]).id)
    plain_side = Side(
        "plain",
        lambda p: plain.send_task("plain.generate", args=[p], queue=plain_queue).id,
    )
    base = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": args.redis_url}
    base |= {"NAMESPACE": namespace, "OLLAMA_URL": url, "WORKER_TIER": "cpu"}
    base.pop("BROKER_URL", None)
    for i in range(args.workers):
        fleet_env = {**base, "WORKER_ID": f"{namespace}-f{i}"}
        fleet_side.procs.append(
            celery_worker(
                "worker_tasks",
                f"{namespace}-f{i}",
                fleet_env,
                logdir / f"f{i}.log",
                concurrency=CONCURRENCY,
            )
        )
        plain_env = {**base, "WORKER_ID": f"{namespace}-p{i}", "PLAIN_QUEUE": plain_queue}
        plain_side.procs.append(
            celery_worker(
                "bench.plain_celery",
                f"{namespace}-p{i}",
                plain_env,
                logdir / f"p{i}.log",
                concurrency=CONCURRENCY,
            )
        )
    wait_for_fleet(app, {f"{namespace}-f{i}" for i in range(args.workers)})
    return app, [fleet_side, plain_side]


def measure(args: argparse.Namespace, namespace: str, logdir: Path) -> None:
    """Start everything, run the rounds, print the table, and clean up."""
    server_proc, url = start_server(logdir)
    app: Celery | None = None
    sides: list[Side] = []
    try:
        wall_ms, client_ms = http_call_cost(url)
        app, sides = make_sides(args, namespace, url, logdir)
        client = fleet_of(app).registry.client
        server = psutil.Process(server_proc.pid)
        warm = 4 * CONCURRENCY * args.workers  # every pool child makes its client first
        for side in sides:
            run_round(side, warm, client, namespace, server)
        for index in range(args.rounds):
            for side in sides if index % 2 == 0 else sides[::-1]:
                cpu_ms, rate, server_ms = run_round(side, args.tasks, client, namespace, server)
                side.cpu_ms.append(cpu_ms)
                side.rate.append(rate)
                side.server_ms.append(server_ms)
                print(
                    f"  round {index + 1} {side.name:5} {cpu_ms:6.2f} ms CPU/task "
                    f"{rate:6.1f} tasks/s",
                    file=sys.stderr,
                    flush=True,
                )
        report(args, sides, wall_ms, client_ms)
    finally:
        for side in sides:
            for proc in side.procs:
                stop_group(proc)
        stop_group(server_proc)
        if app is not None:
            _forget(fleet_of(app).registry.client, namespace)


def report(args: argparse.Namespace, sides: list[Side], wall_ms: float, client_ms: float) -> None:
    print(
        f"{args.workers} workers per side, prefork -c {CONCURRENCY}; {args.tasks} generate "
        f"tasks per round, {args.rounds} rounds alternating; medians"
    )
    print(
        f"the HTTP call itself: {wall_ms:.2f} ms wall per call, {client_ms:.2f} ms client CPU "
        "through a pooled httpx client"
    )
    print(f"{'':6} {'worker CPU ms/task':>18} {'tasks/s':>8} {'server CPU ms/task':>18}")
    medians = {}
    for side in sides:
        cpu, rate = statistics.median(side.cpu_ms), statistics.median(side.rate)
        medians[side.name] = cpu
        server = statistics.median(side.server_ms)
        print(f"{side.name:6} {cpu:18.2f} {rate:8.1f} {server:18.2f}")
    ratio = medians["fleet"] / medians["plain"]
    beyond = (medians["fleet"] - client_ms) / max(medians["plain"] - client_ms, 1e-9)
    verdict = "met" if ratio <= RATIO_TARGET else "missed"
    print(f"fleet/plain worker CPU per task: {ratio:.2f}x (target <= {RATIO_TARGET}x: {verdict})")
    print(f"  without the client's HTTP CPU on both sides: {beyond:.2f}x")


def _forget(client: redis.Redis, namespace: str) -> None:
    """This run's keys, and its plain workers' entries in kombu's shared keys (its
    remote-control bindings; unacknowledged messages, left only by an aborted round)."""
    for key in client.scan_iter(match=f"*{namespace}*", count=1000):
        client.unlink(key)
    mine = namespace.encode()
    for member in client.smembers(PIDBOX_BINDINGS):
        if mine in member:
            client.srem(PIDBOX_BINDINGS, member)
    for tag, entry in client.hscan_iter("unacked"):
        if mine in entry:
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.serve:  # the simulated server's own process
        serve()
        return
    namespace = f"wo-{uuid.uuid4().hex[:8]}"
    logdir = Path(tempfile.mkdtemp(prefix=f"bench-{namespace}-"))
    try:
        measure(args, namespace, logdir)
    finally:
        print(f"  logs: {logdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
