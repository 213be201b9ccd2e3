"""What a routed task needs, declared on the task itself as Celery task options::

    @app.task(service="vllm", model_arg="model", default_model="llama3.2")
    def summarize(text: str, model: str | None = None) -> str: ...

Celery makes the extra keywords of ``app.task`` attributes of the task's class; the router
reads them from the task (:meth:`TaskSpec.of`). A task without ``service`` is not routed.
Workers also publish their tasks' specs to the registry, so that a process without a task's
code (the reaper, ``coordinator explain``, an app sending by name) routes it the same way.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from coordinator.core.errors import ConfigError, TaskInputError

GENERATE: Final = "worker_tasks.generate"
OCR: Final = "worker_tasks.ocr"
EMBED: Final = "worker_tasks.embed"
"""The built-in tasks' names; their specs are on the tasks (``worker_tasks.tasks``)."""

_NAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")


_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}$")


def normalize_model(name: str) -> str:
    """Ollama's implicit tag: ``llama3.2:latest`` and ``llama3.2`` are the same model."""
    return name.strip().removesuffix(":latest")


@functools.lru_cache(maxsize=4096)
def checked_model(name: str) -> str:
    """``name`` normalised, when it is a model name: ``llama3.2``, ``qwen2.5:7b``,
    ``library/phi3``, ``hf.co/org/repo:Q4_K_M``, ``registry:5000/ns/model:tag``. Cached:
    the router checks the model of every task it routes, and a fleet's names repeat.

    Raises:
        TaskInputError: anything else, a path such as ``../../etc/passwd`` included; model
            names reach servers' URLs and file names.
    """
    normalized = normalize_model(name)
    segments = normalized.split("/")
    if not _MODEL.match(normalized) or any(s in ("", ".", "..") for s in segments):
        raise TaskInputError(
            f"model must be a model name such as 'llama3.2' or 'hf.co/org/repo:Q4_K_M',"
            f" got {name!r:.80}"
        )
    return normalized


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """The service a task needs, and where its call names the model."""

    service: str
    default_model: str | None = None
    """The model when the call names none; ``None``: any worker with the service will do."""
    model_arg: str | None = "model"
    """The task argument naming the model, by keyword or position."""
    model_position: int | None = None
    """That argument's position in the task's signature, when it has one."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.service):
            raise ValueError(f"service must be a name such as 'vllm', got {self.service!r:.80}")
        for name in ("default_model", "model_arg"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r:.80}")

    def model(self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> str | None:
        """The model a call needs: the one its model argument names, else the default.

        Raises:
            TaskInputError: the call names something that is not a model name.
        """
        value: object = None
        if self.model_arg is not None:
            value = (kwargs or {}).get(self.model_arg)
            position = self.model_position
            if value is None and position is not None and args and len(args) > position:
                value = args[position]
        if isinstance(value, str) and normalize_model(value):
            return checked_model(value)
        return None if self.default_model is None else normalize_model(self.default_model)

    def as_json(self) -> str:
        """The spec as the registry keeps it."""
        return json.dumps(
            {
                "service": self.service,
                "default_model": self.default_model,
                "model_arg": self.model_arg,
                "model_position": self.model_position,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> TaskSpec:
        """A spec read from the registry. Raises ``ValueError`` for anything else."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("service"), str):
            raise ValueError("not a task spec")
        position = data.get("model_position")
        if position is not None and (not isinstance(position, int) or not 0 <= position < 64):
            raise ValueError(f"model_position must be a small integer, got {position!r:.40}")
        return cls(
            service=data["service"],
            default_model=data.get("default_model"),
            model_arg=data.get("model_arg"),
            model_position=position,
        )

    @classmethod
    def of(cls, task: object) -> TaskSpec | None:
        """The spec a Celery task declares; ``None`` when it declares no ``service``.

        Raises:
            ConfigError: the task declares a spec that is not one.
        """
        service = getattr(task, "service", None)
        if service is None:
            return None
        name = getattr(task, "name", repr(task))
        options = {
            "service": service,
            "default_model": getattr(task, "default_model", None),
            "model_arg": getattr(task, "model_arg", "model"),  # None: the call names no model
        }
        try:
            if not isinstance(service, str):
                raise ValueError(f"service must be a name such as 'vllm', got {service!r:.80}")
            spec = cls(**options)
        except ValueError as exc:
            raise ConfigError(f"task {name}: {exc}") from None
        position = _position(task, spec.model_arg)
        return spec if position is None else cls(**options, model_position=position)


def _position(task: object, argument: str | None) -> int | None:
    """Where ``argument`` sits among the positional parameters of the task's ``run``."""
    run = getattr(task, "run", None)
    if argument is None or run is None:
        return None
    try:
        parameters = list(inspect.signature(run).parameters.values())
    except (TypeError, ValueError):  # a callable inspect cannot read: keywords only
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in parameters if p.kind in positional]
    return names.index(argument) if argument in names else None
