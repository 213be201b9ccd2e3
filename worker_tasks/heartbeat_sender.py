"""The worker's heartbeat: measure, probe, write to the registry, on threads of its own.

Threads rather than a Celery timer: the worker's timer does not fire while the solo pool
runs a task, and a long generation must not make the worker look dead. Probing the model
services has a thread of its own too, so a service that hangs until its timeout delays
what the heartbeat says about that service, never the heartbeat itself.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import redis

from coordinator.core.heartbeat import (
    MAX_HEARTBEAT_BYTES,
    TIER_BY_NAME,
    Heartbeat,
    ServiceStatus,
    WorkerStatus,
)
from coordinator.core.settings import WorkerSettings
from coordinator.fleet.registry import Registry
from worker_tasks import system
from worker_tasks.model_stats import ModelStats
from worker_tasks.probes import ProbeResult, probe_services

log = logging.getLogger(__name__)


@dataclass
class HeartbeatSender:
    """Builds this worker's heartbeat and keeps it fresh in the registry."""

    settings: WorkerSettings
    registry: Registry
    tier: str
    queue: str
    active_requests: Callable[[], int]
    stats: ModelStats
    clock: Callable[[], float] = time.time
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex)
    """This start of the worker: a restart under the same id is a new incarnation."""
    started_at: float = field(default_factory=time.time)
    _known: set[str] = field(default_factory=set, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _wake: threading.Event = field(default_factory=threading.Event, init=False)
    _refresh: threading.Event = field(default_factory=threading.Event, init=False)
    _threads: list[threading.Thread] = field(default_factory=list, init=False)
    _http: httpx.Client = field(init=False)
    _probed: ProbeResult = field(default_factory=ProbeResult, init=False)

    def __post_init__(self) -> None:
        self._http = httpx.Client(timeout=self.settings.probe_timeout_s)
        system.cpu_load()  # psutil's first reading is meaningless; prime it

    def probe(self) -> ProbeResult:
        """Probe the model services now."""
        return probe_services(self._http, self.settings)

    def capabilities(self, probed: ProbeResult) -> tuple[str, ...]:
        """Configured capabilities, else every service that has answered since start.

        Remembering past answers keeps a service that blips in the capability list (it is
        then reported unhealthy and skipped) instead of making it vanish and reappear.
        """
        if self.settings.worker_capabilities is not None:
            return tuple(self.settings.worker_capabilities)
        self._known.update(s for s, ok in probed.services_status.items() if ok)
        return tuple(sorted(self._known))

    def latest_probe(self) -> ProbeResult:
        """What the last probe found."""
        return self._probed

    def refresh_probes(self) -> ProbeResult:
        """Probe now and use the result from the next heartbeat on; log each service that
        went down (with its URL and why) or came back."""
        before, self._probed = self._probed, self.probe()
        self.stats.sizes = self._probed.model_bytes
        _log_changes(before, self._probed)
        return self._probed

    def would_evict(self, probed: ProbeResult) -> str | None:
        """The model the next load would push out of memory: the least recently used, once
        ``WORKER_MODEL_SLOTS`` models are in memory; ``None`` while there is room.

        A prediction: Ollama (``findRunnerToUnload``) unloads an idle model with the
        shortest keep_alive, ties broken by model file path, neither of which ``/api/ps``
        shows; the least recently used is the guess its ``expires_at`` allows.
        """
        slots = self.settings.worker_model_slots
        in_memory = probed.models_in_memory
        return in_memory[0] if slots is not None and len(in_memory) >= slots else None

    def build(self) -> Heartbeat:
        """This worker's heartbeat: measured now, with the latest probe result."""
        probed = self._probed
        capabilities = self.capabilities(probed)
        statuses: dict[str, ServiceStatus] = {
            s: "healthy" if probed.services_status.get(s) else "unhealthy" for s in capabilities
        }
        healthy = sum(1 for s in statuses.values() if s == "healthy")
        status: WorkerStatus = (
            "healthy"
            if capabilities and healthy == len(statuses)
            else "degraded"
            if healthy
            else "unhealthy"
        )
        heartbeat = Heartbeat(
            worker_id=self.settings.worker_id,
            status=status,
            current_load=system.cpu_load(),
            available_memory=system.available_memory(),
            gpu_utilization=system.gpu_utilization(),
            active_requests=self.active_requests(),
            models_on_disk=probed.models_on_disk,
            models_in_memory=probed.models_in_memory,
            specialization=self.settings.worker_specialization,
            services_status=statuses,
            service_errors={s: e for s, e in probed.errors.items() if s in statuses},
            server_load={s: load for s, load in probed.server_load.items() if s in statuses},
            tier=TIER_BY_NAME[self.tier],
            capabilities=capabilities,
            queue=self.queue,
            timestamp=self.clock(),
            interval_s=self.settings.heartbeat_interval_s,
            ttl_s=self.settings.ttl_s,
            incarnation=self.incarnation,
            started_at=self.started_at,
            host=socket.gethostname()[:128],
            pid=os.getpid(),
            model_bytes=probed.model_bytes,
            service_s=self.stats.service_s(),
            mean_service_s=self.stats.mean_service_s(),
            model_slots=self.settings.worker_model_slots,
            would_evict=self.would_evict(probed),
            load_bps=self.stats.load_bps(),
            download_bps=self.settings.worker_download_bps,
        )
        return _within_limit(heartbeat)

    def beat(self) -> Heartbeat | None:
        """Send one heartbeat; a Redis outage is logged, never raised."""
        heartbeat = self.build()
        try:
            self.registry.publish(heartbeat)
        except redis.RedisError as exc:
            log.warning("heartbeat of %s not written: %s", heartbeat.worker_id, exc)
            return None
        return heartbeat

    def start(self) -> None:
        """Beat now, then every ``HEARTBEAT_INTERVAL_S``; probe at the same interval."""
        self.beat()
        for target, name in ((self._beat_loop, "heartbeat"), (self._probe_loop, "probes")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """Beat as soon as possible (after a model was loaded, for instance)."""
        self._wake.set()

    def refresh_soon(self) -> None:
        """Probe the services and beat as soon as possible, on the sender's own threads: the
        caller (a control message in the consumer's thread) never waits on a probe."""
        self._refresh.set()

    def stop(self, *, deregister: bool = True) -> None:
        """Stop beating and, on a clean shutdown, leave the registry at once."""
        self._stop.set()
        self._wake.set()
        self._refresh.set()
        for thread in self._threads:
            thread.join(timeout=self.settings.probe_timeout_s * 4 + 1)
        if deregister:
            try:
                self.registry.remove(self.settings.worker_id)
            except redis.RedisError as exc:
                log.warning("could not deregister %s: %s", self.settings.worker_id, exc)
        self._http.close()

    def _lift_marks(self, probed: ProbeResult, probed_at: float) -> None:
        """A task may have marked a service unreachable (``ModelTask``); a probe begun after
        that which found it healthy lifts the mark, rather than waiting for it to lapse."""
        try:
            self.registry.clear_unreachable(self.settings.worker_id, _healthy(probed), probed_at)
        except redis.RedisError as exc:
            log.warning("could not lift unreachable marks: %s", exc)

    def _beat_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.heartbeat_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.beat()
            except Exception:  # the thread must outlive any one bad beat
                log.exception("heartbeat failed")

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            asked = self._refresh.wait(self.settings.heartbeat_interval_s)
            self._refresh.clear()
            if self._stop.is_set():
                return
            try:
                before, probed_at = self._probed, time.time()
                probed = self.refresh_probes()
                self._lift_marks(probed, probed_at)
                if probed != before or asked:
                    self.wake()  # the fleet should learn of a change now, not next beat
            except Exception:
                log.exception("probing the model services failed")


def _log_changes(before: ProbeResult, after: ProbeResult) -> None:
    for service, error in after.errors.items():
        if before.errors.get(service) is None:
            log.warning("%s is down: %s", service, error)
    for service, ok in after.services_status.items():
        if ok and before.errors.get(service) is not None:
            log.info("%s is back", service)


def _healthy(probed: ProbeResult) -> list[str]:
    return [name for name, ok in probed.services_status.items() if ok]


def _within_limit(heartbeat: Heartbeat) -> Heartbeat:
    """``heartbeat``, without the sizes and times of models not in memory if it is too big:
    routing can do without those, not without the heartbeat (the registry skips one over
    the limit)."""
    if len(heartbeat.to_json().encode()) <= MAX_HEARTBEAT_BYTES:
        return heartbeat
    keep = set(heartbeat.models_in_memory)
    slim = heartbeat.model_copy(
        update={
            "model_bytes": {m: b for m, b in heartbeat.model_bytes.items() if m in keep},
            "service_s": {m: t for m, t in heartbeat.service_s.items() if m in keep},
        }
    )
    if len(slim.to_json().encode()) > MAX_HEARTBEAT_BYTES:
        log.warning("heartbeat of %s is over %d bytes", slim.worker_id, MAX_HEARTBEAT_BYTES)
    return slim
