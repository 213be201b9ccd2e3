"""Recent demand per model, as the router sees it: requests per second, decayed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Demand:
    """Each model's request rate, an exponentially decayed count (time constant ``tau_s``).

    A steady stream of ``r`` requests per second reads as ``r``; a model nobody asked for
    in a few ``tau_s`` reads as about 0. Time is passed in, so tests need no clock.
    """

    tau_s: float = 60.0
    _rate: dict[str, float] = field(default_factory=dict, repr=False)
    _at: dict[str, float] = field(default_factory=dict, repr=False)

    def record(self, model: str, now: float) -> None:
        """One request for ``model`` at ``now`` (seconds)."""
        self._rate[model] = self.rate(model, now) + 1.0 / self.tau_s
        self._at[model] = now

    def rate(self, model: str, now: float) -> float:
        """Requests per second for ``model`` as of ``now``."""
        rate = self._rate.get(model)
        if rate is None:
            return 0.0
        return rate * math.exp(-max(0.0, now - self._at[model]) / self.tau_s)

    def rates(self, now: float) -> dict[str, float]:
        """Every model's rate as of ``now``."""
        return {model: self.rate(model, now) for model in self._rate}
