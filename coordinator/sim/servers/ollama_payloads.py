"""The simulated Ollama server's request checks and answer shapes: no server state here.

Requests are checked as Ollama checks them, failing with :class:`OllamaError` (an HTTP
status and Ollama's error message); answers carry the fields Ollama's do, with
deterministic values derived from the model name and the input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from datetime import UTC, datetime
from typing import Any, Final, cast

from starlette.requests import Request

from coordinator.sim.servers.harness import JSONObject
from coordinator.sim.servers.model_memory import model_digest, model_size

OLLAMA_VERSION: Final = "0.5.0"
# Simulated per-token costs, so clients computing tokens/s never divide by zero.
_PROMPT_NS_PER_TOKEN: Final = 100_000
_EVAL_NS_PER_TOKEN: Final = 1_000_000


class OllamaError(Exception):
    """Answered as Ollama does: ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def not_found(model: str) -> OllamaError:
    """Ollama's answer to a request for a model that was never pulled."""
    return OllamaError(404, f'model "{model}" not found, try pulling it first')


async def json_body(request: Request) -> JSONObject:
    """The request's body, which must be a JSON object."""
    body = await request.body()
    if not body.strip():
        raise OllamaError(400, "missing request body")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OllamaError(400, f"invalid JSON body: {exc}") from None
    if not isinstance(payload, dict):
        raise OllamaError(400, "request body must be a JSON object")
    return payload


def required_model(payload: JSONObject) -> str:
    """The model a request names."""
    # "name" is the deprecated spelling that Ollama still accepts.
    model = payload.get("model") or payload.get("name")
    if not isinstance(model, str) or not model:
        raise OllamaError(400, "model is required")
    return model


def optional_bool(payload: JSONObject, key: str, default: bool) -> bool:
    """``payload[key]``, a boolean if present."""
    value = payload.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise OllamaError(400, f'"{key}" must be a boolean')
    return value


def images(payload: JSONObject) -> list[str]:
    """A generate request's ``images``: base64 strings."""
    found = payload.get("images") or []
    if not isinstance(found, list) or not all(isinstance(i, str) for i in found):
        raise OllamaError(400, '"images" must be a list of base64 strings')
    for index, image in enumerate(found):
        # Ollama decodes images while parsing the request, so bad base64 is a 400.
        try:
            base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise OllamaError(400, f"illegal base64 data in image {index}") from None
    return cast(list[str], found)


def embed_inputs(payload: JSONObject) -> list[str]:
    """An embed request's ``input``: a string or a list of them."""
    found = payload.get("input")
    if found is None:
        return []
    if isinstance(found, str):
        return [found]
    if isinstance(found, list) and all(isinstance(t, str) for t in found):
        return cast(list[str], found)
    raise OllamaError(400, "invalid input type")


def is_zero_keep_alive(value: object) -> bool:
    """Whether ``keep_alive`` says to unload the model now."""
    # A number of seconds or a Go duration string.
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == 0
    if isinstance(value, str):
        return re.fullmatch(r"0+(\.0*)?(ns|us|µs|ms|s|m|h)?", value.strip()) is not None
    return False


def iso(unix_s: float) -> str:
    """Unix seconds as Ollama's timestamps: ISO 8601 in UTC with a ``Z``."""
    return datetime.fromtimestamp(unix_s, UTC).isoformat().replace("+00:00", "Z")


def iso_us(unix_us: int) -> str:
    """Unix microseconds as Ollama's timestamps, exactly."""
    seconds, micros = divmod(unix_us, 1_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros)
    return stamp.isoformat().replace("+00:00", "Z")


def embedding(text: str, dim: int) -> list[float]:
    """A unit vector of ``dim`` floats seeded by a hash of ``text``: stable, not semantic."""
    values = []
    for i in range(dim):
        digest = hashlib.sha256(f"{i}\0{text}".encode()).digest()
        values.append(int.from_bytes(digest[:8], "big") / 2**63 - 1.0)
    norm = math.sqrt(sum(v * v for v in values))
    if norm == 0.0:
        return [1.0 / math.sqrt(dim)] * dim
    return [v / norm for v in values]


def word_count(text: str) -> int:
    """The simulated number of tokens in ``text``."""
    return len(text.split())


def tokens(text: str) -> list[str]:
    """``text`` in the chunks a generate stream sends."""
    # Whitespace stays attached to the following token, as with real tokenizers, so
    # joining the streamed chunks reproduces the text exactly.
    found: list[str] = re.findall(r"\s*\S+|\s+$", text)
    return found


def generate_timings(
    elapsed_ns: int, load_ns: int, simulated_ns: int, prompt_tokens: int, eval_tokens: int
) -> JSONObject:
    """The durations and counts that end a generate answer; ``simulated_ns`` of the load
    was not slept, so it adds to the wall-clock ``elapsed_ns``, as the token times do."""
    prompt_eval_ns = prompt_tokens * _PROMPT_NS_PER_TOKEN
    eval_ns = eval_tokens * _EVAL_NS_PER_TOKEN
    return {
        # So that the total is never less than the sum of its parts.
        "total_duration": elapsed_ns + simulated_ns + prompt_eval_ns + eval_ns,
        "load_duration": load_ns,
        "prompt_eval_count": prompt_tokens,
        "prompt_eval_duration": prompt_eval_ns,
        "eval_count": eval_tokens,
        "eval_duration": eval_ns,
    }


def pull_progress(model: str) -> list[dict[str, Any]]:
    """The status lines ``POST /api/pull`` streams for ``model``, as Ollama words them."""
    digest = f"sha256:{model_digest(model)}"
    total = model_size(model)
    downloading = {"status": f"downloading {digest}", "digest": digest, "total": total}
    return [
        {"status": "pulling manifest"},
        downloading,
        {**downloading, "completed": total},
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
        {"status": "removing any unused layers"},
        {"status": "success"},
    ]
