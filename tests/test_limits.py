"""Oversized and ill-typed input gets a clear error and sends nothing."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator

import pytest
import redis
import uvicorn
from celery import Celery
from fastapi.testclient import TestClient

from coordinator.broadcast.client import MAX_JOB_DATA_BYTES, broadcast
from coordinator.core.errors import JobError, TaskInputError
from coordinator.core.settings import CoordinatorSettings
from coordinator.ops.api import MAX_BODY_BYTES, create_api
from tests.conftest import free_port, wait_for
from worker_tasks.tasks import embed, generate, ocr


def test_an_oversized_broadcast_is_refused_before_anything_is_sent(
    app: Celery, redis_conn: redis.Redis, settings: CoordinatorSettings
) -> None:
    huge = {"model": "x" * (MAX_JOB_DATA_BYTES + 1)}
    with pytest.raises(JobError, match=r"job_data is \d+ bytes, over the \d+ limit"):
        broadcast("warm_model", huge, app=app)
    assert list(redis_conn.scan_iter(match=f"{settings.namespace}.*")) == []


def test_an_oversized_request_body_gets_413(app: Celery) -> None:
    client = TestClient(create_api(app, token=None))
    answer = client.post(
        "/api/coordinator/broadcast-job",
        content=b"x" * (MAX_BODY_BYTES + 1),
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 413
    assert "request body over" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("task", "args", "kwargs", "mentions"),
    [
        (generate, (123,), {}, "prompt must be a non-empty string, got 123"),
        (generate, ("hi",), {"model": ["llama3.2"]}, "model must be a non-empty string"),
        (ocr, ("not base64 and not a file!",), {}, "image must be a readable file path or base64"),
        (embed, ([],), {}, "texts must be a string or a list of 1-1024 strings"),
        (embed, (["ok", 7],), {}, "texts[] must be a non-empty string, got 7"),
    ],
)
def test_ill_typed_task_arguments_fail_with_the_value_named(
    app: Celery, task: object, args: tuple[object, ...], kwargs: dict[str, object], mentions: str
) -> None:
    """Run where the task would run, before any model service is called."""
    with pytest.raises(TaskInputError) as error:
        task.apply(args=args, kwargs=kwargs, throw=True)  # type: ignore[attr-defined]
    assert mentions in str(error.value)


@pytest.fixture
def served_api(app: Celery) -> Iterator[tuple[str, int]]:
    """The API with a token, served by uvicorn on loopback: (token, port)."""
    token, port = "t0ken", free_port()
    config = uvicorn.Config(create_api(app, token=token), port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10, "uvicorn to start")
    yield token, port
    server.should_exit = True
    thread.join(timeout=10)


def _chunked_request(port: int, token: str | None) -> socket.socket:
    """A POST whose headers promise a chunked body of unknown size; nothing sent yet."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    conn.sendall(
        (
            "POST /api/coordinator/broadcast-job HTTP/1.1\r\nHost: x\r\n"
            f"{auth}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
    )
    return conn


def test_a_chunked_body_without_a_token_is_refused_before_it_is_read(
    served_api: tuple[str, int],
) -> None:
    _, port = served_api
    with _chunked_request(port, token=None) as conn:
        conn.sendall(b"100000\r\n" + b"x" * 0x100000 + b"\r\n")  # one MiB, then it waits
        answer = conn.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 401")
    assert "missing or invalid bearer token" in answer


def test_a_chunked_body_with_a_token_is_cut_off_at_the_limit(served_api: tuple[str, int]) -> None:
    token, port = served_api
    chunk = b"x" * 0x100000
    sent = 0
    with _chunked_request(port, token) as conn:
        # Send until the server answers (or far past the limit): the answer comes at it.
        while sent <= 4 * MAX_BODY_BYTES and not select.select([conn], [], [], 0)[0]:
            conn.sendall(b"100000\r\n" + chunk + b"\r\n")
            sent += len(chunk)
        answer = conn.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 413")
    assert MAX_BODY_BYTES < sent <= MAX_BODY_BYTES + 16 * len(chunk)
