"""The ChromaDB server a storage worker runs when ``ENABLE_CHROMADB=true``."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from coordinator.core.errors import ServiceError

log = logging.getLogger(__name__)


def chroma_command() -> str:
    """The ``chroma`` executable of this environment (from the chromadb package)."""
    beside = Path(sys.executable).parent / "chroma"
    if beside.exists():
        return str(beside)
    found = shutil.which("chroma")
    if found is None:
        raise ServiceError("chroma", "no 'chroma' executable: install the chromadb package")
    return found


@dataclass
class ChromaServer:
    """``chroma run --path PATH --host HOST --port PORT`` as a child process."""

    path: str
    host: str
    port: int
    url: str
    start_timeout_s: float = 60.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        """Start the server and wait until its heartbeat answers."""
        Path(self.path).mkdir(parents=True, exist_ok=True)
        command = [chroma_command(), "run", "--path", self.path]
        command += ["--host", self.host, "--port", str(self.port)]
        with (Path(self.path) / "chroma.log").open("ab") as log_file:
            self._proc = subprocess.Popen(  # noqa: S603 - our own executable and settings
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "ANONYMIZED_TELEMETRY": "False"},
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServiceError(self.url, f"chroma exited with {self._proc.returncode}")
            try:
                httpx.get(f"{self.url}/api/v2/heartbeat", timeout=1.0).raise_for_status()
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            log.info("ChromaDB serving %s at %s", self.path, self.url)
            return
        self.stop()
        raise ServiceError(self.url, f"chroma did not answer within {self.start_timeout_s}s")

    def stop(self) -> None:
        """Stop the server; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
