"""A routing decision as kept for operators: who won, why, and who else was considered."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from coordinator.scoring import FACTORS

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

    @field_validator("candidates", mode="before")
    @classmethod
    def _rows_to_dicts(cls, value: Any) -> Any:
        # Stored as rows (see ScoreBreakdown.as_row); read back as named factors.
        if isinstance(value, list):
            names = ("worker_id", *FACTORS)
            return [dict(zip(names, c, strict=True)) if isinstance(c, list) else c for c in value]
        return value
