"""What one ``apply_async`` costs on a Redis broker, and what of it can be avoided.

Publishes ``--tasks`` tasks (results ignored) per configuration and round, in one process on
one Redis, the configurations rotating each round; prints the medians of wall and CPU
microseconds per publish, their ratio to the configuration's baseline, and how many redis-py
clients each publish builds (counted in a separate, profiled pass of 500 publishes).

Plain Celery is an app with Celery's defaults and only a broker URL; the fleet is
``create_app``'s app publishing to one fixed queue (as in ``bench/routing_overhead.py``), so
both baselines are shown. Configurations:

* ``defaults``: ``task.apply_async(...)``, a producer acquired from the app's pool per call.
* ``one producer``: the same producer for every call (``app.producer_or_acquire()``, public).
* ``batched``: one producer inside kombu's ``Producer.batch()`` (public, kombu >= 5.7): one
  pipeline for the whole batch, sent when it reaches ``max_size`` commands or the block
  ends, so a message is not on the broker when ``apply_async`` returns.
* ``reused client``: kombu's Redis channel keeps one redis-py client rather than building
  one per command (``Channel.conn_or_acquire``, an internal: measured, not adopted).
* ``with sent event``: the fleet as it was, with ``task_send_sent_event`` (Flower's SENT
  state): a second publish per task, which the fleet's apps no longer make.

    .venv/bin/python -m bench.publishing [--tasks 5000] [--rounds 5]

Only keys holding a fresh ``pub-<hex>`` namespace are written, and all are deleted at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import os
import pstats
import statistics
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import redis
from celery import Celery
from kombu.transport import redis as kombu_redis

import worker_tasks.tasks  # noqa: F401  (registers the model tasks with every app)
from coordinator.core.settings import CoordinatorSettings
from coordinator.core.task_spec import GENERATE
from coordinator.dispatch.app import create_app, find_fleet

ARGS: Final = ("hi",)
KWARGS: Final = {"model": "llama3.2"}
COUNTED: Final = 500
PLAIN_TASK: Final = "bench.generate"


class ReusedClientChannel(kombu_redis.Channel):
    """kombu's Redis channel keeping one redis-py client for its commands.

    kombu builds a ``redis.Redis`` for every command it sends outside a pipeline, and each
    one copies redis-py's response-callback table (169 entries, each key upper-cased twice:
    redis/redis-py#3624). A client holds no per-command state, so one per channel serves as
    well; it is rebuilt when the channel replaces its connection pool (after a reconnect).
    Relies on kombu sending through ``conn_or_acquire()``: for measurement only.
    """

    _reused: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any | None = None) -> Generator[Any, None, None]:
        if client is not None:
            yield client
            return
        if self._reused is None or self._reused.connection_pool is not self.pool:
            with super().conn_or_acquire() as built:
                self._reused = built
        yield self._reused


class ReusedClientTransport(kombu_redis.Transport):
    Channel = ReusedClientChannel


@dataclass
class Config:
    """One configuration: an app, its task, where it publishes and how."""

    label: str
    app: Celery
    queue: str  # plain Celery: the app's default queue
    how: str  # "call", "producer" or "batch"
    group: str  # which baseline it is compared with
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    clients: float = 0.0

    def publish(self, tasks: int) -> None:
        """Publish ``tasks`` tasks the configuration's way."""
        task = self.app.tasks[PLAIN_TASK if self.group == "plain" else GENERATE]
        options: dict[str, Any] = {"ignore_result": True}
        if self.group == "fleet":  # past the router, as routing_overhead's plain Celery
            options["queue"] = self.queue
        if self.how == "call":
            for _ in range(tasks):
                task.apply_async(ARGS, KWARGS, **options)
            return
        with self.app.producer_or_acquire() as producer, _maybe_batch(producer, self.how):
            for _ in range(tasks):
                task.apply_async(ARGS, KWARGS, producer=producer, **options)


@contextmanager
def _maybe_batch(producer: Any, how: str) -> Iterator[None]:
    if how != "batch":
        yield
        return
    # Producer.batch is kombu 5.7's; the installed kombu-stubs predate it.
    with producer.batch():
        yield


def plain_app(name: str, redis_url: str, queue: str, transport: type | None = None) -> Celery:
    """A Celery app on Celery's defaults: a broker URL, a queue and a task of the model
    tasks' signature (not theirs: their base class belongs to the fleet)."""
    app = Celery(name, broker=redis_url, set_as_current=False)
    app.conf.task_default_queue = queue
    if transport is not None:
        app.conf.broker_transport = transport

    @app.task(name=PLAIN_TASK, shared=False)
    def generate(prompt: str, model: str = "llama3.2") -> str:
        return prompt

    return app


def fleet_app(settings: CoordinatorSettings, **conf: Any) -> Celery:
    """A fleet app (``create_app``) with ``conf`` on top, not Celery's current app."""
    app = create_app(settings, set_as_current=False)
    app.conf.update(conf)
    return app


def configs(redis_url: str, namespace: str) -> list[Config]:
    """Plain Celery's configurations, then the fleet's."""
    plain_q, fleet_q = f"{namespace}.plain", f"{namespace}.fixed"
    settings = CoordinatorSettings(redis_url=redis_url, namespace=namespace)
    plain = plain_app("plain", redis_url, plain_q)
    fleet = fleet_app(settings)
    return [
        Config("plain: defaults", plain, plain_q, "call", "plain"),
        Config("plain: one producer", plain, plain_q, "producer", "plain"),
        Config("plain: batched", plain, plain_q, "batch", "plain"),
        Config(
            "plain: reused client (internal)",
            plain_app("plain-reused", redis_url, plain_q, ReusedClientTransport),
            plain_q,
            "producer",
            "plain",
        ),
        Config("fleet: one producer", fleet, fleet_q, "producer", "fleet"),
        Config("fleet: batched", fleet, fleet_q, "batch", "fleet"),
        Config(
            "fleet: reused client (internal)",
            fleet_app(settings, broker_transport=ReusedClientTransport),
            fleet_q,
            "producer",
            "fleet",
        ),
        Config(
            "fleet: with sent event",
            fleet_app(settings, task_send_sent_event=True),
            fleet_q,
            "producer",
            "fleet",
        ),
    ]


def clients_per_publish(config: Config) -> float:
    """redis-py clients built per publish (``Redis.__init__`` calls, profiled)."""
    profile = cProfile.Profile()
    profile.runcall(config.publish, COUNTED)
    # Unwrapped: redis-py decorates __init__, and the decorator's code is shared.
    init = inspect.unwrap(redis.Redis.__init__).__code__
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    calls = stats.get((init.co_filename, init.co_firstlineno, init.co_name), (0, 0))[1]
    return float(calls) / COUNTED


def timed(publish: Callable[[int], None], tasks: int) -> tuple[float, float]:
    """Wall and CPU microseconds per publish."""
    wall, cpu = time.perf_counter(), time.process_time()
    publish(tasks)
    return (
        1e6 * (time.perf_counter() - wall) / tasks,
        1e6 * (time.process_time() - cpu) / tasks,
    )


def measure(all_configs: list[Config], client: redis.Redis, tasks: int, rounds: int) -> None:
    """Warm up and count clients, then ``rounds`` rotating rounds of every configuration."""
    for config in all_configs:
        config.publish(200)  # connections, declarations and code paths
        config.clients = clients_per_publish(config)
        client.delete(config.queue)
    for round_ in range(rounds):
        # Rotate the order each round, so no configuration always runs first (or last).
        shift = round_ % len(all_configs)
        for config in all_configs[shift:] + all_configs[:shift]:
            wall, cpu = timed(config.publish, tasks)
            config.wall.append(wall)
            config.cpu.append(cpu)
            client.delete(config.queue)  # Redis memory stays flat
        print(f"round {round_ + 1}: " + ", ".join(f"{c.wall[-1]:.0f}" for c in all_configs))


def print_medians(all_configs: list[Config]) -> None:
    """The medians, each configuration against its group's first (its baseline)."""
    print(
        f"{'configuration':<34}{'wall µs':>9}{'CPU µs':>8}{'x wall':>8}{'x CPU':>7}"
        f"{'best wall':>11}{'clients':>9}"
    )
    baselines: dict[str, Config] = {}
    for config in all_configs:
        base = baselines.setdefault(config.group, config)
        wall, cpu = statistics.median(config.wall), statistics.median(config.cpu)
        print(
            f"{config.label:<34}{wall:>9.0f}{cpu:>8.0f}"
            f"{statistics.median(base.wall) / wall:>8.2f}"
            f"{statistics.median(base.cpu) / cpu:>7.2f}{min(config.wall):>11.0f}"
            f"{config.clients:>9.2f}"
        )
    print("x wall, x CPU: the group's first configuration's µs over this one's (>1: cheaper)")
    # On a shared machine the wall time of a round depends on its neighbours: the CPU time
    # and the least disturbed round say more about the publisher itself.
    print("best wall: the least disturbed round; clients: redis-py clients built per publish")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--tasks", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    namespace = f"pub-{uuid.uuid4().hex[:12]}"
    client = redis.Redis.from_url(args.redis_url)
    all_configs = configs(args.redis_url, namespace)
    try:
        measure(all_configs, client, args.tasks, args.rounds)
    finally:
        deleted = sum(client.unlink(k) for k in client.scan_iter(match=f"*{namespace}*"))
        for config in all_configs:
            fleet = find_fleet(config.app)
            if fleet is not None:
                fleet.close()
    print(f"\n{args.tasks} tasks x {args.rounds} rounds, medians, {args.redis_url}")
    print_medians(all_configs)
    print(f"cleaned up {deleted} keys under {namespace}")


if __name__ == "__main__":
    main()
