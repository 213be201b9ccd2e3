"""Moving messages on RabbitMQ.

RabbitMQ gives a consumer's unacknowledged messages back to their queue when its connection
dies (once it notices: its heartbeat, 60 s, for a host that vanished), so a dead worker's
messages wait in its queue and nothing waits on a visibility timeout. Each is taken
(``basic.get``), published where it goes (the broker confirms it: ``confirm_publish``), then
acknowledged: a reaper that dies between the two leaves a copy in both places, run twice at
worst, never lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, cast

from celery import Celery
from kombu import Connection, Producer, Queue
from kombu.message import Message

from coordinator.dispatch.app import Fleet
from coordinator.fleet.claims import CLAIM_HEADER, claim_header
from coordinator.recovery.report import ReapReport
from coordinator.recovery.targets import Targets, protocol_2_arguments

log = logging.getLogger(__name__)

PLAIN_SCANNED: Final = 200
"""Messages of Celery's default queue looked at per scan."""
MAX_MOVED: Final = 1_000_000
"""A bound on one reap, should a queue refill as fast as it is emptied."""
KEPT_PROPERTIES: Final = ("correlation_id", "reply_to", "priority", "delivery_mode")


@dataclass
class AmqpMessages:
    """A dead worker's messages, and the fleet's in Celery's default queue, on RabbitMQ."""

    app: Celery
    """A fleet app on the broker: its connection, and its queue declarations (quorum)."""
    fleet: Fleet
    targets: Targets
    move_delay_s: float = 0.0
    """Pause between two moves; only tests use it, to kill a reaper halfway."""

    def reap(self, report: ReapReport, queue: str) -> None:
        """Move everything waiting in ``queue``, oldest first."""
        with self._connection() as connection:
            for message in self._taken(connection, queue, MAX_MOVED):
                if not self._move(report, connection, message, source=queue):
                    break

    def reroute_plain(self, report: ReapReport, queue: str) -> None:
        """Route the fleet's tasks out of ``queue``, up to the first task of another app,
        which goes back at the head: AMQP cannot look past it without taking it, and a
        message taken and returned again and again counts against a quorum queue's
        delivery limit (keep Celery's default queue a classic one, as Celery declares it)."""
        with self._connection() as connection:
            for message in self._taken(connection, queue, PLAIN_SCANNED):
                task = str((message.headers or {}).get("task", ""))
                if self.fleet.router.task_spec(task) is None:
                    message.reject(requeue=True)
                    return
                self._move(report, connection, message)

    def retire(self, queue: str) -> None:
        """Delete a gone worker's queue once drained, when nobody consumes it (a worker back
        under that id declares it again)."""
        with self._connection() as connection:
            try:
                bound = Queue(queue, channel=connection.default_channel, no_declare=True)
                bound.delete(if_unused=True, if_empty=True)
            except connection.channel_errors as exc:  # in use, not empty, or gone already
                log.debug("queue %s kept: %s", queue, exc)

    def _connection(self) -> Connection:
        # Celery's broker connection pool (its type stubs call it a producer pool).
        return cast(Connection, self.app.pool.acquire(block=True))

    def _taken(self, connection: Connection, queue: str, limit: int) -> Iterator[Message]:
        """Up to ``limit`` messages of ``queue``, one at a time, unacknowledged; none when it
        does not exist (it is read, never declared: another app's may be of another type)."""
        source = Queue(queue, channel=connection.default_channel, no_declare=True)
        for _ in range(limit):
            try:
                message = source.get(no_ack=False)
            except connection.channel_errors as exc:  # no such queue: nothing to move
                log.debug("queue %s not read: %s", queue, exc)
                return
            if message is None:
                return
            yield message

    def _move(
        self, report: ReapReport, connection: Connection, message: Message, source: str = ""
    ) -> bool:
        """Publish ``message`` where it goes now, then acknowledge it; ``False`` (and the
        message left in place) when that is ``source`` again: its worker is back."""
        # The broker's own headers (x-death, x-delivery-count) describe the old delivery.
        headers: dict[str, Any] = {
            k: v for k, v in (message.headers or {}).items() if not k.startswith("x-")
        }
        target = self.targets.target(headers, *protocol_2_arguments(message.body or b""))
        if target is not None and target.queue == source:
            message.reject(requeue=True)
            return False
        if self.move_delay_s:
            time.sleep(self.move_delay_s)
        if target is not None:
            headers.pop(CLAIM_HEADER, None)
            if target.claim is not None:
                headers[CLAIM_HEADER] = claim_header(target.claim)
            destination = self.app.amqp.queues[target.queue]
            Producer(connection.default_channel).publish(
                message.body,
                exchange=destination.exchange,
                routing_key=destination.routing_key,
                declare=[destination],
                headers=headers,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                **_kept(message.properties),
            )
        message.ack()
        report.record(headers, target, self.fleet)
        return True


def _kept(properties: dict[str, Any]) -> dict[str, Any]:
    return {name: properties[name] for name in KEPT_PROPERTIES if properties.get(name) is not None}
