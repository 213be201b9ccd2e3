"""Every routing policy by its ``ROUTING_POLICY`` name.

============  ==============================================================================
name          picks
============  ==============================================================================
``cost``      the lowest estimated time to serve (:mod:`coordinator.routing.cost`); the default
``seed``      the highest score of the design document's table (:mod:`coordinator.routing.seed`)
``affinity``  the least loaded worker with the model in memory or loading while under a queue
              threshold, else the least loaded (:mod:`coordinator.routing.affinity`)
``least_loaded``  the fewest requests
``p2c``       the less loaded of two drawn at random
``round_robin``   each worker in turn
``random``    any, at random
============  ==============================================================================

A new policy is a subclass of :class:`~coordinator.routing.interface.Policy` added to
:data:`POLICIES` (and its name to :data:`coordinator.core.settings.POLICY_NAMES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from coordinator.core.errors import ConfigError
from coordinator.core.score_weights import SEED_WEIGHTS, Weights
from coordinator.routing.affinity import AffinityPolicy
from coordinator.routing.baselines import (
    LeastLoadedPolicy,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
)
from coordinator.routing.cost import CostPolicy, Estimate
from coordinator.routing.interface import NO_LEASES, Breakdown, Leases, Policy
from coordinator.routing.seed import SeedPolicy

__all__ = [
    "DEFAULT_POLICY",
    "NO_LEASES",
    "POLICIES",
    "AffinityPolicy",
    "Breakdown",
    "CostPolicy",
    "Estimate",
    "Leases",
    "LeastLoadedPolicy",
    "Policy",
    "PowerOfTwoPolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "SeedPolicy",
    "make_policy",
]

POLICIES: Final[Mapping[str, type[Policy[Any]]]] = {
    p.name: p
    for p in (
        RandomPolicy,
        RoundRobinPolicy,
        LeastLoadedPolicy,
        PowerOfTwoPolicy,
        SeedPolicy,
        AffinityPolicy,
        CostPolicy,
    )
}
"""Every policy by its ``ROUTING_POLICY`` name."""

DEFAULT_POLICY: Final = CostPolicy.name


def make_policy(name: str, weights: Weights = SEED_WEIGHTS) -> Policy[Any]:
    """A new policy by name; ``weights`` configure ``seed``.

    Raises:
        ConfigError: for a name not in :data:`POLICIES`.
    """
    cls = POLICIES.get(name)
    if cls is None:
        raise ConfigError(f"ROUTING_POLICY={name!r}: expected one of {', '.join(POLICIES)}")
    if cls is SeedPolicy:
        return SeedPolicy(weights)
    return cls()
