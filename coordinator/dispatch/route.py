"""Where the router sends one task, and the claim that counts it against a worker."""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.fleet.claims import Claim


@dataclass(frozen=True, slots=True)
class Route:
    """Where one task goes, and whose in-flight count it adds to, under which claim id
    (``None``: nobody's).

    The claim counts in this router's view at once, and in the fleet's (Redis) once the
    message is published: Celery's ``after_task_publish`` confirms it, or the publisher
    calls :meth:`FleetRouter.confirm`. A message that could not be published (an argument
    JSON cannot encode, a broker down) thus leaves no claim behind.
    """

    queue: str
    worker_id: str | None
    claim_id: str | None = field(default=None, compare=False)

    @property
    def claim(self) -> Claim | None:
        """The claim the message carries in its :data:`CLAIM_HEADER`, if any."""
        if self.worker_id is None or self.claim_id is None:
            return None
        return self.worker_id, self.claim_id
