"""The tail of a burst: ``--tasks`` short tasks sent at once to three equal workers, and when
the last one completes, routed to per-worker queues with and without work stealing, against
plain Celery with one shared queue.

Three fleets take the same burst, one after the other, each from nothing (fresh namespace,
fresh workers), ``--rounds`` times:

* **stealing**: three ``celery -A worker_tasks worker -P prefork -c 2`` on the fleet's
  defaults, work stealing on (``WORK_STEALING``, the default); tasks are the built-in
  ``generate``, routed, so each is committed to one worker's queue when it is sent.
* **no stealing**: the same with ``WORK_STEALING=false``: the gap stealing closes.
* **plain**: three ``celery -A bench.plain_celery worker -P prefork -c 2`` on one shared queue,
  Celery's reliability settings (late acks, requeue on a lost worker, JSON) and prefetch 1
  (``worker_prefetch_multiplier=1``): no worker holds a task another could start, the best
  tail a shared queue gives.

Each worker has its own simulated Ollama (a process of its own, the model in memory),
answering after ``--task-ms`` (the first one ``--slow`` times that: unequal workers, to
show what stealing closes when speeds differ). Before the burst, each fleet runs small
warm-up rounds until every worker has answered one (workers up, pools warm). Printed per
fleet and round: the last completion, from the first send (result ``date_done``); each
worker's tasks and last completion, and their spread (last minus first of those); and the
ratio of the routed run's last completion (stealing) to plain Celery's against the 5 %
target.

    .venv/bin/python -m bench.burst_tail [--tasks 3000] [--task-ms 20] [--rounds 1]
        [--slow 1] [--fleets stealing,no-stealing,plain]

Writes only keys naming a fresh ``tail-<hex>`` namespace per fleet, deleted after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import redis
from celery import Celery

from bench.processes import ROOT, celery_worker, stop_group
from coordinator.core.settings import CoordinatorSettings
from coordinator.core.task_spec import GENERATE
from coordinator.dispatch.app import create_app, fleet_of

WORKERS: Final = 3
CONCURRENCY: Final = 2
TARGET: Final = 1.05
FLEETS: Final = ("stealing", "no-stealing", "plain")
WARM_UP: Final = 4 * WORKERS * CONCURRENCY


@dataclass
class Run:
    """One fleet's burst: when each worker completed its last task, from the first send."""

    fleet: str
    last_s: float = float("nan")
    per_worker: dict[str, tuple[int, float]] = field(default_factory=dict)
    """worker id -> (tasks completed, its last completion)."""
    lost: int = 0

    @property
    def spread_s(self) -> float:
        lasts = [last for _, last in self.per_worker.values()]
        return max(lasts) - min(lasts) if lasts else float("nan")


def start_server(index: int, task_ms: float, logdir: Path) -> tuple[subprocess.Popen[str], str]:
    """A simulated Ollama with the model in memory, answering after ``task_ms``, in a
    process of its own."""
    command = [sys.executable, "-m", "coordinator.sim.servers.ollama", "--name", f"m{index}"]
    command += ["--models", "llama3.2", "--loaded", "llama3.2", "--delay", str(task_ms / 1000)]
    with (logdir / f"server{index}.log").open("w") as log_file:
        proc = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file, text=True
        )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        raise RuntimeError(f"simulated server {index} did not start: {line!r}")
    return proc, line.removeprefix("READY ")


def start_worker(
    fleet: str, index: int, env: dict[str, str], logdir: Path
) -> subprocess.Popen[bytes]:
    """A prefork worker in a process group of its own (stopped with its pool)."""
    worker_id = f"w{index + 1}"
    module = "bench.plain_celery" if fleet == "plain" else "worker_tasks"
    extra = ("-Q", env["PLAIN_QUEUE"]) if fleet == "plain" else ()
    log_path = logdir / f"{fleet}-{worker_id}.log"
    env = {**env, "WORKER_ID": worker_id}
    return celery_worker(module, worker_id, env, log_path, concurrency=CONCURRENCY, extra=extra)


class Sender:
    """Sends ``generate`` the way each fleet does: routed, or to the one shared queue."""

    def __init__(self, fleet: str, settings: CoordinatorSettings) -> None:
        self.fleet, self.namespace = fleet, settings.namespace
        if fleet == "plain":
            self.app = Celery("plain-sender", broker=settings.redis_url, set_as_current=False)
            self.app.conf.update(task_serializer="json", accept_content=["json"])
        else:
            self.app = create_app(settings, main=f"tail-{settings.namespace}")

    @property
    def queue(self) -> str:
        return f"{self.namespace}.plain"

    def send(self, prompt: str) -> str:
        if self.fleet == "plain":
            return str(self.app.send_task("plain.generate", args=[prompt], queue=self.queue).id)
        return str(self.app.send_task(GENERATE, args=[prompt]).id)

    def close(self) -> None:
        if self.fleet != "plain":
            fleet_of(self.app).close()


def results(client: redis.Redis, namespace: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The finished results among ``ids`` (one MGET per 500)."""
    done: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        raws = client.mget([f"{namespace}:celery-task-meta-{i}" for i in chunk])
        for task_id, raw in zip(chunk, raws, strict=True):
            meta = json.loads(raw) if raw else None
            if meta and meta.get("status") in ("SUCCESS", "FAILURE"):
                done[task_id] = meta
    return done


def wait_all(
    client: redis.Redis, namespace: str, ids: list[str], timeout_s: float
) -> dict[str, dict[str, Any]]:
    """Every result of ``ids``, or those finished by ``timeout_s``."""
    deadline, done = time.monotonic() + timeout_s, dict[str, dict[str, Any]]()
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        done |= results(client, namespace, pending)
        pending = [i for i in pending if i not in done]
        if pending:
            time.sleep(0.2)
    return done


def warm_up(sender: Sender, client: redis.Redis, deadline_s: float = 120.0) -> None:
    """Small rounds until every worker has run a task: workers up, pools and clients warm."""
    seen: set[str] = set()
    deadline = time.monotonic() + deadline_s
    while len(seen) < WORKERS:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sorted(seen)} of {WORKERS} workers answered")
        ids = [sender.send(f"warm-up {n}") for n in range(WARM_UP)]
        for meta in wait_all(client, sender.namespace, ids, 30.0).values():
            if meta.get("status") == "SUCCESS":
                seen.add(str(meta["result"]["worker_id"]))


def burst(sender: Sender, client: redis.Redis, tasks: int) -> Run:
    """Send ``tasks`` at once and time each worker's last completion."""
    started = time.time()
    ids = [sender.send(f"task {n}") for n in range(tasks)]
    done = wait_all(client, sender.namespace, ids, 600.0)
    run = Run(sender.fleet, lost=tasks - len(done))
    by_worker: dict[str, list[float]] = defaultdict(list)
    for meta in done.values():
        finished = datetime.fromisoformat(meta["date_done"])
        if finished.tzinfo is None:
            finished = finished.replace(tzinfo=UTC)
        worker = str((meta.get("result") or {}).get("worker_id", "?"))
        by_worker[worker].append(finished.timestamp() - started)
    run.per_worker = {w: (len(t), max(t)) for w, t in sorted(by_worker.items())}
    run.last_s = max((last for _, last in run.per_worker.values()), default=float("nan"))
    return run


def run_fleet(fleet: str, args: argparse.Namespace) -> Run:
    """One fleet from nothing: servers, workers, warm-up, the burst; everything stopped and
    its keys deleted after."""
    namespace = f"tail-{uuid.uuid4().hex[:8]}"
    settings = CoordinatorSettings(redis_url=args.redis_url, namespace=namespace)
    logdir = Path(tempfile.mkdtemp(prefix=f"bench-tail-{fleet}-"))
    # --slow makes the first worker's server slower: workers unequal, to show the gap.
    delays = [args.task_ms * (args.slow if i == 0 else 1.0) for i in range(WORKERS)]
    servers = [start_server(i, delay, logdir) for i, delay in enumerate(delays)]
    base = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": args.redis_url}
    base |= {"NAMESPACE": namespace, "WORKER_TIER": "cpu", "PLAIN_QUEUE": f"{namespace}.plain"}
    base |= {"WORK_STEALING": "false" if fleet == "no-stealing" else "true"}
    envs = [
        {**base, "OLLAMA_URL": url, "EMBEDDINGS_URL": url, "OCR_URL": url} for _, url in servers
    ]
    procs = [start_worker(fleet, i, env, logdir) for i, env in enumerate(envs)]
    sender = Sender(fleet, settings)
    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    try:
        warm_up(sender, client)
        return burst(sender, client, args.tasks)
    finally:
        sender.close()
        for proc in procs:
            stop_group(proc)
        for server, _ in servers:
            server.terminate()
            server.wait(timeout=10)
        for key in client.scan_iter(match=f"*{namespace}*", count=1000):
            client.unlink(key)
        print(f"  logs: {logdir}", file=sys.stderr)


def report(run: Run) -> None:
    workers = "  ".join(f"{w} {n:4d} @ {last:6.2f} s" for w, (n, last) in run.per_worker.items())
    print(
        f"{run.fleet:12} last {run.last_s:7.2f} s  spread {run.spread_s:6.2f} s  "
        f"lost {run.lost}  | {workers}",
        flush=True,
    )


def summary(runs: list[Run]) -> None:
    """Medians per fleet, and the routed (stealing) run against plain Celery."""
    last: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        last[run.fleet].append(run.last_s)
    medians = {fleet: statistics.median(values) for fleet, values in last.items()}
    for fleet, value in medians.items():
        spreads = [r.spread_s for r in runs if r.fleet == fleet]
        print(f"median {fleet:12} last {value:7.2f} s  spread {statistics.median(spreads):6.2f} s")
    for fleet in ("stealing", "no-stealing"):
        if fleet in medians and "plain" in medians:
            ratio = medians[fleet] / medians["plain"]
            verdict = "met" if ratio <= TARGET else "missed"
            print(f"{fleet} / plain: {ratio:.3f} (target <= {TARGET:.2f}: {verdict})")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--task-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--slow", type=float, default=1.0, help="w1's server is this many times slower"
    )
    parser.add_argument("--fleets", default=",".join(FLEETS))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    fleets = [f for f in args.fleets.split(",") if f]
    unknown = set(fleets) - set(FLEETS)
    if unknown:
        raise SystemExit(f"unknown fleets {sorted(unknown)}: choose among {', '.join(FLEETS)}")
    print(
        f"{args.tasks} tasks of {args.task_ms:g} ms at once, {WORKERS} workers x {CONCURRENCY}"
        + (f", w1's server {args.slow:g}x slower" if args.slow != 1.0 else "")
    )
    runs = []
    for _ in range(args.rounds):
        for fleet in fleets:
            runs.append(run_fleet(fleet, args))
            report(runs[-1])
    summary(runs)


if __name__ == "__main__":
    main()
