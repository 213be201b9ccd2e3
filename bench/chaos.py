"""Nothing lost under chaos: ``--tasks`` ``.delay()`` tasks sent evenly over ``--duration-s``
while a whole worker (its main process and its pool) is SIGKILLed every 8-10 s and restarted
under its id after a slow (2-4 s) or fast (0.5-1.5 s) pause, on each broker.

Two fleets take the same soak, one after the other, on their defaults:

* **fleet**: three ``celery -A worker_tasks worker -P prefork -c 2`` and the reaper in this
  process, as ``coordinator serve`` runs it; tasks are the built-in ``generate``, routed.
* **plain Celery**: the same three workers of ``bench.plain_celery`` on one shared queue, with
  Celery's own reliability settings (late acks, requeue on a lost worker, prefetch 1).

Each model call takes ``--task-ms`` on its own simulated Ollama. Printed per soak: tasks
completed; lost (no result when the drain ends), and of those held by kombu as
unacknowledged on Redis (redelivered after its one-hour visibility timeout; the rest are in
no list at all); run twice (tasks whose model call was made more than once); and the time
from the last send to the last result.

    .venv/bin/python -m bench.chaos [--broker redis|rabbitmq|both] [--restart slow|fast|both]
        [--tasks 3000] [--duration-s 150] [--drain-s 120]

Writes only under a fresh ``chaos-<hex>`` namespace and RabbitMQ virtual host, deleted after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import redis
from celery import Celery

from bench.processes import ROOT, celery_worker, stop_group
from coordinator.core.settings import CoordinatorSettings
from coordinator.dispatch.app import create_app, fleet_of
from coordinator.recovery.reaper import Reaper
from coordinator.sim.servers.ollama import SimulatedModelServer

WORKERS: Final = 3
RESTARTS: Final = {"slow": (2.0, 4.0), "fast": (0.5, 1.5)}
KILL_EVERY_S: Final = (8.0, 10.0)
RABBITMQ: Final = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")


@dataclass
class Soak:
    """One run's setting: the broker, the restart pause, and fleet or plain Celery."""

    broker: str
    restart: str
    fleet: bool
    namespace: str = field(default_factory=lambda: f"chaos-{uuid.uuid4().hex[:8]}")


@dataclass
class Outcome:
    completed: int = 0
    lost: int = 0
    twice: int = 0
    drain_s: float = float("nan")
    kills: int = 0
    held: int = 0
    """Of the lost: held by kombu as unacknowledged (Redis), not in no list."""


def broker_url(soak: Soak, redis_url: str) -> str | None:
    """The soak's broker; a RabbitMQ virtual host of its own is made here."""
    if soak.broker == "redis":
        return None
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run([*ctl, "add_vhost", soak.namespace], check=True, capture_output=True)
    perms = ["set_permissions", "-p", soak.namespace, "guest", ".*", ".*", ".*"]
    subprocess.run([*ctl, *perms], check=True, capture_output=True)
    return f"{RABBITMQ}/{soak.namespace}"


def start_worker(
    soak: Soak, index: int, env: dict[str, str], logdir: Path
) -> subprocess.Popen[bytes]:
    """A worker in a process group of its own, so a kill takes its pool too."""
    worker_id = f"w{index + 1}"
    module = "worker_tasks" if soak.fleet else "bench.plain_celery"
    extra = () if soak.fleet else ("-Q", f"{soak.namespace}.plain")
    env = {**env, "WORKER_ID": worker_id}
    return celery_worker(module, worker_id, env, logdir / f"{worker_id}.log", extra=extra)


def chaos(
    soak: Soak,
    procs: list[subprocess.Popen[bytes]],
    envs: list[dict[str, str]],
    logdir: Path,
    until: threading.Event,
    rng: random.Random,
) -> int:
    """Kill a random worker every 8-10 s and restart it after the soak's pause; the kills."""
    kills = 0
    while not until.wait(rng.uniform(*KILL_EVERY_S)):
        victim = rng.randrange(len(procs))
        os.killpg(procs[victim].pid, signal.SIGKILL)
        procs[victim].wait(timeout=10)
        kills += 1
        time.sleep(rng.uniform(*RESTARTS[soak.restart]))
        procs[victim] = start_worker(soak, victim, envs[victim], logdir)
    return kills


def publish(sender: Celery, soak: Soak, tasks: int, duration_s: float) -> dict[str, str]:
    """Send ``tasks`` tasks evenly over ``duration_s``: task id -> its prompt."""
    sent: dict[str, str] = {}
    started = time.monotonic()
    for n in range(tasks):
        time.sleep(max(0.0, started + n * duration_s / tasks - time.monotonic()))
        prompt = f"task {n}"
        if soak.fleet:
            result = sender.send_task("worker_tasks.generate", args=[prompt])
        else:
            result = sender.send_task(
                "plain.generate", args=[prompt], queue=f"{soak.namespace}.plain"
            )
        sent[result.id] = prompt
    return sent


def drain(client: redis.Redis, namespace: str, sent: dict[str, str], drain_s: float) -> list[float]:
    """Wait (at most ``drain_s``) for every result; the completion times seen. What is still
    pending in ``sent`` afterwards was lost."""
    done: list[float] = []
    deadline = time.monotonic() + drain_s
    while sent and time.monotonic() < deadline:
        ids = list(sent)
        raws = client.mget([f"{namespace}:celery-task-meta-{i}" for i in ids])
        for task_id, raw in zip(ids, raws, strict=True):
            if raw and json.loads(raw).get("status") == "SUCCESS":
                sent.pop(task_id)
                done.append(time.time())
        time.sleep(0.2)
    return done


def soak_once(soak: Soak, args: argparse.Namespace) -> Outcome:
    """Run one soak from nothing and clean up after it."""
    url = broker_url(soak, args.redis_url)
    settings = CoordinatorSettings(
        redis_url=args.redis_url, broker_url=url, namespace=soak.namespace
    )
    app = create_app(settings, main=f"chaos-{soak.namespace}")
    servers = [SimulatedModelServer(f"m{i}", ["llama3.2"], ["llama3.2"]) for i in range(WORKERS)]
    logdir = Path(tempfile.mkdtemp(prefix=f"bench-chaos-{soak.namespace}-"))
    base = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": args.redis_url}
    base |= {
        "NAMESPACE": soak.namespace,
        "WORKER_TIER": "cpu",
        **({"BROKER_URL": url} if url else {}),
    }
    envs: list[dict[str, str]] = []
    for server in servers:
        server.start().set_fault(delay_s=args.task_ms / 1000)
        envs.append(
            {**base, "OLLAMA_URL": server.url, "EMBEDDINGS_URL": server.url, "OCR_URL": server.url}
        )
    procs = [start_worker(soak, i, env, logdir) for i, env in enumerate(envs)]
    stop, sent_ids = threading.Event(), set[str]()
    reaper = threading.Thread(target=Reaper(app).run, args=(1.0, stop), daemon=True)
    try:
        time.sleep(8.0)  # workers up (a fleet worker's first heartbeat probes its server)
        if soak.fleet:
            reaper.start()
        sender = app if soak.fleet else _plain_sender(url or args.redis_url, soak.namespace)
        client = fleet_of(app).registry.client
        return _measure(soak, args, sender, servers, (procs, envs, logdir), client, sent_ids)
    finally:
        stop.set()
        for proc in procs:
            stop_group(proc)
        for server in servers:
            server.stop()
        _forget(fleet_of(app).registry.client, soak, url, sent_ids)
        print(f"  logs: {logdir}", file=sys.stderr)


def _measure(
    soak: Soak,
    args: argparse.Namespace,
    sender: Celery,
    servers: list[SimulatedModelServer],
    fleet: tuple[list[subprocess.Popen[bytes]], list[dict[str, str]], Path],
    client: redis.Redis,
    sent_ids: set[str],
) -> Outcome:
    procs, envs, logdir = fleet
    until, kills = threading.Event(), [0]
    rng = random.Random(args.seed)
    killer = threading.Thread(
        target=lambda: kills.__setitem__(0, chaos(soak, procs, envs, logdir, until, rng))
    )
    killer.start()
    sent = publish(sender, soak, args.tasks, args.duration_s)
    sent_ids.update(sent)
    last_sent = time.time()
    until.set()
    killer.join()
    total = len(sent)
    done = drain(client, soak.namespace, sent, args.drain_s)
    calls: Counter[str] = sum((s.prompts for s in servers), Counter())
    completed = total - len(sent)
    return Outcome(
        completed=completed,
        lost=len(sent),
        twice=sum(1 for count in calls.values() if count > 1),
        drain_s=max(done, default=last_sent) - last_sent,
        kills=kills[0],
        held=_held_unacked(client, soak, set(sent)) if soak.broker == "redis" else 0,
    )


def _held_unacked(client: redis.Redis, soak: Soak, lost: set[str]) -> int:
    """The lost tasks kombu holds as unacknowledged (redelivered after its visibility
    timeout, an hour); the others are in no list at all."""
    key = f"{soak.namespace}.unacked" if soak.fleet else "unacked"
    held = 0
    for _, entry in client.hscan_iter(key):
        try:
            held += json.loads(entry)[0]["headers"]["id"] in lost
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    return held


def _plain_sender(broker: str, namespace: str) -> Celery:
    sender = Celery("plain-sender", broker=broker, set_as_current=False)
    sender.conf.update(task_serializer="json", accept_content=["json"])
    return sender


def _forget(client: redis.Redis, soak: Soak, url: str | None, sent: set[str]) -> None:
    for key in client.scan_iter(match=f"*{soak.namespace}*", count=1000):
        client.unlink(key)
    if not soak.fleet and url is None:  # plain Celery keeps kombu's unnamespaced hash
        for tag, entry in client.hscan_iter("unacked"):
            with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
                if json.loads(entry)[0]["headers"]["id"] in sent:
                    client.hdel("unacked", tag)
                    client.zrem("unacked_index", tag)
    if url is not None:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", soak.namespace], capture_output=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--broker", choices=["redis", "rabbitmq", "both"], default="both")
    parser.add_argument("--restart", choices=["slow", "fast", "both"], default="both")
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--duration-s", type=float, default=150.0)
    parser.add_argument("--drain-s", type=float, default=120.0)
    parser.add_argument("--task-ms", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=13)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    brokers = ["redis", "rabbitmq"] if args.broker == "both" else [args.broker]
    restarts = ["slow", "fast"] if args.restart == "both" else [args.restart]
    print(f"{args.tasks} tasks over {args.duration_s:g} s, a worker killed every 8-10 s")
    columns = ("kills", "done", "lost", "held", "twice", "drain s")
    print(f"{'broker':9} {'restart':8} {'who':7} " + " ".join(f"{c:>7}" for c in columns))
    for broker in brokers:
        for restart in restarts:
            for fleet in (True, False):
                got = soak_once(Soak(broker, restart, fleet), args)
                who = "fleet" if fleet else "plain"
                figures = (got.kills, got.completed, got.lost, got.held, got.twice)
                print(
                    f"{broker:9} {restart:8} {who:7} "
                    + " ".join(f"{n:7d}" for n in figures)
                    + f" {got.drain_s:7.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
