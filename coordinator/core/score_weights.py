"""The ``seed`` policy's points per factor (``SCORE_WEIGHTS``): the design document's table.

Kept in the core, beside the settings that read it from the environment, so that the
settings need not import the routing policies.
"""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel, ConfigDict, Field

from coordinator.core.heartbeat import TIER_CPU, TIER_GPU, TIER_STORAGE


class Weights(BaseModel):
    """Points per factor; the defaults are the design document's table."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    model_loaded: float = Field(default=100.0, description="worker has the model")
    specialization: float = Field(default=50.0, description="worker specialises in the service")
    tier_gpu: float = 30.0
    tier_cpu: float = 20.0
    tier_storage: float = 10.0
    service_healthy: float = Field(default=10.0, description="service reported healthy")
    cpu_load: float = Field(default=30.0, description="penalty at 100% CPU")
    active_request: float = Field(default=5.0, description="penalty per active request")
    gpu_utilization: float = Field(default=20.0, description="penalty at 100% GPU (GPU tier)")
    tiebreak: float = Field(default=5.0, ge=0.0, description="random bonus drawn from [0, x)")

    def tier_points(self, tier: int | None) -> float:
        """Points for a tier; an unknown tier earns none."""
        if tier == TIER_GPU:
            return self.tier_gpu
        if tier == TIER_CPU:
            return self.tier_cpu
        if tier == TIER_STORAGE:
            return self.tier_storage
        return 0.0


SEED_WEIGHTS: Final = Weights()
