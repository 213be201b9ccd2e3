"""The routing-policy comparison of docs/simulator.md: the Azure trace through every policy.

    .venv/bin/python -m bench.simulate [--trace FILE] [any option of `coordinator simulate`]

Without ``--trace`` it reads ``../shared/traces/azure_llm_conv_2023.csv`` (relative to the
project) and draws ``docs/images/routing-simulation.png``: the figures and plot of
docs/simulator.md. It prints the table, the targets and the wall time; the simulated
fleet and workload are described in ``coordinator/sim/simulator.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from coordinator.routing import DEFAULT_POLICY
from coordinator.sim.compare import add_arguments, run_command

ROOT = Path(__file__).resolve().parents[1]
AZURE = ROOT.parent / "shared" / "traces" / "azure_llm_conv_2023.csv"
PLOT = ROOT / "docs" / "images" / "routing-simulation.png"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--trace" not in argv and "--synthetic" not in argv:
        argv += ["--trace", str(AZURE)]
    if "--plot" not in argv:
        argv += ["--plot", str(PLOT)]
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_arguments(parser)
    started = time.perf_counter()
    code = run_command(parser.parse_args(argv), DEFAULT_POLICY)
    print(f"wall time {time.perf_counter() - started:.1f} s")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
