"""Calls to the model services over Ollama's HTTP API (``/api/generate``, ``/api/embed``)."""

from __future__ import annotations

from typing import Any

import httpx

from coordinator.core.errors import (
    ModelNotFoundError,
    ServiceError,
    ServiceUnavailableError,
    ServiceUnreachableError,
)


def get_json(client: httpx.Client, url: str) -> dict[str, Any]:
    """``GET url`` and its JSON object; errors as for :func:`post_json`."""
    return _request(client, "GET", url, None)


def post_json(client: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """``POST url`` with a JSON body and return the JSON object answered.

    Raises:
        ServiceUnavailableError: connection refused, timeout, HTTP 5xx or 429 (may pass).
        ServiceError: any other HTTP error, or an answer that is not a JSON object.
    """
    return _request(client, "POST", url, body)


def _request(
    client: httpx.Client, method: str, url: str, body: dict[str, Any] | None
) -> dict[str, Any]:
    try:
        response = client.request(method, url, json=body)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        # Nobody took the connection: down, not slow (a read timeout may be a long load).
        raise ServiceUnreachableError(url, f"{type(exc).__name__}: {exc}") from None
    except httpx.TimeoutException as exc:
        raise ServiceUnavailableError(url, f"timed out: {exc}") from None
    except httpx.HTTPError as exc:
        raise ServiceUnavailableError(url, f"{type(exc).__name__}: {exc}") from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("error", response.text)
        except ValueError:
            detail = response.text
        reason = f"HTTP {response.status_code}: {str(detail)[:300]}"
        # 4xx will fail the same way again (unknown model, bad request); 5xx may pass.
        if response.status_code >= 500 or response.status_code == 429:
            raise ServiceUnavailableError(url, reason)
        if response.status_code == 404 and "model" in reason.lower() and "not found" in reason:
            raise ModelNotFoundError(url, reason)
        raise ServiceError(url, reason)
    try:
        payload = response.json()
    except ValueError:
        raise ServiceError(url, f"answer is not JSON: {response.text[:200]!r}") from None
    if not isinstance(payload, dict):
        raise ServiceError(url, f"expected a JSON object, got {type(payload).__name__}")
    return payload


def generate(
    client: httpx.Client,
    base_url: str,
    *,
    model: str,
    prompt: str,
    images: list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``POST /api/generate``, not streamed; ``images`` are base64 for vision models."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "stream": False}
    if images:
        body["images"] = images
    if options:
        body["options"] = options
    payload = post_json(client, f"{base_url.rstrip('/')}/api/generate", body)
    if not isinstance(payload.get("response"), str):
        raise ServiceError(base_url, f"no 'response' text in {sorted(payload)!r}")
    return payload


def embed(client: httpx.Client, base_url: str, *, model: str, texts: list[str]) -> dict[str, Any]:
    """``POST /api/embed``: the answer, whose ``embeddings`` hold one vector per text, in
    order, as lists of floats."""
    payload = post_json(
        client, f"{base_url.rstrip('/')}/api/embed", {"model": model, "input": texts}
    )
    vectors = payload.get("embeddings")
    if not isinstance(vectors, list) or len(vectors) != len(texts):
        got = len(vectors) if isinstance(vectors, list) else vectors
        raise ServiceError(base_url, f"expected {len(texts)} embeddings, got {got!r}")
    payload["embeddings"] = [[float(x) for x in vector] for vector in vectors]
    return payload
