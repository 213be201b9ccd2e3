"""The machine's RabbitMQ for the tests: one virtual host per test, deleted afterwards.

``.ci/run`` starts RabbitMQ (installing it from the OS packages when missing), so under CI a
RabbitMQ that does not answer fails the tests that ask for it; elsewhere they are skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"RabbitMQ is needed under CI: {why}")
    pytest.skip(f"no RabbitMQ here: {why}")


def _rabbitmqctl(*args: str) -> None:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        _unavailable(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()[:300]}")


def rabbitmq_vhost(name: str) -> Iterator[str]:
    """A virtual host ``name`` (its queues and exchanges are this test's alone): its URL."""
    parts = urlsplit(RABBITMQ_URL)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 2).close()
    except OSError as exc:
        _unavailable(f"{parts.hostname}:{parts.port}: {exc}")
    if shutil.which("rabbitmqctl") is None:
        _unavailable("rabbitmqctl is not on the PATH")
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, parts.username or "guest", ".*", ".*", ".*")
        yield f"{RABBITMQ_URL.rstrip('/')}/{name}"
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], capture_output=True, timeout=60)
