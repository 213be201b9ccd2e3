"""What ``coordinator explain`` prints for people, and the facts it adds to the router's
ranking: the queue the task would go to, how far the random tiebreak reaches, and why a live
worker is not eligible."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console

from coordinator.core.heartbeat import ROUTABLE_STATUSES, Heartbeat
from coordinator.core.keys import Keys
from coordinator.ops import render
from coordinator.ops.render import breakdown_table
from coordinator.routing import Breakdown, CostPolicy, LeastLoadedPolicy, Policy, SeedPolicy


def print_explanation(
    console: Console,
    *,
    task: str,
    service: str,
    model: str | None,
    policy: Policy[Any],
    ranked: Sequence[Breakdown],
    skipped: Mapping[str, str],
    queue: str,
    close_within: float | None,
) -> None:
    """``explain`` for people; ``close_within`` is the router's tiebreak when the first two
    totals are closer than it, so either worker may be chosen."""
    title = f"{task} (service {service}, model {model}): {len(ranked)} eligible"
    console.print(f"policy {policy.name}: {policy.unit}")
    if ranked:
        console.print(breakdown_table(title, [score.as_dict() for score in ranked], policy.name))
    for worker_id, reason in skipped.items():
        console.print(f"not eligible: {worker_id} ({reason})")
    if not ranked:
        console.print(
            f"no live worker can run {task} (service {service!r}): it would wait in "
            f"the shared fallback queue {queue}"
        )
        return
    winner = ranked[0]
    places, unit = render.decimals(policy.name), policy.unit.split(",")[0]
    total = render.cell(winner.total, places)
    console.print(f"winner: {winner.worker_id} with {total} {unit} -> queue {queue}")
    if close_within is not None:
        console.print(
            f"note: {ranked[1].worker_id} is within the router's random tiebreak "
            f"(0-{close_within:g} {unit}), so either may be chosen"
        )


def target_queue(keys: Keys, service: str, winner: Breakdown | None) -> str:
    """Where the router would send the task: the shared fallback queue of ``service`` when
    no worker is eligible, else the winner's own queue."""
    if winner is None:
        return keys.service_queue(service)
    return keys.worker_queue(winner.worker_id)


def tiebreak_max(policy: Policy[Any]) -> float:
    """The most the router's random tiebreak adds to a total, which ``explain`` leaves out."""
    if isinstance(policy, SeedPolicy):
        return policy.weights.tiebreak
    if isinstance(policy, CostPolicy):
        return policy.tie_s
    if isinstance(policy, LeastLoadedPolicy):
        return 0.5  # its random half-request between equal loads
    return 0.0


def why_not(hb: Heartbeat, service: str) -> str:
    """Why :func:`~coordinator.core.heartbeat.is_eligible` refuses ``hb`` for ``service``."""
    if hb.status not in ROUTABLE_STATUSES:
        return f"status {hb.status}"
    if service not in hb.capabilities:
        return f"does not offer {service}"
    return f"{service} unhealthy"
