"""The baseline of ``bench/chaos.py``: a plain Celery app with Celery's own reliability
settings (late acknowledgement, requeue on a lost worker, prefetch 1, JSON), one shared
queue, no router and no reaper; its task calls the same simulated model server through a
pooled client. ``celery -A bench.plain_celery worker`` runs it; ``BROKER_URL``, ``REDIS_URL``
(results) and ``OLLAMA_URL`` come from the environment."""

from __future__ import annotations

import os
from typing import Any

import httpx
from celery import Celery

app = Celery(
    "plain",
    broker=os.environ.get("BROKER_URL") or os.environ.get("REDIS_URL"),
    backend=os.environ.get("REDIS_URL"),
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=os.environ.get("PLAIN_QUEUE", "celery"),
    result_backend_transport_options={"global_keyprefix": os.environ.get("NAMESPACE", "") + ":"},
)
_client: httpx.Client | None = None


@app.task(name="plain.generate")
def generate(prompt: str, model: str = "llama3.2") -> dict[str, Any]:
    global _client
    if _client is None:  # one per process: a client costs ~27 ms of CPU to build
        _client = httpx.Client(timeout=60)
    body = {"model": model, "prompt": prompt, "stream": False}
    answer = _client.post(f"{os.environ['OLLAMA_URL']}/api/generate", json=body)
    answer.raise_for_status()
    return {"worker_id": os.environ.get("WORKER_ID", ""), "response": answer.json()["response"]}
