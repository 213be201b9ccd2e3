"""Which service and model each routed task needs.

The router only routes tasks listed here; any other task keeps Celery's normal routing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What a model task needs from the worker that runs it."""

    service: str
    default_model: str


GENERATE: Final = "worker_tasks.generate"
OCR: Final = "worker_tasks.ocr"
EMBED: Final = "worker_tasks.embed"

TASKS: Final[Mapping[str, TaskSpec]] = {
    GENERATE: TaskSpec(service="vllm", default_model="llama3.2"),
    OCR: TaskSpec(service="ocr", default_model="llama-vision"),
    EMBED: TaskSpec(service="embeddings", default_model="nomic-embed-text"),
}

SERVICES: Final = frozenset(spec.service for spec in TASKS.values())


def normalize_model(name: str) -> str:
    """Ollama's implicit tag: ``llama3.2:latest`` and ``llama3.2`` are the same model."""
    name = name.strip()
    return name.removesuffix(":latest")


def task_spec(task_name: str) -> TaskSpec | None:
    """The spec of a routed task, or ``None`` for a task the router leaves alone."""
    return TASKS.get(task_name)


def detect_required_model(task_name: str, kwargs: Mapping[str, Any] | None) -> str | None:
    """The model a task call needs: its ``model=`` keyword wins, else the task's default.

    Returns ``None`` for tasks that are not model tasks.
    """
    spec = TASKS.get(task_name)
    if spec is None:
        return None
    model = (kwargs or {}).get("model")
    if isinstance(model, str) and normalize_model(model):
        return normalize_model(model)
    return spec.default_model
