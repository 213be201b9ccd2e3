"""Broadcast jobs: one message in each capable worker's own queue, gathered by a chord.

Why not a fanout exchange for the jobs themselves: on Redis a fanout exchange is PUB/SUB,
so a worker that is not subscribed at the moment of publishing (restarting, reconnecting)
never gets the message, and a chord over one fanned-out message counts one result and
drops the others without an error. A chord whose header holds one signature per recipient,
each in that recipient's queue, waits in Redis for a worker that is briefly away and
collects every result. Fleet-wide control messages that need no result, such as "probe and
heartbeat now", go through Celery's remote control instead (:func:`send_control`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from celery import Celery, chord, group
from celery.result import AsyncResult, GroupResult
from pydantic import BaseModel, Field

from coordinator.broadcast.job_types import JobType, job_type
from coordinator.core.errors import JobError
from coordinator.core.heartbeat import ROUTABLE_STATUSES, TIER_CPU, Heartbeat
from coordinator.dispatch.app import default_app, fleet_of
from coordinator.fleet.counters import record_broadcast

log = logging.getLogger(__name__)

RUN_JOB: Final = "worker_tasks.run_broadcast_job"
GATHER: Final = "worker_tasks.gather_broadcast"
CONTROL_COMMANDS: Final[Mapping[str, str]] = {"refresh": "aiq_refresh"}
"""Control messages by name -> the remote-control command workers register for it."""
POLL_S: Final = 0.05
MAX_JOB_DATA_BYTES: Final = 16 * 1024 * 1024
"""Every recipient's share travels as one Redis message; bigger jobs belong in a store."""

OutcomeStatus = Literal["accepted", "failed", "timeout"]
"""A broadcast recipient's answer (not :data:`~coordinator.core.heartbeat.WorkerStatus`)."""
STATUS_CODES: Final[Mapping[OutcomeStatus, int]] = {"accepted": 200, "failed": 500, "timeout": 504}
REFUSED_CODE: Final = 422
"""``status_code`` of a worker that refused a job it cannot run (``failed``)."""


class WorkerOutcome(BaseModel):
    """One recipient's answer."""

    worker_id: str
    status: OutcomeStatus
    status_code: int
    result: dict[str, Any] | None = None
    error: str | None = None
    duration_s: float | None = None


class BroadcastResult(BaseModel):
    """The design's broadcast response, plus the job's aggregated result."""

    job_type: str
    broadcast_id: str
    broadcasted_to: int
    successful: int
    failed: int
    workers: list[WorkerOutcome]
    aggregated: dict[str, Any] = Field(default_factory=dict)


def select_recipients(
    heartbeats: Sequence[Heartbeat], required_capability: str | None
) -> list[Heartbeat]:
    """Live GPU and CPU workers (tier 1 or 2) with the capability (any, when ``None``)
    and that capability's service not reported unhealthy."""
    return sorted(
        (
            hb
            for hb in heartbeats
            if hb.tier is not None
            and hb.tier <= TIER_CPU
            and hb.status in ROUTABLE_STATUSES
            and (
                required_capability is None
                or (
                    required_capability in hb.capabilities
                    and hb.services_status.get(required_capability) != "unhealthy"
                )
            )
        ),
        key=lambda hb: hb.worker_id,
    )


def gather(job: JobType, broadcast_id: str, outcomes: Sequence[WorkerOutcome]) -> BroadcastResult:
    """Count the outcomes and aggregate the accepted results; used by the chord body and
    by a caller whose wait ran out."""
    accepted = [(o.worker_id, o.result or {}) for o in outcomes if o.status == "accepted"]
    return BroadcastResult(
        job_type=job.name,
        broadcast_id=broadcast_id,
        broadcasted_to=len(outcomes),
        successful=len(accepted),
        failed=len(outcomes) - len(accepted),
        workers=list(outcomes),
        aggregated=job.summarize(accepted) if job.summarize is not None else {},
    )


@dataclass
class BroadcastHandle:
    """A broadcast under way; :meth:`wait` gives its result."""

    app: Celery
    job: JobType
    broadcast_id: str
    recipients: list[str]
    body: AsyncResult[Any]
    header: GroupResult
    sent_at: float
    timeout_s: float

    def ready(self) -> bool:
        """Whether every recipient has answered."""
        return bool(self.body.ready())

    def wait(self, timeout_s: float | None = None) -> BroadcastResult:
        """The result once every recipient answered, or at the deadline with the missing ones
        reported ``timeout``. Never raises for a worker's failure."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = self.sent_at + limit
        while not self.body.ready() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if self.body.successful():
            result = BroadcastResult.model_validate(self.body.result)
        else:
            result = gather(self.job, self.broadcast_id, self._partial())
        _stop_waiting(self.app, [child.id for child in self.header.results or []])
        _after(self.app, result)
        return result

    def _partial(self) -> list[WorkerOutcome]:
        outcomes = []
        for worker_id, child in zip(self.recipients, self.header.results or [], strict=True):
            if child.successful():
                outcomes.append(WorkerOutcome.model_validate(child.result))
            elif child.failed():  # the wrapper catches everything; this is Celery's own error
                outcomes.append(
                    WorkerOutcome(
                        worker_id=worker_id,
                        status="failed",
                        status_code=STATUS_CODES["failed"],
                        error=repr(child.result),
                    )
                )
            else:
                outcomes.append(
                    WorkerOutcome(
                        worker_id=worker_id,
                        status="timeout",
                        status_code=STATUS_CODES["timeout"],
                        error=f"no answer within {self.timeout_s}s",
                    )
                )
        return outcomes


def broadcast_async(
    job_type_name: str,
    job_data: Mapping[str, Any],
    required_capability: str | None = None,
    *,
    timeout_s: float = 300.0,
    app: Celery | None = None,
) -> BroadcastHandle:
    """Send a job to every capable live worker; returns at once with a handle.

    Raises:
        JobError: unknown job type, invalid ``job_data``, or no capable live worker;
            nothing is sent then.
    """
    app = app or default_app()
    job = job_type(job_type_name)
    size = len(json.dumps(job_data, default=str))
    if size > MAX_JOB_DATA_BYTES:
        raise JobError(f"job_data is {size} bytes, over the {MAX_JOB_DATA_BYTES} limit")
    data = job.parse(job_data)
    capability = required_capability or job.required_capability
    recipients = select_recipients(fleet_of(app).registry.live_workers(), capability)
    if not recipients:
        offering = f" offers {capability!r}" if capability else ""
        raise JobError(f"no live GPU or CPU worker{offering}")
    broadcast_id = uuid.uuid4().hex
    keys = fleet_of(app).keys
    # A worker that comes back after the caller gave up must not start stale work.
    expires = timeout_s + 60.0
    header = [
        app.signature(
            RUN_JOB,
            args=(job.name, share.model_dump(mode="json"), broadcast_id, hb.worker_id, capability),
            queue=keys.worker_queue(hb.worker_id),
            expires=expires,
        )
        for hb, share in zip(recipients, job.split(data, len(recipients)), strict=True)
    ]
    body = app.signature(GATHER, args=(job.name, broadcast_id), queue=keys.default_queue)
    sent_at = time.monotonic()
    result = chord(group(header))(body)
    assert isinstance(result.parent, GroupResult)  # a chord's parent is its header
    log.info(
        "broadcast %s %s to %d workers: %s",
        job.name,
        broadcast_id,
        len(recipients),
        ", ".join(hb.worker_id for hb in recipients),
    )
    return BroadcastHandle(
        app=app,
        job=job,
        broadcast_id=broadcast_id,
        recipients=[hb.worker_id for hb in recipients],
        body=result,
        header=result.parent,
        sent_at=sent_at,
        timeout_s=timeout_s,
    )


def broadcast(
    job_type_name: str,
    job_data: Mapping[str, Any],
    required_capability: str | None = None,
    *,
    timeout_s: float = 300.0,
    app: Celery | None = None,
) -> BroadcastResult:
    """Send a job to every capable live worker and wait for the aggregated answer.

    Returns within about ``timeout_s``; workers that did not answer by then are reported
    ``timeout``, workers whose job raised ``failed``, and the others' results are kept.
    """
    handle = broadcast_async(
        job_type_name, job_data, required_capability, timeout_s=timeout_s, app=app
    )
    return handle.wait()


def send_control(app: Celery, command: str) -> None:
    """Send a control message to every worker of the fleet (no result): ``refresh`` makes
    each probe its services and heartbeat now.

    Celery's remote control (the one ``celery inspect`` and ``revoke`` use, on the fleet's
    own exchange) carries it, because its commands run in the worker's main process, where
    the heartbeat threads are, whatever the pool; a task would run in a prefork child.
    """
    if command not in CONTROL_COMMANDS:
        raise JobError(f"unknown control command {command!r}: expected one of {CONTROL_COMMANDS}")
    app.control.broadcast(CONTROL_COMMANDS[command])


def _after(app: Celery, result: BroadcastResult) -> None:
    # Jobs change what workers have loaded; the router should not wait a heartbeat to know.
    try:
        send_control(app, "refresh")
        record_broadcast(
            fleet_of(app).registry, result.job_type, (w.status for w in result.workers)
        )
    except Exception as exc:  # best effort: the next heartbeat brings the same news
        log.warning("could not refresh the fleet or count the broadcast: %s", exc)


def _stop_waiting(app: Celery, task_ids: Sequence[str]) -> None:
    """Drop the caller-side waiters Celery left on a chord's header results.

    Celery's Redis backend builds a GroupResult of the header when it applies a chord, and
    each of its results subscribes to its task's channel and stays referenced until the
    result is *drained*, which polling ``ready()`` never does: a long-lived caller would
    keep one subscription and one object per worker per broadcast. The public
    ``remove_pending_result`` forgets only the very result object it is given, and the
    waiting ones are objects the chord made, out of reach: hence the backend's table,
    guarded, and pinned by a test (docs/architecture.md lists it).
    """
    backend = app.backend
    pending = getattr(backend, "_pending_results", ())
    consumer = getattr(backend, "result_consumer", None)
    for task_id in task_ids:
        for mapping in pending:
            mapping.pop(task_id, None)
        if consumer is not None and hasattr(consumer, "cancel_for"):
            consumer.cancel_for(task_id)
