"""What one publisher's router reads from Redis each second, as the fleet grows.

A router refreshes its view every ``REGISTRY_REFRESH_S`` (default 1 s). This script
registers 10, 100 and 1,000 synthetic workers, lets an idle router refresh for
``--seconds`` through a byte-counting TCP proxy, and prints its Redis traffic per second:

* with nothing changing (no heartbeat written during the run), and
* with every worker heartbeating every ``--beat-every-s`` (the default interval, 30 s),
  written by another process as a fleet would;

each against the full read the router made before it read only what changed
(``Registry.snapshot()`` at every refresh), measured in the same run. A plain Celery
publisher reads nothing of the fleet: its figure is 0 by construction, so the full read
is the baseline. Multiply by the number of publishers (web processes, workers publishing
chord bodies) for what one Redis serves.

    .venv/bin/python -m bench.redis_traffic [--workers 10,100,1000] [--seconds 10]

Only keys under a fresh ``bench-<hex>`` namespace are written, and all are deleted.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.routing_overhead import beating, heartbeat
from coordinator.core.settings import CoordinatorSettings
from coordinator.dispatch.app import create_app, fleet_of
from coordinator.dispatch.router import FleetRouter
from coordinator.fleet.registry import Registry, redis_client


@dataclass
class Proxy:
    """A TCP proxy to Redis that counts the bytes each way and the requests."""

    target: tuple[str, int]
    sent: int = 0
    received: int = 0
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return int(listener.getsockname()[1])

    def reset(self) -> None:
        with self._lock:
            self.sent = self.received = self.requests = 0

    def _accept(self, listener: socket.socket) -> None:
        while True:
            client, _ = listener.accept()
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, upward: bool) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
                with self._lock:
                    if upward:
                        self.sent += len(chunk)
                        self.requests += 1
                    else:
                        self.received += len(chunk)
        except OSError:
            pass
        finally:
            sink.close()


def per_second(proxy: Proxy, seconds: float, refresh: Callable[[], object]) -> tuple[float, ...]:
    """Refresh once a second for ``seconds`` after a first (full) refresh; the traffic
    per second: requests, bytes sent, bytes received."""
    refresh()
    proxy.reset()
    started = time.monotonic()
    for tick in range(1, int(seconds) + 1):
        time.sleep(max(0.0, started + tick - time.monotonic()))  # the refresh interval
        refresh()
    elapsed = time.monotonic() - started
    return proxy.requests / elapsed, proxy.sent / elapsed, proxy.received / elapsed


def measure(
    args: argparse.Namespace, size: int, beat_every_s: float
) -> dict[str, tuple[float, ...]]:
    """The router's traffic and the full read's, through their own proxied clients."""
    namespace = f"bench-{uuid.uuid4().hex[:12]}"
    settings = CoordinatorSettings(redis_url=args.redis_url, namespace=namespace)
    app = create_app(settings)
    where = redis_client(args.redis_url, 5.0).connection_pool.connection_kwargs
    proxy = Proxy((str(where["host"]), int(where["port"])))
    proxied = redis_client(f"redis://127.0.0.1:{proxy.start()}/0", 5.0)
    registry = Registry(proxied, settings.keys, settings.ttl_s)
    try:
        for index in range(size):
            fleet_of(app).registry.publish(heartbeat(index))
        router = FleetRouter(registry=registry, refresh_s=0.0, decisions_kept=0)
        with beating(app, size, beat_every_s):
            changes = per_second(proxy, args.seconds, router.refresh)
            full = per_second(proxy, args.seconds, registry.snapshot)
        return {"changed only": changes, "full read": full}
    finally:
        client = fleet_of(app).registry.client
        for key in client.scan_iter(match=f"*{namespace}*"):
            client.unlink(key)
        fleet_of(app).close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--workers", default="10,100,1000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--beat-every-s", type=float, default=30.0)
    args = parser.parse_args()
    rows = []
    for size in [int(n) for n in args.workers.split(",")]:
        for beat_every_s, label in ((0.0, "nothing changing"), (args.beat_every_s, "beating")):
            for read, (requests, sent, received) in measure(args, size, beat_every_s).items():
                rows.append((size, label, read, requests, sent, received))
                print(f"{size} workers, {label}, {read}: {received / 1000:.1f} kB/s in")
    print(f"\none idle router refreshing every second, heartbeats every {args.beat_every_s} s")
    print(
        f"{'workers':>8}  {'fleet':<17}{'read':<14}{'requests/s':>11}{'kB/s out':>10}"
        f"{'kB/s in':>10}"
    )
    for size, label, read, requests, sent, received in rows:
        print(
            f"{size:>8}  {label:<17}{read:<14}{requests:>11.1f}{sent / 1000:>10.2f}"
            f"{received / 1000:>10.2f}"
        )


if __name__ == "__main__":
    main()
