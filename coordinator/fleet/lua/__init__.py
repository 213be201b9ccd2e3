"""The fleet's Redis scripts, one ``.lua`` file each; each file's header names its KEYS and ARGV.

Every change the coordinator makes to the fleet's shared state that must be atomic is one
of these scripts (key names: :mod:`coordinator.core.keys`):

=====================  ============================================================
script                 does
=====================  ============================================================
``snapshot.lua``       reads heartbeats, in-flight counts, leases and demand: of the whole
                       fleet, or of the workers changed since a router's last read
``heartbeat.lua``      writes a heartbeat and moves the worker's change counter
``touch.lua``          moves workers' change counters (a departure, a mark)
``claim.lua``          adds a batch of claims, demand, metric counts and decisions
``release.lua``        releases one message's claim (exactly once, even before it is written)
``lease.lua``          takes a model-load lease (compare-and-set on its holders)
``move_queued.lua``    moves one message out of a dead worker's queue
``move_unacked.lua``   moves one unacknowledged message of a dead worker
``steal_look.lua``     posts a worker's backlog; an idle worker reads the longest ones
``steal_move.lua``     moves one waiting message, and its claim, to an idle worker
=====================  ============================================================
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def lua_script(name: str) -> str:
    """The text of ``{name}.lua`` beside this module."""
    return files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
