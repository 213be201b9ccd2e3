"""The OpenAI-compatible API that vLLM, SGLang, llama.cpp's ``llama-server``, LM Studio and
TGI serve: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/embeddings``, and
the server's own ``/metrics`` for its load.

Generation goes through chat completions, as Ollama's ``/api/generate`` applies the model's
chat template; an image rides in the same message as an ``image_url`` data URL.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

import httpx

from coordinator.core.errors import ServiceError
from coordinator.core.settings import Endpoint
from worker_tasks.model_servers.base import Backend, ServerState, down, names
from worker_tasks.model_servers.http import request_object, vectors
from worker_tasks.model_servers.server_metrics import fetch_load

OPTIONS: Final = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "num_predict": "max_tokens",
}
"""Ollama's generation options that have an OpenAI name; the others are dropped."""


def _image_url(image_base64: str) -> str:
    # The media type matters little to vLLM, which decodes the bytes; PNG's and JPEG's
    # signatures tell them apart in base64.
    kind = "jpeg" if image_base64.startswith("/9j/") else "png"
    return f"data:image/{kind};base64,{image_base64}"


class OpenAIBackend(Backend):
    """Every model ``/v1/models`` lists is served, hence in memory; load from ``/metrics``."""

    api: ClassVar[str] = "openai"

    def detect(self, client: httpx.Client, url: str) -> bool:
        answer = client.get(f"{url}/v1/models")
        body = answer.json() if answer.status_code in (200, 401) else None
        # A server started with a key answers 401 without one: still this API.
        return answer.status_code == 401 or (isinstance(body, dict) and "data" in body)

    def probe(self, client: httpx.Client, endpoint: Endpoint) -> ServerState:
        try:
            listed = request_object(
                client, "GET", f"{endpoint.url}/v1/models", api_key=endpoint.api_key
            )
        except ServiceError as exc:
            return down(exc)
        data = listed.get("data")
        models = names(
            [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        )
        load = fetch_load(client, endpoint.url, endpoint.api_key)
        return ServerState(True, self.api, models, models, load=load)

    def generate(
        self,
        client: httpx.Client,
        endpoint: Endpoint,
        *,
        model: str,
        prompt: str,
        images: list[str] | None = None,
        options: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        content: str | list[dict[str, Any]] = prompt
        if images:
            content = [{"type": "text", "text": prompt}]
            content += [{"type": "image_url", "image_url": {"url": _image_url(i)}} for i in images]
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
        body.update({OPTIONS[k]: v for k, v in (options or {}).items() if k in OPTIONS})
        url = f"{endpoint.url}/v1/chat/completions"
        answer = request_object(client, "POST", url, body, api_key=endpoint.api_key)
        try:
            text = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ServiceError(
                url, f"no choices[0].message.content in {sorted(answer)!r}"
            ) from None
        if not isinstance(text, str):
            raise ServiceError(url, "choices[0].message.content is not text")
        usage = answer.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        return {
            "response": text,
            "eval_count": usage.get("completion_tokens"),
            "prompt_eval_count": usage.get("prompt_tokens"),
        }

    def embed(
        self, client: httpx.Client, endpoint: Endpoint, *, model: str, texts: list[str]
    ) -> dict[str, Any]:
        url = f"{endpoint.url}/v1/embeddings"
        body = {"model": model, "input": texts}
        answer = request_object(client, "POST", url, body, api_key=endpoint.api_key)
        data = answer.get("data")
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise ServiceError(url, "no 'data' list of embeddings")
        ordered = sorted(
            data, key=lambda d: d.get("index", 0) if isinstance(d.get("index"), int) else 0
        )
        return {"embeddings": vectors(url, [d.get("embedding") for d in ordered], len(texts))}
