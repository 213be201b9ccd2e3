"""Oversized and ill-typed input gets a clear error and sends nothing."""

from __future__ import annotations

import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient

from coordinator.broadcast.client import MAX_JOB_DATA_BYTES, broadcast
from coordinator.core.errors import JobError, TaskInputError
from coordinator.core.settings import CoordinatorSettings
from coordinator.ops.api import MAX_BODY_BYTES, create_api
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
