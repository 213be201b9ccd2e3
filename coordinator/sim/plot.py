"""The simulator's plot: latency distributions and cold loads per policy (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt

from coordinator.sim.compare import Comparison


def plot(comparison: Comparison, path: Path) -> None:
    """Draw the latency CDF of each policy (first repeat) and its mean cold loads."""
    fig, (cdf, bars) = plt.subplots(1, 2, figsize=(13, 4.8))
    for row in comparison.rows:
        latencies = sorted(comparison.latencies[row.policy])
        n = len(latencies)
        label = row.policy + (" (default)" if row.default else "")
        cdf.plot(
            latencies,
            [(i + 1) / n for i in range(n)],
            label=label,
            linewidth=2.4 if row.default else 1.3,
        )
    cdf.set_xscale("log")
    cdf.set_xlabel("end-to-end latency, s (log)")
    cdf.set_ylabel("share of requests")
    cdf.set_title("Latency distribution")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(loc="lower right", fontsize=8)
    names = [r.policy for r in comparison.rows]
    colds = [max(r.mean["cold_loads"], 0.5) for r in comparison.rows]
    errors = [r.spread["cold_loads"] for r in comparison.rows]
    bars.bar(
        names,
        colds,
        yerr=errors,
        capsize=3,
        color=["tab:green" if r.default else "tab:gray" for r in comparison.rows],
    )
    bars.set_yscale("log")
    bars.set_ylabel("cold loads (mean over repeats, log)")
    bars.set_title("Model loads")
    bars.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
