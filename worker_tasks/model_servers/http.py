"""JSON over HTTP to a model server, its failures mapped to the errors that steer retries.

Plain httpx rather than the ``openai`` or ``ollama`` packages: each call is one JSON request,
every backend shares the worker's one pooled client, and the mapping below must tell a
server that took no connection (left at once) from one that is slow (retried) and from one
without the model (routed elsewhere); those clients retry on their own, and retries here
are the router's, to another worker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from coordinator.core.errors import (
    ModelNotFoundError,
    ServiceError,
    ServiceUnavailableError,
    ServiceUnreachableError,
)


def headers(api_key: str | None) -> dict[str, str]:
    """The bearer token an OpenAI-compatible server or TEI started with a key wants."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def request_json(
    client: httpx.Client,
    method: str,
    url: str,
    body: object = None,
    *,
    api_key: str | None = None,
    timeout_s: float | None = None,
) -> Any:
    """``method url`` with a JSON body; the JSON answered.

    Raises:
        ServiceUnreachableError: nobody took the connection (refused, connect timeout).
        ServiceUnavailableError: a read timeout, HTTP 5xx or 429: may pass.
        ModelNotFoundError: HTTP 404 naming the model (Ollama's and vLLM's wording).
        ServiceError: any other HTTP error, or an answer that is not JSON.
    """
    timeout = httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s
    try:
        response = client.request(method, url, json=body, headers=headers(api_key), timeout=timeout)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        # Nobody took the connection: down, not slow (a read timeout may be a long load).
        raise ServiceUnreachableError(url, f"{type(exc).__name__}: {exc}") from None
    except httpx.TimeoutException as exc:
        raise ServiceUnavailableError(url, f"timed out: {exc}") from None
    except httpx.HTTPError as exc:
        raise ServiceUnavailableError(url, f"{type(exc).__name__}: {exc}") from None
    if response.status_code >= 400:
        raise _http_error(url, response)
    try:
        return response.json()
    except ValueError:
        raise ServiceError(url, f"answer is not JSON: {response.text[:200]!r}") from None


def stream_lines(
    client: httpx.Client, method: str, url: str, body: object, *, api_key: str | None = None
) -> Iterator[dict[str, Any]]:
    """``method url`` answered with one JSON object per line (Ollama's streams), as they come;
    errors as :func:`request_json`'s."""
    try:
        with client.stream(method, url, json=body, headers=headers(api_key)) as response:
            if response.status_code >= 400:
                response.read()
                raise _http_error(url, response)
            for line in response.iter_lines():
                if line.strip():
                    yield _object_line(url, line)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise ServiceUnreachableError(url, f"{type(exc).__name__}: {exc}") from None
    except httpx.HTTPError as exc:
        raise ServiceUnavailableError(url, f"{type(exc).__name__}: {exc}") from None


def _object_line(url: str, line: str) -> dict[str, Any]:
    try:
        payload = json.loads(line)
    except ValueError:
        raise ServiceError(url, f"a line is not JSON: {line[:200]!r}") from None
    if not isinstance(payload, dict):
        raise ServiceError(url, f"expected a JSON object per line, got {line[:200]!r}")
    return payload


def _http_error(url: str, response: httpx.Response) -> ServiceError:
    reason = f"HTTP {response.status_code}: {_detail(response)[:300]}"
    # 4xx will fail the same way again (unknown model, bad request); 5xx may pass.
    if response.status_code >= 500 or response.status_code == 429:
        return ServiceUnavailableError(url, reason)
    lowered = reason.lower()
    if (
        response.status_code == 404
        and "model" in lowered
        and ("not found" in lowered or "does not exist" in lowered)
    ):
        return ModelNotFoundError(url, reason)
    return ServiceError(url, reason)


def _detail(response: httpx.Response) -> str:
    """The error message in Ollama's, TEI's (``{"error": "..."}``) and OpenAI's or vLLM's
    (``{"error": {"message": ...}}``, ``{"object": "error", "message": ...}``) shapes."""
    try:
        body = response.json()
    except ValueError:
        return response.text
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return response.text


def request_object(
    client: httpx.Client,
    method: str,
    url: str,
    body: object = None,
    *,
    api_key: str | None = None,
) -> dict[str, Any]:
    """:func:`request_json` for an answer that must be a JSON object (errors likewise)."""
    payload = request_json(client, method, url, body, api_key=api_key)
    if not isinstance(payload, dict):
        raise ServiceError(url, f"expected a JSON object, got {type(payload).__name__}")
    return payload


def vectors(url: str, payload: Any, count: int) -> list[list[float]]:
    """``count`` embedding vectors as lists of floats, or a :class:`ServiceError`."""
    if not isinstance(payload, list) or len(payload) != count:
        got = len(payload) if isinstance(payload, list) else type(payload).__name__
        raise ServiceError(url, f"expected {count} embeddings, got {got!r}")
    try:
        return [[float(x) for x in vector] for vector in payload]
    except (TypeError, ValueError):
        raise ServiceError(url, "an embedding is not a list of numbers") from None
