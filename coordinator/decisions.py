"""A routing decision as kept for operators: who won, why, and who else was considered."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Outcome = Literal["routed", "fallback_no_worker", "fallback_registry_down"]


class Decision(BaseModel):
    """One routing decision. ``candidates`` holds the best few breakdowns, best first."""

    model_config = ConfigDict(extra="ignore")

    at: float = Field(description="unix time, seconds")
    task: str
    service: str
    model: str | None
    outcome: Outcome
    queue: str
    worker_id: str | None = None
    eligible: int = 0
    candidates: list[dict[str, float | str]] = Field(default_factory=list)
    reason: str | None = None
