"""The built-in model tasks: ``generate``, ``ocr`` and ``embed``. Each declares what it needs
as task options, as an application's own tasks do (:mod:`coordinator.core.task_spec`); their
retry and rerouting policy is :class:`~worker_tasks.model_task.ModelTask`'s."""

from __future__ import annotations

import base64
import binascii
import time
from pathlib import Path
from typing import Any, cast

from celery import shared_task
from celery.local import Proxy

from coordinator.core.errors import TaskInputError
from coordinator.core.task_spec import EMBED, GENERATE, OCR, checked_model
from coordinator.dispatch.app import default_app
from worker_tasks.model_task import ModelTask

OCR_PROMPT = "Extract all text from this image. Answer with the text only."
MAX_EMBED_TEXTS = 1024


def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TaskInputError(f"{name} must be a non-empty string, got {value!r:.80}")
    return value


def _model(task: ModelTask, value: object) -> str:
    """The model the call names, else the task's default."""
    if value is None:
        return str(task.default_model)
    return checked_model(_text(value, "model"))


def _image_base64(image: object) -> str:
    """Accept a file path or base64 text; always return validated base64."""
    text = _text(image, "image")
    path = Path(text) if len(text) < 4096 else None
    if path is not None and path.is_file():
        return base64.b64encode(path.read_bytes()).decode("ascii")
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise TaskInputError(
            f"image must be a readable file path or base64, got {text!r:.80}"
        ) from None
    return text


@shared_task(name=GENERATE, base=ModelTask, bind=True, service="vllm", default_model="llama3.2")
def _generate(
    self: ModelTask,
    prompt: str,
    *,
    model: str | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate text (service ``vllm``: Ollama or an OpenAI-compatible server); not streamed."""
    settings = self.worker_settings()
    name = _model(self, model)
    text = _text(prompt, "prompt")  # bad input fails before any server is asked
    client, endpoint, server = self.server("vllm", settings)
    started = time.monotonic()
    answer = server.generate(client, endpoint, model=name, prompt=text, options=options)
    self.record(name, answer, started)
    return {
        "worker_id": settings.worker_id,
        "model": name,
        "response": answer["response"],
        "load_duration_ns": answer.get("load_duration"),
        "eval_count": answer.get("eval_count"),
    }


@shared_task(name=OCR, base=ModelTask, bind=True, service="ocr", default_model="llama-vision")
def _ocr(
    self: ModelTask,
    image: str,
    *,
    model: str | None = None,
    prompt: str = OCR_PROMPT,
) -> dict[str, Any]:
    """Read the text in an image (base64 or a path on the worker) with a vision model."""
    settings = self.worker_settings()
    name = _model(self, model)
    images = [_image_base64(image)]
    text = _text(prompt, "prompt")
    client, endpoint, server = self.server("ocr", settings)
    started = time.monotonic()
    answer = server.generate(client, endpoint, model=name, prompt=text, images=images)
    self.record(name, answer, started)
    return {"worker_id": settings.worker_id, "model": name, "text": answer["response"]}


@shared_task(
    name=EMBED, base=ModelTask, bind=True, service="embeddings", default_model="nomic-embed-text"
)
def _embed(
    self: ModelTask,
    texts: list[str] | str,
    *,
    model: str | None = None,
) -> dict[str, Any]:
    """Embed one text or a list of texts (service ``embeddings``)."""
    settings = self.worker_settings()
    name = _model(self, model)
    items = [texts] if isinstance(texts, str) else texts
    if not isinstance(items, list) or not items or len(items) > MAX_EMBED_TEXTS:
        raise TaskInputError(
            f"texts must be a string or a list of 1-{MAX_EMBED_TEXTS} strings, got {texts!r:.80}"
        )
    checked = [_text(item, "texts[]") for item in items]
    client, endpoint, server = self.server("embeddings", settings)
    started = time.monotonic()
    answer = server.embed(client, endpoint, model=name, texts=checked)
    self.record(name, answer, started)
    return {"worker_id": settings.worker_id, "model": name, "embeddings": answer["embeddings"]}


def _fleet_task(name: str) -> ModelTask:
    """The task ``name`` of the process's fleet app, looked up at each use.

    Celery's own ``shared_task`` proxy looks in Celery's *current* app, which in a thread
    other than the one that built the fleet app is Celery's fallback app (no router, broker
    ``amqp://localhost``); :func:`~coordinator.dispatch.app.default_app` is the fleet's in
    every thread, and is built from the environment on first use when the application has
    not built one.
    """
    return cast(ModelTask, Proxy(lambda: default_app().tasks[name]))


generate = _fleet_task(GENERATE)
"""``generate.delay(prompt, model="llama3.2")``: routed to a worker with the model."""
ocr = _fleet_task(OCR)
"""``ocr.delay(base64_image)``: the text in an image."""
embed = _fleet_task(EMBED)
"""``embed.delay(["text", ...])``: one embedding per text."""
