"""The worker's remote-control commands: fleet-wide messages handled in its main process.

Celery runs remote-control commands in the worker's main process whatever the pool, where
the heartbeat and probe threads live; a task would run in a prefork child, whose copy of the
heartbeat sender has no threads. Sent by :func:`coordinator.broadcast.send_control`.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command

from coordinator.broadcast.client import CONTROL_COMMANDS


@control_command(name=CONTROL_COMMANDS["refresh"])
def aiq_refresh(state: Any) -> dict[str, str]:
    """Probe the model services and heartbeat now (after a broadcast changed what is loaded)."""
    runtime = getattr(state.consumer.app, "runtime", None)
    if runtime is None:
        return {"ok": "no fleet runtime here"}
    runtime.heartbeat.refresh_soon()
    return {"ok": "refreshing"}
