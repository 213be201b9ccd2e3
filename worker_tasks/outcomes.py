"""Every way a claimed message ends on a worker releases its claim: one owner, one hook per
outcome.

The router counts each message it sends to a worker against that worker (its claim, in the
message's ``aiq_claim`` header); the count is what keeps a burst from herding onto one
worker, so a claim left behind makes a worker look busy until it lapses. A release is by
claim id and exactly once (``coordinator/fleet/lua/release.lua``), so a hook may see an
outcome another hook saw too.

===========================  ===============================  ===========================
outcome                      where it is seen                 hook
===========================  ===============================  ===========================
success, failure             the process that ran the task    ``task_postrun``
retry                        the process that ran the task    ``task_postrun`` (the retry
                                                              message carries a claim of
                                                              its own)
retries exhausted            the process that ran the task    ``task_postrun`` (no retry
                                                              was routed: ``ModelTask``)
revoked, expired             the worker's main process        ``task_revoked``
rejected (bad message)       the worker's main process        ``task_rejected``
unknown task                 the worker's main process        ``task_unknown``
hard time limit              the worker's main process        ``task_failure`` with the
                                                              claim ``task_received``
                                                              noted there (the killed
                                                              child ran no postrun)
pool process lost            the message goes back to the     none: the claim stays with
                             queue (``task_reject_on_worker_  the message and is released
                             lost``)                          when it runs
worker lost                  the reaper                       the reaper moves the claim
                                                              with the message
===========================  ===============================  ===========================
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from celery import Task, signals
from celery.exceptions import TimeLimitExceeded

from coordinator.dispatch.app import Fleet, find_fleet
from coordinator.fleet.claims import CLAIM_HEADER, parse_claim

log = logging.getLogger(__name__)


def release(fleet: Fleet | None, header: object) -> None:
    """Release the claim a message carried (none, or no fleet: nothing to do). Never raises:
    a lost release costs balance until the claim lapses, never the task."""
    claim = parse_claim(header)
    if claim is None or fleet is None:
        return
    try:
        fleet.registry.release(*claim, lapse_s=fleet.router.claim_lapse_s)
    except Exception as exc:
        log.warning("could not release the claim of %s on %s: %s", claim[1], claim[0], exc)


def _header(headers: Mapping[str, Any] | None) -> object:
    return (headers or {}).get(CLAIM_HEADER)


def _fleet(owner: Any) -> Fleet | None:
    app = getattr(owner, "app", None)
    return find_fleet(app) if app is not None else None


RECEIVED_KEPT = 10_000
"""Claims of received messages the main process remembers, for a hard time limit (a
prefork pool reports that in the main process, where the task's headers are not)."""
_received: OrderedDict[str, object] = OrderedDict()


@signals.task_received.connect
def _on_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    header = _header(getattr(request, "request_dict", None))
    if header and _fleet(getattr(request, "task", None)) is not None:
        _received[request.id] = header
        while len(_received) > RECEIVED_KEPT:
            _received.popitem(last=False)


@signals.task_failure.connect
def _on_timed_out(sender: Any = None, task_id: str = "", exception: Any = None, **_: Any) -> None:
    if isinstance(exception, TimeLimitExceeded):
        release(_fleet(sender), _received.pop(task_id, None))


@signals.task_postrun.connect
def _on_ran(
    sender: Task[Any, Any] | None = None, task: Task[Any, Any] | None = None, **_: Any
) -> None:
    task = task or sender
    if task is not None:
        _received.pop(task.request.id or "", None)  # the solo and threads pools run it here
        release(_fleet(task), _header(task.request.headers))


@signals.task_revoked.connect
def _on_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    # Revoked and expired messages never run, so task_postrun never sees them.
    if request is not None:
        release(_fleet(sender), _header(getattr(request, "headers", None)))


@signals.task_rejected.connect
def _on_rejected(sender: Any = None, message: Any = None, **_: Any) -> None:
    if message is not None:
        release(_fleet(sender), _header(message.headers))


@signals.task_unknown.connect
def _on_unknown(sender: Any = None, message: Any = None, **_: Any) -> None:
    if message is not None:
        release(_fleet(sender), _header(message.headers))
