"""Recent demand per model: requests per second, decayed; one publisher's own
(:class:`Demand`), and the fleet's over every publisher, which the routers add up in
Redis (``claim.lua``) and read back with each refresh."""

from __future__ import annotations

import math
from collections.abc import Mapping
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


def decayed(
    shared: Mapping[str, tuple[float, float]], now: float, tau_s: float
) -> dict[str, float]:
    """Rates recorded as ``(rate, at)`` (the fleet's, kept in Redis), decayed to ``now``."""
    return {m: rate * math.exp(-max(0.0, now - at) / tau_s) for m, (rate, at) in shared.items()}


def merged(*views: Mapping[str, float]) -> dict[str, float]:
    """The largest rate each model has in any view: the fleet's count includes this
    publisher's, unless Redis has not had it yet (a batch in flight, Redis away)."""
    out: dict[str, float] = {}
    for view in views:
        for model, rate in view.items():
            if rate > out.get(model, 0.0):
                out[model] = rate
    return out


def moved(old: Mapping[str, float], new: Mapping[str, float], by: float = 0.25) -> bool:
    """Whether any model's rate changed by more than ``by`` of itself (or appeared, or
    fell to nothing): enough to change what a policy makes of it."""
    for model in old.keys() | new.keys():
        a, b = old.get(model, 0.0), new.get(model, 0.0)
        if abs(a - b) > by * max(a, b) and max(a, b) > 1e-3:
            return True
    return False
