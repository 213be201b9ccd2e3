"""The public face that every simulated model server shares: start and stop it, find its
URL, inject faults and read its request counters. The work is its :class:`Harness`'s.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

from starlette.types import ASGIApp

from coordinator.sim.servers.harness import Fault, Harness


class SimulatedServer(ABC):
    """What every simulated server offers its users, on top of its :class:`Harness`.

    Subclasses are dataclasses with ``name``, ``host`` and ``port`` fields; they create
    ``_harness`` in ``__post_init__`` and build their app in :meth:`_build_app`.
    """

    name: str
    host: str
    port: int
    _harness: Harness

    @abstractmethod
    def _build_app(self) -> ASGIApp:
        """A fresh app for one run of the server."""

    def start(self) -> Self:
        """Start serving in a daemon thread and return ``self`` once connections are
        accepted.

        With ``port=0`` a free port is picked and stored in ``self.port``, so a stopped
        server can be started again on the same port (to simulate a restart).
        """
        self.port = self._harness.start(self._build_app(), self.host, self.port)
        return self

    def stop(self) -> None:
        """Stop serving, close the listening socket and open connections; idempotent.

        Requests sleeping in an injected delay are abandoned without an answer.
        """
        self._harness.stop()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def set_fault(self, fail_with: int | None = None, delay_s: float = 0.0) -> None:
        """Inject faults into every following request; ``set_fault()`` clears them.

        ``delay_s`` seconds are slept before answering; then, if ``fail_with`` is set, the
        request is answered with that HTTP status and an error body saying ``injected``.
        """
        if fail_with is not None and not 400 <= fail_with <= 599:
            raise ValueError("fail_with must be an HTTP error status (400-599)")
        if delay_s < 0:
            raise ValueError("delay_s must not be negative")
        self._harness.set_fault(Fault(fail_with, delay_s))

    def garble(self, path: str, body: str | None) -> None:
        """Answer requests for ``path`` with ``body`` (HTTP 200, as JSON) instead of the
        simulated answer, to test clients against a broken server; ``None`` restores it."""
        self._harness.garble(path, body)

    def request_count(self, method: str, path: str) -> int:
        """How many requests were received for ``method`` and ``path`` (without query)."""
        return self._harness.request_count(method, path)

    def requested_models(self, path: str | None = None) -> list[str]:
        """Models named by model requests, in arrival order (unknown ones too); ``path``
        restricts the list to one endpoint."""
        return self._harness.requested_models(path)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
