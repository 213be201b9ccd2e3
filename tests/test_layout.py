"""The package's shape: what importing it does, which app a task finds, and that the
documentation's examples import what they say."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from celery import Celery

from coordinator.core.settings import POLICY_NAMES
from coordinator.dispatch.app import default_app
from coordinator.routing import POLICIES
from worker_tasks.tasks import generate

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        cwd=ROOT,
        check=False,
    )


def test_every_policy_name_in_the_settings_has_a_policy() -> None:
    assert set(POLICY_NAMES) == set(POLICIES)


def test_the_pure_layers_and_the_simulator_load_no_redis_celery_or_prometheus() -> None:
    done = _python(
        "import sys, coordinator, coordinator.routing, coordinator.sim.simulator\n"
        "print(sorted(m for m in ('redis', 'celery', 'kombu', 'prometheus_client', 'httpx')"
        " if m in sys.modules))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_importing_the_worker_package_reads_no_environment() -> None:
    # A bad setting would stop an import that built the app; it must wait for first use.
    code = "import worker_tasks, worker_tasks.tasks\nprint('imported')\nworker_tasks.app\n"
    done = _python(code, HEARTBEAT_INTERVAL_S="-1")
    assert done.stdout.strip() == "imported"
    assert "HEARTBEAT_INTERVAL_S='-1'" in done.stderr
    assert done.returncode != 0


def test_celery_finds_the_worker_app_by_package_name() -> None:
    done = _python(
        "from celery.app.utils import find_app\n"
        "from coordinator.dispatch.app import find_fleet\n"
        "app = find_app('worker_tasks')\n"
        "app.loader.import_default_modules()  # what a starting worker does\n"
        "print(find_fleet(app) is not None,"
        " sorted(n for n in app.tasks if n.startswith('worker_tasks')))"
    )
    assert done.returncode == 0, done.stderr
    fleet_app, names = done.stdout.strip().split(" ", 1)
    assert fleet_app == "True"
    for task in ("generate", "ocr", "embed", "run_broadcast_job", "gather_broadcast"):
        assert f"worker_tasks.{task}" in names


def test_a_task_sent_from_another_thread_finds_the_fleet_app(app: Celery) -> None:
    # Celery's current app is per thread; elsewhere it is a fallback app with no router.
    found: dict[str, object] = {}

    def publish_side() -> None:
        found["default"] = default_app()
        found["task_app"] = generate.app

    thread = threading.Thread(target=publish_side)
    thread.start()
    thread.join(timeout=10)
    assert found == {"default": app, "task_app": app}


def _documented_imports() -> list[tuple[str, str]]:
    """Every ``from X import a, b`` in the Python examples of the README and docs/."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        blocks = re.findall(r"```(?:python|bash)\n(.*?)```", page.read_text(), re.S)
        for block in blocks:
            for line in block.splitlines():
                line = line.strip().strip("'")
                if line.startswith("from ") and " import " in line:
                    found.append((page.name, line))
    return found


@pytest.mark.parametrize(("page", "line"), _documented_imports())
def test_the_documented_imports_work(page: str, line: str) -> None:
    tree = ast.parse(line)
    node = tree.body[0]
    assert isinstance(node, ast.ImportFrom)
    assert node.module is not None
    module = __import__(node.module, fromlist=["_"])
    for alias in node.names:
        assert hasattr(module, alias.name), f"{page}: {line}"


def test_every_public_name_of_the_package_resolves() -> None:
    import coordinator

    for name in coordinator.__all__:
        assert getattr(coordinator, name) is not None, name
