"""What a task declares it needs: read from Celery task options, by the router and the workers."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from coordinator.core.errors import ConfigError
from coordinator.core.task_spec import EMBED, GENERATE, OCR, TaskSpec
from worker_tasks import ModelTask
from worker_tasks import tasks as builtin


@pytest.fixture
def plain() -> Celery:
    return Celery("plain", set_as_current=False)


@pytest.mark.parametrize(
    ("kwargs", "model"),
    [
        ({}, "llama3.2"),
        (None, "llama3.2"),
        ({"model": "mistral"}, "mistral"),
        ({"model": "llama3.2:latest"}, "llama3.2"),
        ({"model": "llama3.2:8b"}, "llama3.2:8b"),
        ({"model": ""}, "llama3.2"),
        ({"model": "   "}, "llama3.2"),
        ({"model": None}, "llama3.2"),
        ({"model": 3}, "llama3.2"),
        ({"model": ["mistral"]}, "llama3.2"),
    ],
)
def test_the_call_names_the_model_else_the_default(
    kwargs: dict[str, Any] | None, model: str
) -> None:
    assert TaskSpec("vllm", "llama3.2").model((), kwargs) == model


def test_the_builtin_tasks_declare_their_spec_like_any_task(plain: Celery) -> None:
    plain.loader.import_task_module(builtin.__name__)
    specs = {name: TaskSpec.of(plain.tasks[name]) for name in (GENERATE, OCR, EMBED)}
    assert {n: (s.service, s.default_model) for n, s in specs.items() if s} == {
        GENERATE: ("vllm", "llama3.2"),
        OCR: ("ocr", "llama-vision"),
        EMBED: ("embeddings", "nomic-embed-text"),
    }


def test_a_task_of_ones_own_app_declares_service_and_model_as_task_options(plain: Celery) -> None:
    @plain.task(shared=False, service="vllm", model_arg="llm", default_model="llama3.2")
    def summarize(text: str, llm: str | None = None) -> str:
        return text

    spec = TaskSpec.of(summarize)
    assert spec == TaskSpec("vllm", "llama3.2", "llm", model_position=1)
    assert spec.model(("some text", "qwen2.5"), {}) == "qwen2.5"  # positionally
    assert spec.model(("some text",), {"llm": "mistral"}) == "mistral"
    assert spec.model(("some text",), {"model": "mistral"}) == "llama3.2"  # not its argument


def test_a_bound_model_task_counts_positions_without_self(plain: Celery) -> None:
    @plain.task(shared=False, base=ModelTask, bind=True, service="embeddings")
    def vectors(self: ModelTask, texts: list[str], model: str | None = None) -> None:
        return None

    spec = TaskSpec.of(vectors)
    assert spec is not None
    assert spec.model_position == 1
    assert spec.model((["a"], "bge-m3"), None) == "bge-m3"
    assert spec.model((["a"],), None) is None  # no default: any worker with the service


def test_a_task_without_a_service_is_not_routed(plain: Celery) -> None:
    @plain.task(shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    assert TaskSpec.of(add) is None


def test_a_task_needing_no_model_says_model_arg_none(plain: Celery) -> None:
    @plain.task(shared=False, service="ocr", model_arg=None)
    def scan(path: str, model: str = "ignored") -> None:
        return None

    spec = TaskSpec.of(scan)
    assert spec is not None
    assert spec.model(("p", "x"), {"model": "y"}) is None


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"service": "v llm"}, "service must be a name"),
        ({"service": 3}, "service must be a name"),
        ({"service": "vllm", "default_model": ""}, "default_model must be"),
        ({"service": "vllm", "model_arg": 7}, "model_arg must be"),
    ],
)
def test_a_malformed_declaration_is_a_config_error_naming_the_task(
    plain: Celery, options: dict[str, Any], says: str
) -> None:
    @plain.task(shared=False, name="mine.broken", **options)
    def broken() -> None:
        return None

    with pytest.raises(ConfigError, match=f"task mine.broken: {says}"):
        TaskSpec.of(broken)


def test_a_spec_survives_the_registry_and_a_forged_one_does_not() -> None:
    spec = TaskSpec("vllm", "llama3.2", "llm", 1)
    assert TaskSpec.from_json(spec.as_json()) == spec
    for forged in ('{"service": "a b"}', "[]", '{"service": "v", "model_position": -1}', "{"):
        with pytest.raises(ValueError, match=r"service|task spec|model_position|Expecting"):
            TaskSpec.from_json(forged)
