"""What a simulated model server holds: models on disk and in memory, nothing else.

Pure state without I/O, shared by the HTTP server's event loop and the thread that set
the server up, hence the lock. Sizes are deterministic hashes of the model name, so that
tests can predict them; loading one more model than ``max_loaded`` allows evicts the least
recently used one, like Ollama's ``OLLAMA_MAX_LOADED_MODELS``. Models never expire on their
own: the expiry times only order the models by use.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from typing import Final, NamedTuple

# Ollama's default keep_alive; only used to fill in expiry times.
DEFAULT_KEEP_ALIVE_S: Final = 300.0


def canonical_name(name: str) -> str:
    """``name`` with Ollama's implicit ``:latest`` tag, the key that identifies a model.

    Only a colon in the last path segment is a tag (``host:5000/ns/model`` has none).
    """
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def model_digest(name: str) -> str:
    """The simulated sha256 digest (hex) of ``name``'s model file."""
    return hashlib.sha256(canonical_name(name).encode()).hexdigest()


def model_size(name: str) -> int:
    """The simulated size of ``name`` in bytes, between 1 and 5 GB."""
    return 1_000_000_000 + int(model_digest(name)[:8], 16) % 4_000_000_000


class DiskModel(NamedTuple):
    """A pulled model, spelled as pulled, and when (Unix seconds)."""

    name: str
    modified_s: float


class LoadedModel(NamedTuple):
    """A model in memory and when it would expire (Unix microseconds)."""

    name: str
    expires_us: int


class ModelMemory:
    """The models on disk and in memory of one simulated server.

    ``on_disk`` and ``in_memory`` are kept and changed in place (duplicates dropped), so a
    caller that holds them sees the current state; names without a tag match requests for
    ``name:latest`` and vice versa. With ``load_bps``, loading a model takes
    ``size / load_bps`` simulated seconds (:meth:`load_time_ns`).
    """

    def __init__(
        self,
        on_disk: list[str],
        in_memory: list[str],
        *,
        max_loaded: int | None = None,
        load_bps: float | None = None,
    ) -> None:
        if max_loaded is not None and max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded!r}")
        if load_bps is not None and not (math.isfinite(load_bps) and load_bps > 0):
            raise ValueError(f"load_bps must be a positive number, got {load_bps!r}")
        on_disk[:] = dict.fromkeys(on_disk)
        in_memory[:] = dict.fromkeys(in_memory)
        disk_keys = {canonical_name(m) for m in on_disk}
        missing = [m for m in in_memory if canonical_name(m) not in disk_keys]
        if missing:
            raise ValueError(f"models in memory but not on disk: {', '.join(missing)}")
        if max_loaded is not None and len(in_memory) > max_loaded:
            raise ValueError(f"more models in memory than max_loaded={max_loaded!r}")
        self.max_loaded = max_loaded
        self.load_bps = load_bps
        self._on_disk = on_disk
        self._in_memory = in_memory
        self._lock = threading.Lock()
        now = time.time()
        self._modified_s = {canonical_name(m): now for m in on_disk}
        # Distinct and increasing with each use: they choose the victim of an eviction,
        # so two uses never tie.
        self._expires_us: dict[str, int] = {}
        self._last_expiry_us = 0
        # In list order: the first is the least recently used.
        for m in in_memory:
            self._expires_us[canonical_name(m)] = self._next_expiry_us()

    def resolve(self, model: str) -> str | None:
        """The name on disk that ``model`` refers to, or None if it was never pulled."""
        wanted = canonical_name(model)
        with self._lock:
            return next((m for m in self._on_disk if canonical_name(m) == wanted), None)

    def is_loaded(self, name: str) -> bool:
        """Whether ``name`` (as spelled on disk) is in memory."""
        with self._lock:
            return name in self._in_memory

    def load_time_ns(self, name: str) -> int:
        """The simulated time to load ``name``: its size over ``load_bps``, or 0."""
        if self.load_bps is None:
            return 0
        return int(model_size(name) / self.load_bps * 1e9)

    def use(self, name: str) -> None:
        """Mark ``name`` (as spelled on disk) used now, loading it if needed: when memory
        is full, the least recently used model is evicted first."""
        with self._lock:
            if name not in self._in_memory:
                while self.max_loaded is not None and len(self._in_memory) >= self.max_loaded:
                    victim = min(self._in_memory, key=lambda m: self._expires_us[canonical_name(m)])
                    self._in_memory.remove(victim)
                    del self._expires_us[canonical_name(victim)]
                self._in_memory.append(name)
            self._expires_us[canonical_name(name)] = self._next_expiry_us()

    def unload(self, name: str) -> None:
        """Drop ``name`` (as spelled on disk) from memory, if it is there."""
        with self._lock:
            if name in self._in_memory:
                self._in_memory.remove(name)
            self._expires_us.pop(canonical_name(name), None)

    def add_to_disk(self, model: str) -> None:
        """Pull ``model``: add it to disk unless it is there already; either way it is
        modified now."""
        wanted = canonical_name(model)
        with self._lock:
            if all(canonical_name(m) != wanted for m in self._on_disk):
                self._on_disk.append(model)
            self._modified_s[wanted] = time.time()

    def disk_names(self) -> list[str]:
        """The models on disk, in the order they were pulled."""
        with self._lock:
            return list(self._on_disk)

    def loaded_names(self) -> list[str]:
        """The models in memory, in the order they were loaded."""
        with self._lock:
            return list(self._in_memory)

    def on_disk(self) -> list[DiskModel]:
        """The models on disk with their modification times, in the order they were pulled."""
        with self._lock:
            return [DiskModel(m, self._modified_s[canonical_name(m)]) for m in self._on_disk]

    def loaded(self) -> list[LoadedModel]:
        """The models in memory, the most recently used (latest expiry) first, as Ollama
        lists them."""
        with self._lock:
            models = [LoadedModel(m, self._expires_us[canonical_name(m)]) for m in self._in_memory]
        return sorted(models, key=lambda model: -model.expires_us)

    def _next_expiry_us(self) -> int:
        # Under the lock (or in __init__): each use expires after every earlier one.
        now_us = int((time.time() + DEFAULT_KEEP_ALIVE_S) * 1_000_000)
        self._last_expiry_us = max(now_us, self._last_expiry_us + 1)
        return self._last_expiry_us
