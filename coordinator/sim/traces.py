"""Request traces for the routing simulator: read from CSV, or generated.

A trace is a list of :class:`TraceRequest`, sorted by arrival. Any CSV with a timestamp
column and token-count columns is accepted; column names are matched without regard to
case, ``_`` or spaces:

========================  ==============================================================
column                    accepted names
========================  ==============================================================
arrival                   ``timestamp``, ``time``, ``arrival``, ``arrival_s``: ISO date
                          and time, or seconds
context (prompt) tokens   ``ContextTokens``, ``context_tokens``, ``prompt_tokens``,
                          ``input_tokens``
generated tokens          ``GeneratedTokens``, ``generated_tokens``, ``output_tokens``,
                          ``completion_tokens``
model (optional)          ``model``
========================  ==============================================================

Public traces such as Azure's LLM inference traces have no model column; the models are
then assigned by :func:`assign_models`: each request independently draws model *i* of the
catalogue (i = 1..N, most popular first) with probability proportional to 1 / i^s (Zipf,
``s`` = 1.0 by default), from a ``random.Random(seed)``, so one seed gives one assignment.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Final

from coordinator.core.errors import ConfigError

MAX_TOKENS: Final = 10_000_000

_ARRIVAL: Final = ("timestamp", "time", "arrival", "arrivals")
_CONTEXT: Final = ("contexttokens", "prompttokens", "inputtokens", "context")
_GENERATED: Final = ("generatedtokens", "outputtokens", "completiontokens", "generated")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request: when it arrives (seconds from the trace's start), its size, its model."""

    arrival_s: float
    context_tokens: int
    generated_tokens: int
    model: str | None = None


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "").replace(" ", "").removesuffix("s")


def _column(header: Sequence[str], names: Iterable[str]) -> int | None:
    wanted = {_key(n) for n in names}
    return next((i for i, h in enumerate(header) if _key(h) in wanted), None)


def _seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return datetime.fromisoformat(value.strip()).timestamp()


def _tokens(value: str) -> int:
    tokens = int(float(value))
    if not 0 <= tokens <= MAX_TOKENS:
        raise ValueError(f"{tokens} tokens is outside 0..{MAX_TOKENS}")
    return tokens


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read a CSV trace; arrivals become seconds from the first one, sorted.

    Raises:
        ConfigError: the file cannot be read, lacks a needed column, or has a bad row
            (the message names the file, line and value).
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"trace {str(path)!r} cannot be read: {exc}") from None
    if not rows:
        raise ConfigError(f"trace {str(path)!r} is empty")
    header = rows[0]
    columns = [_column(header, names) for names in (_ARRIVAL, _CONTEXT, _GENERATED)]
    if any(c is None for c in columns):
        raise ConfigError(
            f"trace {str(path)!r} needs timestamp, context-token and generated-token columns;"
            f" its header is {header!r}"
        )
    at, ctx, gen = (c for c in columns if c is not None)
    model_at = _column(header, ("model",))
    requests = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            model = row[model_at].strip() or None if model_at is not None else None
            requests.append(
                TraceRequest(_seconds(row[at]), _tokens(row[ctx]), _tokens(row[gen]), model)
            )
        except (ValueError, IndexError) as exc:
            raise ConfigError(f"trace {str(path)!r} line {line}: {row!r}: {exc}") from None
    if not requests:
        raise ConfigError(f"trace {str(path)!r} has a header and no requests")
    requests.sort(key=lambda r: r.arrival_s)
    start = requests[0].arrival_s
    return [replace(r, arrival_s=r.arrival_s - start) for r in requests]


def zipf_weights(n: int, s: float) -> list[float]:
    """Zipf popularity of ``n`` items, most popular first, summing to 1."""
    raw = [1.0 / (i**s) for i in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def assign_models(
    trace: Sequence[TraceRequest], models: Sequence[str], *, seed: int, zipf_s: float = 1.0
) -> list[TraceRequest]:
    """Give every request without a model one drawn by Zipf popularity (see the module)."""
    rng = random.Random(seed)
    weights = zipf_weights(len(models), zipf_s)
    drawn = rng.choices(list(models), weights=weights, k=len(trace))
    pairs = zip(trace, drawn, strict=True)
    return [r if r.model is not None else replace(r, model=m) for r, m in pairs]


def synthetic_trace(
    models: Sequence[str],
    *,
    seed: int,
    duration_s: float = 3600.0,
    rate_per_s: float = 3.0,
    burst_every_s: float = 600.0,
    burst_s: float = 60.0,
    burst_factor: float = 2.0,
    shift_every_s: float = 900.0,
    zipf_s: float = 1.0,
) -> list[TraceRequest]:
    """A Poisson trace with bursts and popularity shifts, for what public traces lack.

    Every ``burst_every_s`` the rate is ``burst_factor`` times higher for ``burst_s``;
    every ``shift_every_s`` the popularity ranking rotates by a third of the catalogue, so
    models that were cold become the hot ones. Token counts are log-normal around the
    Azure conversation trace's medians (about 1,000 in, 130 out).
    """
    rng = random.Random(seed)
    weights = zipf_weights(len(models), zipf_s)
    out: list[TraceRequest] = []
    t = 0.0
    while True:
        bursting = t % burst_every_s < burst_s
        t += rng.expovariate(rate_per_s * (burst_factor if bursting else 1.0))
        if t >= duration_s:
            return out
        shift = int(t // shift_every_s) * max(1, len(models) // 3)
        ranked = [models[(i + shift) % len(models)] for i in range(len(models))]
        out.append(
            TraceRequest(
                arrival_s=t,
                context_tokens=min(MAX_TOKENS, int(rng.lognormvariate(math.log(1000), 0.8))),
                generated_tokens=max(1, int(rng.lognormvariate(math.log(130), 0.9))),
                model=rng.choices(ranked, weights=weights)[0],
            )
        )
