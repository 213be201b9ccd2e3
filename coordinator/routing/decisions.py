"""A routing decision as kept for operators: who won, why, and who else was considered."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from coordinator.routing import POLICIES, Breakdown, SeedPolicy

Outcome = Literal["routed", "fallback_no_worker", "fallback_registry_down", "fallback_error"]


@dataclass
class DecisionBudget:
    """Which decisions to keep: at most ``per_s`` a second, in bursts of a second's worth
    (never too few to keep one), a token bucket on the caller's clock."""

    per_s: float
    _tokens: float = field(default=0.0, init=False)
    _at: float = field(default=float("-inf"), init=False)

    def keep(self, now: float) -> bool:
        """Whether to keep the decision made at ``now``."""
        if self.per_s <= 0:
            return False
        tokens = min(max(self.per_s, 1.0), self._tokens + (now - self._at) * self.per_s)
        self._at = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True


def decision_json(
    at: float,
    policy: str,
    where: tuple[str, str, str | None, Outcome, str],
    ranked: Sequence[Breakdown] = (),
    eligible: int = 0,
    reason: str | None = None,
) -> str:
    """A decision as stored: JSON of a :class:`Decision` (``where``: task, service, model,
    outcome, queue), built without pydantic, with breakdowns as rows and by orjson (a
    fifteenth of the standard library's time), because the router makes one for every
    task."""
    task, service, model, outcome, queue = where
    return orjson.dumps(
        {
            "at": at,
            "policy": policy,
            "task": task,
            "service": service,
            "model": model,
            "outcome": outcome,
            "queue": queue,
            "worker_id": ranked[0].worker_id if ranked else None,
            "eligible": eligible,
            "candidates": [score.as_row() for score in ranked],
            "reason": reason,
        }
    ).decode()


class Decision(BaseModel):
    """One routing decision. ``candidates`` holds the best few breakdowns, best first, each
    named by its policy's :attr:`~coordinator.routing.Policy.factors`."""

    model_config = ConfigDict(extra="ignore")

    at: float = Field(description="unix time, seconds")
    policy: str = Field(
        # Decisions stored before there were policies were made by the design's table.
        default=SeedPolicy.name,
        description="the ROUTING_POLICY that decided",
    )
    task: str
    service: str
    model: str | None
    outcome: Outcome
    queue: str
    worker_id: str | None = None
    eligible: int = 0
    candidates: list[dict[str, float | str]] = Field(default_factory=list)
    unnamed: str | None = Field(
        default=None,
        description="why the candidates show worker_id and total only, when they do",
    )
    reason: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def unit(self) -> str | None:
        """How to read each candidate's ``total``; ``None`` for a policy unknown here."""
        known = POLICIES.get(self.policy)
        return known.unit if known is not None else None

    @model_validator(mode="before")
    @classmethod
    def _rows_to_dicts(cls, data: Any) -> Any:
        # Stored as rows (see the router's _decision); read back as named factors. A row
        # this reader cannot name (a newer policy, or a policy whose factors changed) keeps
        # what every policy's row has: the worker id first and the total last.
        if not isinstance(data, dict) or not isinstance(data.get("candidates"), list):
            return data
        policy = data.get("policy", SeedPolicy.name)
        known = POLICIES.get(policy) if isinstance(policy, str) else None
        names = ("worker_id", *known.factors) if known is not None else ()
        rows: list[Any] = []
        unnamed = data.get("unnamed")  # set already when read back from its own dump
        for row in data["candidates"]:
            if not isinstance(row, list) or len(row) < 2:
                rows.append(row)  # a dict is already named; anything else fails validation
            elif len(row) == len(names):
                rows.append(dict(zip(names, row, strict=True)))
            else:
                rows.append({"worker_id": row[0], "total": row[-1]})
                unnamed = (
                    f"policy {policy!r} is unknown here"
                    if known is None
                    else f"rows of {len(row)} values do not match policy {policy!r}"
                )
        return {**data, "candidates": rows, "unnamed": unnamed}
