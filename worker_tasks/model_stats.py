"""What this worker measures of its models: recent task time per model, and load bandwidth.

The cost-aware routing policy reads them from the heartbeat (``service_s``,
``mean_service_s``, ``load_bps``).
Tasks record into the :class:`ModelStats` of the worker runtime; the heartbeat thread reads
it. Under the prefork pool the tasks run in child processes, whose copy of the runtime is
not the one the heartbeat reads: a child sends its samples through a pipe made before the
fork, and the owner applies them when it next reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import select
import threading
from collections.abc import Mapping
from typing import Any, Final, TypeGuard

from coordinator.core.task_spec import normalize_model

log = logging.getLogger(__name__)

MAX_SERVICE_S: Final = 86_400.0
"""The heartbeat's limit on a task time: a longer one is a broken clock, not a task."""
NS: Final = 1e9


def _seconds(answer: Mapping[str, Any], key: str) -> float | None:
    value = answer.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value / NS if math.isfinite(value) and value >= 0 else None


def answer_times(answer: Mapping[str, Any], wall_s: float) -> tuple[float, float | None]:
    """``(service seconds without the model load, load seconds or None)`` of one answer.

    Ollama reports ``total_duration`` and ``load_duration`` in nanoseconds; without a total
    the wall time measured around the call stands in for it.
    """
    load_s = _seconds(answer, "load_duration")
    total_s = _seconds(answer, "total_duration")
    if total_s is None or (load_s is not None and total_s < load_s):
        total_s = wall_s
    return total_s - (load_s or 0.0), load_s


def _usable(value: object, upper: float = math.inf) -> TypeGuard[float]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and 0.0 < value <= upper


class ModelStats:
    """Exponentially weighted means of task time, per model and over all, and of model load
    bandwidth.

    Thread-safe. Samples that are not finite and positive are ignored, so every figure it
    reports is finite and positive. ``sizes`` (model -> bytes) is what the probes last
    found; a load counts towards the bandwidth only when the model's size is known there
    and the load took at least ``min_load_s`` (shorter ones are a model already in memory).
    """

    def __init__(self, *, alpha: float = 0.2, max_models: int = 64, min_load_s: float = 0.05):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha = alpha
        self.max_models = max_models
        self.min_load_s = min_load_s
        self.sizes: Mapping[str, int] = {}
        self._lock = threading.Lock()
        self._service_s: dict[str, float] = {}
        self._mean_s: float | None = None
        # Bytes and seconds are averaged apart and divided: a mean of rates would let a
        # small model's quick load count as much as a large one's, whose time matters more.
        self._load_bytes = self._load_seconds = 0.0
        self._owner = os.getpid()
        self._reader, self._writer = os.pipe()  # close-on-exec, so no subprocess holds it
        os.set_blocking(self._reader, False)
        os.set_blocking(self._writer, False)
        self._partial = b""

    def record(self, model: str, service_s: float | None, load_s: float | None = None) -> None:
        """Add one model call: its time without the load, and the load's time if any."""
        name = normalize_model(model)
        if not name:
            return
        if os.getpid() != self._owner:
            self._send(name, service_s, load_s)
            return
        with self._lock:
            self._apply(name, service_s, load_s)

    def record_answer(self, model: str, answer: Mapping[str, Any], wall_s: float) -> None:
        """Add one model call from Ollama's answer and the wall time measured around it."""
        self.record(model, *answer_times(answer, wall_s))

    def service_s(self) -> dict[str, float]:
        """Recent mean seconds per model call, without model loads, per model."""
        with self._lock:
            self._drain()
            return dict(self._service_s)

    def mean_service_s(self) -> float | None:
        """Recent mean seconds per model call over all models; ``None`` before a call."""
        with self._lock:
            self._drain()
            return self._mean_s

    def load_bps(self) -> float | None:
        """Recent mean disk-to-memory load bandwidth in bytes/s; ``None`` before a load."""
        with self._lock:
            self._drain()
            if self._load_seconds <= 0.0:
                return None
            bps = self._load_bytes / self._load_seconds
            return bps if _usable(bps) else None

    def close(self) -> None:
        """Close the pipe; samples sent after this are dropped."""
        fds, self._reader, self._writer = (self._reader, self._writer), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def _apply(self, name: str, service_s: object, load_s: object) -> None:
        a = self.alpha
        if _usable(service_s, MAX_SERVICE_S):
            old = self._service_s.pop(name, None)  # re-inserted last: most recent at the end
            self._service_s[name] = service_s if old is None else old + a * (service_s - old)
            while len(self._service_s) > self.max_models:
                del self._service_s[next(iter(self._service_s))]
            mean = self._mean_s
            self._mean_s = service_s if mean is None else mean + a * (service_s - mean)
        size = self.sizes.get(name)
        if not _usable(load_s, MAX_SERVICE_S) or load_s < self.min_load_s or not _usable(size):
            return
        if self._load_seconds <= 0.0:
            self._load_bytes, self._load_seconds = float(size), load_s
        else:
            self._load_bytes += a * (size - self._load_bytes)
            self._load_seconds += a * (load_s - self._load_seconds)

    def _send(self, name: str, service_s: float | None, load_s: float | None) -> None:
        line = json.dumps([name, service_s, load_s]).encode() + b"\n"
        # Writes up to PIPE_BUF bytes are atomic, so samples of several children never mix.
        if len(line) > select.PIPE_BUF:
            return
        # Full (the owner is behind) or closed: a sample less, never a wait.
        with contextlib.suppress(OSError):
            os.write(self._writer, line)

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self._reader, 65536)
            except OSError:  # nothing waiting, or closed
                return
            if not chunk:
                return
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            for line in lines:
                self._apply_line(line)

    def _apply_line(self, line: bytes) -> None:
        try:
            name, service_s, load_s = json.loads(line)
        except (ValueError, TypeError):
            log.warning("bad model statistics sample %r ignored", line[:80])
            return
        if isinstance(name, str):
            self._apply(name, service_s, load_s)
