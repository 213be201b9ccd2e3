"""Every Redis key and broker queue name this project uses, in one place.

All names start with the namespace (``NAMESPACE``, default ``aiq``) so several fleets, or
test runs, can share one Redis server without touching each other's data.

Registry keys (the coordinator's own data):

==================================  ======  ===============================================
key                                 type    contents
==================================  ======  ===============================================
``{ns}:worker:{worker_id}``         string  the worker's last heartbeat (JSON), expires
                                            after ``HEARTBEAT_TTL_S``
``{ns}:workers``                    set     ids of workers that have heartbeated; an id
                                            whose heartbeat key has expired is removed by
                                            the next registry read
``{ns}:known``                      hash    worker_id -> JSON of its heartbeat interval,
                                            TTL and incarnation, for every worker that has
                                            heartbeated and not left cleanly: the reaper
                                            looks here for workers that went silent
``{ns}:gone``                       hash    worker_id -> when it was reaped or shut down
                                            (unix s): the reaper drains its queue a while
                                            more, for messages that arrive late
``{ns}:claims:{worker_id}``         zset    one member per message routed to the worker
                                            and not finished (queued or running): its
                                            claim id, scored by the unix time the claim
                                            lapses if nothing releases it; the worker's
                                            in-flight count is its size
``{ns}:down:{worker_id}``           hash    service -> unix time until which the worker's
                                            service counts as unhealthy: a task found it
                                            unreachable, and the router must not wait for
                                            the next heartbeat to know
``{ns}:released:{worker_id}``       zset    claim ids released before their claim was
                                            written (the router writes claims in
                                            batches): the claim is then never added;
                                            scored by lapse time like the claims
``{ns}:leases``                     hash    JSON ``[model, worker_id]`` -> ``"ready_at
                                            expires_at"`` (unix s): the worker is loading the
                                            model, expected in memory at ``ready_at``; the
                                            entry is void after ``expires_at`` and pruned by
                                            the next lease taken
``{ns}:seq``                        string  the fleet's change counter: bumped by every
                                            write a router must see (a heartbeat, a claim
                                            batch, a release, a mark, a departure)
``{ns}:changes``                    zset    worker_id -> the change counter at its last
                                            change: a router reads only the workers
                                            changed since its last read
``{ns}:beat_changes``               zset    worker_id -> the change counter at its last
                                            heartbeat: a router re-reads a heartbeat only
                                            when it is new
``{ns}:demand``                     hash    model -> ``"rate at"``: requests per second
                                            for the model over every publisher,
                                            exponentially decayed, as of ``at`` (unix s)
``{ns}:backlog``                    zset    worker_id -> messages waiting in its own
                                            queue, posted by each worker with some: where
                                            an idle worker looks for work to steal
``{ns}:tasks``                      hash    task name -> its :class:`TaskSpec` (JSON), as
                                            the workers that run it declare it: how a
                                            process without the task's code routes it
``{ns}:decisions``                  list    the last ``DECISIONS_KEPT`` routing decisions
                                            (JSON), newest first
``{ns}:metrics:{name}``             hash    monotonic counters for ``/metrics``: ``routed``
                                            (worker|service), ``fallback`` (service|reason),
                                            ``model`` (hit, miss), ``latency`` (histogram
                                            bucket, sum, count), ``broadcast``
                                            (job type|status)
==================================  ======  ===============================================

Celery's Redis transport keeps, under names this project gives it (transport options
``unacked_key``, ``unacked_index_key``, ``unacked_mutex_key``), ``{ns}.unacked`` (hash:
delivery tag -> the message, its exchange and routing key), ``{ns}.unacked_index`` (sorted
set: delivery tag -> delivery time) and ``{ns}.unacked_mutex`` for messages delivered and
not yet acknowledged; the reaper moves a dead worker's entries out of them.

Broker queues (Celery's Redis transport keeps each queue as a list named after it):

==================================  ===============================================
queue                               consumed by
==================================  ===============================================
``{ns}.worker.{worker_id}``         that worker only; the router's usual target
``{ns}.service.{service}``          every worker with the capability; the fallback
                                    when no live worker can take a task
``{ns}.default``                    every worker; tasks that are not model tasks
``{ns}.control.pidbox`` (fanout)    every worker of the fleet: Celery's remote control
                                    (``refresh``, ``revoke``, ``inspect``), handled in
                                    each worker's main process
==================================  ===============================================

The registry keys share the hash tag ``{ns}``, so one fleet's registry hashes to one slot.
That is a step towards Redis Cluster, not support for it: the scripts build some key names
from prefixes (Cluster wants every key a script touches passed in ``KEYS``) and kombu's
Redis transport does not speak Cluster. Run one Redis per fleet (Sentinel for failover).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """Builds every Redis key and queue name for one namespace."""

    namespace: str = "aiq"

    @property
    def _tag(self) -> str:
        return "{" + self.namespace + "}"

    def worker(self, worker_id: str) -> str:
        """The key holding one worker's heartbeat."""
        return f"{self._tag}:worker:{worker_id}"

    @property
    def worker_prefix(self) -> str:
        """The common prefix of every heartbeat key (used by the registry's Lua script)."""
        return f"{self._tag}:worker:"

    @property
    def workers(self) -> str:
        """The set of worker ids that have heartbeated."""
        return f"{self._tag}:workers"

    @property
    def known(self) -> str:
        """The hash of every worker that heartbeated and did not leave cleanly -> its queue."""
        return f"{self._tag}:known"

    @property
    def gone(self) -> str:
        """The hash of workers reaped or shut down, whose queues are drained a while more."""
        return f"{self._tag}:gone"

    def claims(self, worker_id: str) -> str:
        """The sorted set of messages routed to ``worker_id`` and not finished yet."""
        return f"{self._tag}:claims:{worker_id}"

    def released(self, worker_id: str) -> str:
        """The sorted set of ``worker_id``'s claims released before they were written."""
        return f"{self._tag}:released:{worker_id}"

    @property
    def claims_prefix(self) -> str:
        """The common prefix of every claims key (used by the registry's Lua scripts)."""
        return f"{self._tag}:claims:"

    def down(self, worker_id: str) -> str:
        """The hash of ``worker_id``'s services found unreachable, until when."""
        return f"{self._tag}:down:{worker_id}"

    @property
    def down_prefix(self) -> str:
        """The common prefix of every down key (used by the registry's Lua scripts)."""
        return f"{self._tag}:down:"

    @property
    def released_prefix(self) -> str:
        """The common prefix of every early-releases key (used by the Lua scripts)."""
        return f"{self._tag}:released:"

    @property
    def seq(self) -> str:
        """The fleet's change counter."""
        return f"{self._tag}:seq"

    @property
    def changes(self) -> str:
        """Each worker's change counter at its last change (sorted set)."""
        return f"{self._tag}:changes"

    @property
    def beat_changes(self) -> str:
        """Each worker's change counter at its last heartbeat (sorted set)."""
        return f"{self._tag}:beat_changes"

    @property
    def demand(self) -> str:
        """Each model's request rate over every publisher."""
        return f"{self._tag}:demand"

    @property
    def backlog(self) -> str:
        """The backlog board of work stealing (sorted set)."""
        return f"{self._tag}:backlog"

    @property
    def leases(self) -> str:
        """The hash of model loads under way: one cold load per model across the fleet."""
        return f"{self._tag}:leases"

    @property
    def tasks(self) -> str:
        """The hash of the routed tasks' specs, as the fleet's workers declare them."""
        return f"{self._tag}:tasks"

    @property
    def decisions(self) -> str:
        """The list of recent routing decisions, newest first."""
        return f"{self._tag}:decisions"

    def metrics(self, name: str) -> str:
        """A hash of monotonic counters behind ``/metrics``."""
        return f"{self._tag}:metrics:{name}"

    def worker_queue(self, worker_id: str) -> str:
        """The queue only this worker consumes."""
        return f"{self.namespace}.worker.{worker_id}"

    def service_queue(self, service: str) -> str:
        """The shared fallback queue of every worker that offers ``service``."""
        return f"{self.namespace}.service.{service}"

    @property
    def control_exchange(self) -> str:
        """Celery's remote-control exchange name (``control_exchange``): the fleet's own, so
        control messages (``refresh``, ``revoke``, ``inspect``) reach this fleet only."""
        return f"{self.namespace}.control"

    @property
    def unacked(self) -> str:
        """kombu's hash of delivered, unacknowledged messages (``unacked_key``)."""
        return f"{self.namespace}.unacked"

    @property
    def unacked_index(self) -> str:
        """kombu's sorted set of their delivery times (``unacked_index_key``)."""
        return f"{self.namespace}.unacked_index"

    @property
    def unacked_mutex(self) -> str:
        """kombu's lock around restoring them (``unacked_mutex_key``)."""
        return f"{self.namespace}.unacked_mutex"

    @property
    def default_queue(self) -> str:
        """The queue for tasks the router does not route."""
        return f"{self.namespace}.default"
