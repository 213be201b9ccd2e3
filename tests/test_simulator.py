"""The trace-driven simulator: traces, the event simulation and the policy comparison.

Pure code: no Redis, no Celery. The simulator routes with the real policy classes, so these
tests also pin how the policies behave on a whole trace.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
from pathlib import Path

import pytest

from coordinator.core.errors import ConfigError
from coordinator.routing import POLICIES, CostPolicy, LeastLoadedPolicy, make_policy
from coordinator.routing.demand import Demand
from coordinator.sim.compare import add_arguments, compare, quantile, run_command, stats
from coordinator.sim.simulator import CATALOG, FleetSpec, ModelSpec, run
from coordinator.sim.traces import (
    TraceRequest,
    assign_models,
    load_trace,
    synthetic_trace,
    zipf_weights,
)

# The project's shared material sits beside its checkout (see ../shared/README.md).
AZURE = Path(
    os.environ.get(
        "AZURE_TRACE",
        Path(__file__).resolve().parents[2] / "shared" / "traces" / "azure_llm_conv_2023.csv",
    )
)
needs_azure = pytest.mark.skipif(
    not AZURE.is_file(), reason=f"no Azure trace at {AZURE} (set AZURE_TRACE)"
)
GB = 10**9


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


# ---- traces -------------------------------------------------------------------------


@needs_azure
def test_azure_trace_loads_as_seconds_from_start() -> None:
    trace = load_trace(AZURE)
    assert len(trace) == 19_366
    assert trace[0].arrival_s == 0.0
    assert 3400 < trace[-1].arrival_s < 3600  # about 58 minutes
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(trace))
    assert (trace[0].context_tokens, trace[0].generated_tokens) == (374, 44)
    assert all(r.model is None for r in trace)


def test_any_csv_with_timestamp_and_token_columns(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "Arrival_S,prompt_tokens,output_tokens,Model\n5.5,10,2,llama3.2:1b\n1.5,20,4,\n",
    )
    trace = load_trace(path)
    assert trace == [TraceRequest(0.0, 20, 4, None), TraceRequest(4.0, 10, 2, "llama3.2:1b")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "is empty"),
        ("timestamp,tokens\n1,2\n", "needs timestamp, context-token and generated-token"),
        ("timestamp,ContextTokens,GeneratedTokens\n", "has a header and no requests"),
        ("timestamp,ContextTokens,GeneratedTokens\n1,2,3\nsoon,2,3\n", "line 3: ['soon'"),
        ("timestamp,ContextTokens,GeneratedTokens\n1,-2,3\n", "line 2"),
        ("timestamp,ContextTokens,GeneratedTokens\n1,2\n", "line 2"),
    ],
)
def test_bad_traces_name_the_problem(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=r"^trace ") as info:
        load_trace(_write(tmp_path, text))
    assert expected in str(info.value)


def test_missing_trace_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_trace(tmp_path / "nope.csv")


def test_model_assignment_is_seeded_zipf_and_keeps_given_models() -> None:
    trace = [TraceRequest(float(i), 1, 1, "mine" if i % 10 == 0 else None) for i in range(20_000)]
    names = [m.name for m in CATALOG]
    first = assign_models(trace, names, seed=7)
    assert first == assign_models(trace, names, seed=7)
    assert first != assign_models(trace, names, seed=8)
    assert all(r.model == "mine" for r in first[::10])
    counts = collections.Counter(r.model for r in first if r.model != "mine")
    # Zipf s=1 over 12: the first model is about 32%, twice the second, 12x the last.
    share = counts[names[0]] / sum(counts.values())
    assert share == pytest.approx(zipf_weights(12, 1.0)[0], abs=0.015)
    assert counts[names[0]] > 1.6 * counts[names[1]] > 1.6 * counts[names[-1]]


def test_synthetic_trace_has_bursts_and_popularity_shifts() -> None:
    names = [m.name for m in CATALOG]
    trace = synthetic_trace(names, seed=3, duration_s=1800.0)
    assert trace == synthetic_trace(names, seed=3, duration_s=1800.0)
    in_burst = sum(1 for r in trace if r.arrival_s % 600 < 60)
    outside = len(trace) - in_burst
    # Bursts are 60 s of every 600 at twice the rate: 2/11 of the requests.
    assert in_burst / len(trace) == pytest.approx(2 / 11, abs=0.03)
    assert outside > 0
    top_before = collections.Counter(r.model for r in trace if r.arrival_s < 900).most_common(1)
    top_after = collections.Counter(r.model for r in trace if r.arrival_s >= 900).most_common(1)
    assert top_before[0][0] != top_after[0][0]


def test_demand_reads_a_steady_rate_and_decays() -> None:
    demand = Demand(tau_s=10.0)
    for i in range(200):
        demand.record("m", i * 0.5)  # 2 requests/s for 100 s
    assert demand.rate("m", 99.5) == pytest.approx(2.0, rel=0.1)
    assert demand.rate("m", 99.5 + 30) == pytest.approx(2.0 * 2.718**-3, rel=0.1)
    assert demand.rate("other", 0.0) == 0.0
    assert set(demand.rates(100.0)) == {"m"}


# ---- the simulation -----------------------------------------------------------------

SMALL_CATALOG = (ModelSpec("a", 2 * GB), ModelSpec("b", 4 * GB), ModelSpec("c", 8 * GB))


def _small_trace(n: int = 400, gap_s: float = 0.5) -> list[TraceRequest]:
    models = ("a", "a", "b", "c")
    return [TraceRequest(i * gap_s, 1000, 100, models[i % len(models)]) for i in range(n)]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_request_is_served_once_and_the_counts_add_up(policy: str) -> None:
    fleet = FleetSpec(workers=3, gpu_workers=2, slots=2)
    trace = _small_trace()
    result = run(make_policy(policy), trace, fleet=fleet, catalog=SMALL_CATALOG, seed=5)
    assert [s.index for s in result.served] == list(range(len(trace)))
    for worker_id, busy_s in result.busy_s.items():
        work = sum(s.work_s for s in result.served if s.worker_id == worker_id)
        assert busy_s == pytest.approx(work)
    for s in result.served:
        assert s.latency_s >= s.work_s - 1e-9
        assert s.work_s >= s.ideal_s / 1.0 - 1e-9  # nobody is faster than a GPU-tier worker
        assert not s.download or s.cold_load  # a download is followed by a load
        assert not s.reload_after_eviction or s.cold_load
    figures = stats(result)
    assert figures.requests == len(trace)
    assert figures.cold_loads == sum(s.cold_load for s in result.served)
    assert figures.p50_s <= figures.p95_s <= figures.p99_s
    assert figures.imbalance >= 1.0


@pytest.mark.parametrize("policy", ["random", "p2c", "cost", "seed"])
def test_a_seed_gives_the_same_run(policy: str) -> None:
    fleet = FleetSpec(workers=4, gpu_workers=2, slots=2)
    trace = _small_trace()
    first = run(make_policy(policy), trace, fleet=fleet, catalog=SMALL_CATALOG, seed=11)
    again = run(make_policy(policy), trace, fleet=fleet, catalog=SMALL_CATALOG, seed=11)
    other = run(make_policy(policy), trace, fleet=fleet, catalog=SMALL_CATALOG, seed=12)
    assert first == again
    assert first != other


def test_cost_policy_keeps_models_warm_where_least_loaded_thrashes() -> None:
    fleet = FleetSpec(workers=3, gpu_workers=3, slots=1)
    trace = _small_trace(n=300, gap_s=2.0)  # light load: three models, one slot each
    cost = stats(run(CostPolicy(), trace, fleet=fleet, catalog=SMALL_CATALOG, seed=1))
    blind = stats(run(LeastLoadedPolicy(), trace, fleet=fleet, catalog=SMALL_CATALOG, seed=1))
    # One worker per model is the answer; the first load of each is unavoidable.
    assert cost.cold_loads <= 6
    assert blind.cold_loads > 50
    assert cost.p99_s < blind.p99_s


def test_one_load_per_model_while_it_is_under_way() -> None:
    # A burst for a model nobody has in memory: the lease makes the requests queue behind
    # the first load instead of each idle worker starting its own.
    fleet = FleetSpec(workers=4, gpu_workers=4, slots=2, heartbeat_s=30.0)
    trace = [TraceRequest(i * 0.01, 100, 10, "c") for i in range(6)]
    result = run(CostPolicy(), trace, fleet=fleet, catalog=SMALL_CATALOG, seed=2)
    assert sum(s.cold_load for s in result.served) == 1
    assert len({s.worker_id for s in result.served}) == 1


# ---- the comparison -----------------------------------------------------------------


def test_quantile_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert (quantile(values, 0.5), quantile(values, 0.99), quantile(values, 1.0)) == (
        50.0,
        99.0,
        100.0,
    )
    assert quantile([], 0.5) == 0.0


@needs_azure
def test_default_policy_meets_the_targets_on_the_azure_trace() -> None:
    """The issue's comparison, one repeat: 8 workers, 12 models, 3 slots each."""
    policies = ["least_loaded", "p2c", "cost"]
    result = compare(
        load_trace(AZURE),
        policies=policies,
        default_policy="cost",
        fleet=FleetSpec(),
        catalog=CATALOG,
        repeats=1,
        seed=1,
        zipf_s=1.0,
        processes=1,
    )
    rows = {r.policy: r.mean for r in result.rows}
    assert rows["cost"]["requests"] == 19_366
    for baseline in ("least_loaded", "p2c"):
        assert rows["cost"]["cold_loads"] <= 0.5 * rows[baseline]["cold_loads"]
        assert rows["cost"]["p99_s"] <= 0.8 * rows[baseline]["p99_s"]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_json_rows_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tmp_trace: Path
) -> None:
    plot = tmp_path / "out" / "sim.png"
    args = _args(
        "--trace",
        str(tmp_trace),
        "--json",
        "--repeats",
        "2",
        "--plot",
        str(plot),
        "--workers",
        "3",
        "--gpu-workers",
        "2",
        "--processes",
        "1",
    )
    assert run_command(args, "cost") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in rows] == list(POLICIES)
    assert [r["policy"] for r in rows if r["default"]] == ["cost"]
    for row in rows:
        for key in (
            "cold_loads",
            "downloads",
            "reloads_after_eviction",
            "p50_s",
            "p95_s",
            "p99_s",
            "imbalance",
            "throughput",
        ):
            assert isinstance(row[key], int | float), key
        assert (row["requests"], row["repeats"]) == (200, 2)
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.fixture
def tmp_trace(tmp_path: Path) -> Path:
    lines = ["timestamp,ContextTokens,GeneratedTokens"]
    lines += [f"{i * 0.4:.1f},{500 + i},{50 + i % 7}" for i in range(200)]
    return _write(tmp_path, "\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--policies", "fastest"), "--policies 'fastest'"),
        (("--models", "13"), "--models 13"),
        (("--repeats", "0"), "--repeats 0"),
        (("--gpu-workers", "9"), "--gpu-workers 9"),
        (("--load", "0"), "--load 0"),
    ],
)
def test_bad_options_are_config_errors(
    tmp_trace: Path, argv: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run_command(_args("--trace", str(tmp_trace), "--no-plot", *argv), "cost")


def test_cli_simulate(tmp_trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from coordinator.cli import main

    argv = ["simulate", "--trace", str(tmp_trace), "--repeats", "1", "--no-plot"]
    assert main([*argv, "--json", "--policies", "p2c,cost"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["policy"], r["default"]) for r in rows] == [("p2c", False), ("cost", True)]
    assert main([*argv, "--policies", "seed"]) == 0
    out = capsys.readouterr().out
    assert "Routing policies" in out
    assert "seed" in out
    assert main(["simulate", "--trace", str(tmp_trace.with_name("missing.csv"))]) == 2
    assert "cannot be read" in capsys.readouterr().err
