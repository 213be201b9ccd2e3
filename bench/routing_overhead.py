"""What the fleet router costs a publisher: plain Celery against routed publishing.

Publishes ``--tasks`` model tasks with plain Celery (its own app: Celery's defaults, JSON)
to one fixed queue, then the same tasks through the router with 10, 100 and 1,000
synthetic live workers registered (nobody consumes them). While it publishes, another
process rewrites the workers' heartbeats as a fleet heartbeating every ``--beat-every-s``
would (the default interval: 30 s), so the router keeps up with a changing fleet, not a
frozen one. Same process, same Redis, one producer each; the configurations alternate
over ``--rounds`` rounds. Prints the median publish rates, their ratio, and the router's
own time per decision (``FleetRouter.route`` called directly: wall and CPU, its batched
Redis writes and refreshes included). Results are ignored in both paths so only
publishing is timed.

    .venv/bin/python -m bench.routing_overhead [--tasks 10000] [--rounds 3]
        [--workers 10,100,1000] [--beat-every-s 30] [--policy cost]

Only keys under a fresh ``bench-<hex>`` namespace are written, and all are deleted at the end.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from celery import Celery

import worker_tasks.tasks  # noqa: F401  (registers the model tasks with every app)
from coordinator.core.heartbeat import Heartbeat
from coordinator.core.keys import Keys
from coordinator.core.settings import CoordinatorSettings
from coordinator.core.task_spec import EMBED, GENERATE, OCR
from coordinator.dispatch.app import create_app, find_fleet, fleet_of
from coordinator.fleet.registry import Registry, redis_client
from coordinator.routing import DEFAULT_POLICY, POLICIES

TARGETS: Final = {100: (0.95, 30.0), 1000: (0.90, 60.0)}
"""Fleet size -> (publish rate ratio at least, route() CPU µs at most): issue 14's."""
SERVICES: Final = ("vllm", "ocr", "embeddings")
MODELS: Final = ("llama3.2", "qwen2.5", "mistral", "llama-vision", "nomic-embed-text")
WORKLOAD: Final = (
    (GENERATE, ("hi",), "llama3.2"),
    (GENERATE, ("hi",), "qwen2.5"),
    (OCR, ("aGk=",), "llama-vision"),
    (EMBED, ("hi",), "nomic-embed-text"),
)


def heartbeat(index: int) -> Heartbeat:
    """A varied, reproducible live worker that offers every service."""
    rng = random.Random(index)
    tier = 1 + index % 3
    on_disk = rng.sample(MODELS, k=rng.randint(1, 3))
    return Heartbeat(
        worker_id=f"bench-w{index:03d}",
        current_load=round(rng.random(), 3),
        gpu_utilization=round(rng.uniform(0, 100), 1) if tier == 1 else None,
        active_requests=rng.randint(0, 4),
        loaded_models=tuple(on_disk),
        models_in_memory=tuple(on_disk[:1]),
        specialization=rng.choice((*SERVICES, None)),
        services_status=dict.fromkeys(SERVICES, "healthy"),
        tier=tier,
        capabilities=SERVICES,
    )


def set_fleet(app: Celery, size: int) -> None:
    """Exactly ``size`` live workers, no in-flight counts or leases, and a router that sees
    them now."""
    registry = fleet_of(app).registry
    for hb in registry.live_workers():
        registry.remove(hb.worker_id)
    for index in range(size):
        registry.publish(heartbeat(index))
    fleet_of(app).router.claims.flush()
    # A fresh fleet each time: no counts, and no model loads under way (the cost policy's
    # leases), so every configuration starts from the same cold state.
    claims = [registry.keys.claims(str(hb.worker_id)) for hb in registry.live_workers()]
    registry.client.delete(registry.keys.leases, *claims)
    fleet_of(app).router.refresh_s = 0.0
    fleet_of(app).router.route(GENERATE, "vllm", "llama3.2")  # takes a fresh snapshot
    fleet_of(app).router.refresh_s = 1.0


def publish(app: Celery, tasks: int, queue: str | None) -> float:
    """Publish ``tasks`` tasks; returns tasks per second."""
    options: dict[str, Any] = {"ignore_result": True}
    if queue is not None:
        options["queue"] = queue
    jobs = [WORKLOAD[i % len(WORKLOAD)] for i in range(tasks)]
    fleet = find_fleet(app)
    with app.producer_or_acquire() as producer:
        started = time.perf_counter()
        for name, args, model in jobs:
            app.tasks[name].apply_async(args, {"model": model}, producer=producer, **options)
        if fleet is not None:
            fleet.router.claims.flush()
        return tasks / (time.perf_counter() - started)


def plain_app(settings: CoordinatorSettings) -> Celery:
    """Plain Celery on the same broker: its defaults, JSON as the fleet's, no router."""
    app = Celery("plain", broker=settings.broker, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    return app


def decision_cost_us(app: Celery, decisions: int) -> tuple[float, float]:
    """Wall and CPU microseconds per ``FleetRouter.route`` call, batched writes included."""
    router = fleet_of(app).router
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(decisions):
        name, _, model = WORKLOAD[i % len(WORKLOAD)]
        router.route(name, SERVICES[i % 3], model)
    router.claims.flush()
    return (
        1e6 * (time.perf_counter() - wall) / decisions,
        1e6 * (time.process_time() - cpu) / decisions,
    )


def clear(app: Celery, namespace: str) -> None:
    """Drop published messages and counts between loops, so Redis memory stays flat."""
    client = fleet_of(app).registry.client
    for key in client.scan_iter(match=f"{namespace}.*", count=1000):
        client.unlink(key)
    for key in client.scan_iter(match=fleet_of(app).registry.keys.claims_prefix + "*", count=1000):
        client.unlink(key)
    client.delete(fleet_of(app).registry.keys.decisions)


Rates = dict[int, list[float]]
"""Tasks per second by fleet size (0: plain Celery), one per round."""
Costs = dict[int, list[tuple[float, float]]]
"""Wall and CPU microseconds per decision by fleet size, one per round."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="10,100,1000", help="fleet sizes, comma-separated")
    parser.add_argument(
        "--beat-every-s", type=float, default=30.0, help="each worker's heartbeat (0: frozen)"
    )
    parser.add_argument("--policy", default=DEFAULT_POLICY, choices=sorted(POLICIES))
    return parser.parse_args()


def beat(redis_url: str, namespace: str, size: int, every_s: float, stop: Any) -> None:
    """Rewrite the heartbeats of ``size`` workers as if each beat every ``every_s``."""
    registry = Registry(redis_client(redis_url, 5.0), Keys(namespace), ttl_s=90.0)
    gap_s, due, index = every_s / size, time.monotonic(), 0
    while not stop.is_set():
        registry.publish(heartbeat(index % size))
        index, due = index + 1, due + gap_s
        stop.wait(max(0.0, due - time.monotonic()))


@contextmanager
def beating(app: Celery, size: int, every_s: float) -> Iterator[None]:
    """The fleet heartbeating in another process (its CPU is not the publisher's)."""
    if every_s <= 0:
        yield
        return
    settings = fleet_of(app).settings
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    process = spawn.Process(
        target=beat, args=(settings.redis_url, settings.namespace, size, every_s, stop)
    )
    process.start()
    try:
        yield
    finally:
        stop.set()
        process.join(10.0)


def measure(
    app: Celery, sizes: list[int], tasks: int, rounds: int, every_s: float
) -> tuple[Rates, Costs]:
    """Warm up, then ``rounds`` rounds over plain Celery and each fleet size."""
    namespace = fleet_of(app).settings.namespace
    fixed = f"{namespace}.fixed"
    rates: Rates = {size: [] for size in [0, *sizes]}
    costs: Costs = {size: [] for size in sizes}
    plain = plain_app(fleet_of(app).settings)
    set_fleet(app, max(sizes))
    publish(plain, 500, fixed)  # warm up connections and code paths
    publish(app, 500, None)
    clear(app, namespace)
    for round_ in range(rounds):
        # Rotate the order each round, so no configuration always runs first (or last).
        order = [0, *sizes]
        order = order[round_ % len(order) :] + order[: round_ % len(order)]
        for size in order:
            if size:
                set_fleet(app, size)
                with beating(app, size, every_s):
                    rates[size].append(publish(app, tasks, None))
                    costs[size].append(decision_cost_us(app, tasks))
            else:
                rates[size].append(publish(plain, tasks, fixed))
            clear(app, namespace)
            print(f"round {round_ + 1}: {size or 'plain'} {rates[size][-1]:.0f} tasks/s")
    return rates, costs


def print_medians(sizes: list[int], rates: Rates, costs: Costs) -> float:
    """The table of medians; returns plain Celery's rate, the baseline of the ratios."""
    plain = statistics.median(rates[0])
    print("medians:")
    print(
        f"{'configuration':<24}{'tasks/s':>9}{'ratio':>8}{'route wall µs':>15}{'route CPU µs':>14}"
    )
    print(f"{'plain Celery, one queue':<24}{plain:>9.0f}{1.0:>8.3f}")
    for size in sizes:
        rate = statistics.median(rates[size])
        wall = statistics.median(c[0] for c in costs[size])
        cpu = statistics.median(c[1] for c in costs[size])
        label = f"router, {size} workers"
        print(f"{label:<24}{rate:>9.0f}{rate / plain:>8.3f}{wall:>15.1f}{cpu:>14.1f}")
    return plain


def print_targets(sizes: list[int], rates: Rates, costs: Costs, plain: float) -> None:
    print()
    for size, (ratio_target, cpu_target) in TARGETS.items():
        if size not in sizes:
            continue
        ratio = statistics.median(rates[size]) / plain
        cpu = statistics.median(c[1] for c in costs[size])
        print(
            f"{size} workers: ratio {ratio:.3f} (target >= {ratio_target}: "
            f"{'met' if ratio >= ratio_target else 'missed'}), route() CPU {cpu:.1f} µs "
            f"(target <= {cpu_target:.0f}: {'met' if cpu <= cpu_target else 'missed'})"
        )


def main() -> None:
    args = parse_args()
    sizes = [int(n) for n in args.workers.split(",")]
    namespace = f"bench-{uuid.uuid4().hex[:12]}"
    settings = CoordinatorSettings(
        redis_url=args.redis_url, namespace=namespace, routing_policy=args.policy
    )
    app = create_app(settings)
    try:
        rates, costs = measure(app, sizes, args.tasks, args.rounds, args.beat_every_s)
    finally:
        client = fleet_of(app).registry.client
        deleted = sum(client.unlink(k) for k in client.scan_iter(match=f"*{namespace}*"))
        fleet_of(app).close()

    print(
        f"\n{args.tasks} tasks x {args.rounds} rounds, policy {args.policy}, heartbeats every "
        f"{args.beat_every_s} s, {args.redis_url}"
    )
    plain = print_medians(sizes, rates, costs)
    print_targets(sizes, rates, costs, plain)
    print(f"cleaned up {deleted} keys under {namespace}")


if __name__ == "__main__":
    main()
