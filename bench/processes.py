"""Processes the benchmarks start: real ``celery worker`` processes, each leading a process
group of its own so that stopping (or killing) it takes its prefork pool along."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def celery_worker(
    module: str,
    node: str,
    env: dict[str, str],
    log_path: Path,
    *,
    concurrency: int = 2,
    extra: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """``celery -A module worker -n node@%h -P prefork -c concurrency``, its output appended
    to ``log_path``."""
    command = [sys.executable, "-m", "celery", "-A", module, "worker", "-n", f"{node}@%h"]
    command += ["-P", "prefork", "-c", str(concurrency), "-l", "WARNING"]
    command += ["--without-mingle", "--without-gossip", *extra]
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            command,
            env=env,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_group(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout_s: float = 20.0
) -> None:
    """SIGTERM to the process group ``proc`` leads, SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
