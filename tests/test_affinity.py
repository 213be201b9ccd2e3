"""The ``affinity`` policy (model affinity under a queue threshold) and its threshold sweep in
the simulator; pure code, no Redis."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from coordinator.core.errors import ConfigError
from coordinator.core.heartbeat import Heartbeat
from coordinator.core.settings import POLICY_NAMES
from coordinator.routing import POLICIES, AffinityPolicy, make_policy
from coordinator.routing.affinity import Affinity
from coordinator.sim.compare import Row, best_affinity, run_command, sim_policy, verdict
from coordinator.sim.simulator import FleetSpec, ModelSpec, run
from coordinator.sim.traces import TraceRequest
from tests.test_simulator import _args

SERVICE = "vllm"
MODEL = "m"
GB = 10**9


def hb(worker_id: str, **fields: Any) -> Heartbeat:
    return Heartbeat.model_validate({"worker_id": worker_id, "capabilities": [SERVICE], **fields})


WARM_A = hb("a", models_in_memory=[MODEL], mean_service_s=2.0)
WARM_B = hb("b", models_in_memory=[MODEL], mean_service_s=2.0)
COLD = hb("c", models_on_disk=[MODEL], model_bytes={MODEL: 4 * GB}, load_bps=2.0 * GB)


def ranked(
    policy: AffinityPolicy,
    fleet: tuple[Heartbeat, ...],
    in_flight: dict[str, int],
    *,
    model: str | None = MODEL,
    leases: dict[str, dict[str, float]] | None = None,
    rng: random.Random | None = None,
) -> list[Affinity]:
    pool = policy.prepare(fleet, SERVICE, model, leases=leases or {})
    out = policy.rank(pool, in_flight=in_flight, rng=rng)
    assert all(isinstance(b, Affinity) for b in out)
    return [b for b in out if isinstance(b, Affinity)]


def test_registered_under_its_name_in_the_policies_and_the_settings() -> None:
    assert POLICIES["affinity"] is AffinityPolicy
    assert "affinity" in POLICY_NAMES
    assert isinstance(make_policy("affinity"), AffinityPolicy)


def test_the_least_loaded_warm_worker_under_the_threshold_beats_an_idle_cold_one() -> None:
    best = ranked(AffinityPolicy(threshold=4), (WARM_A, WARM_B, COLD), {"a": 3, "b": 2})
    assert [b.worker_id for b in best] == ["b", "a", "c"]
    assert (best[0].state, best[0].requests, best[0].total) == ("memory", 2.0, 2.0)


def test_at_the_threshold_the_least_loaded_worker_overall_wins_and_takes_a_lease() -> None:
    policy = AffinityPolicy(threshold=4)
    pool = policy.prepare((WARM_A, COLD), SERVICE, MODEL)
    best = policy.rank(pool, in_flight={"a": 4, "c": 1})
    assert [b.worker_id for b in best] == ["c", "a"]
    cold = next(c for c in pool if c.worker_id == "c")
    # 1 request ahead (the default 1 s each), then 4 GB at 2 GB/s.
    load = policy.starts_load(cold, best[0])
    assert load is not None
    assert load[0] == MODEL
    assert load[1] == pytest.approx(1.0 + 2.0)
    warm = next(c for c in pool if c.worker_id == "a")
    assert policy.starts_load(warm, best[1]) is None


def test_a_worker_loading_the_model_counts_as_warm_and_starts_no_second_load() -> None:
    policy = AffinityPolicy(threshold=4)
    leases = {MODEL: {"c": 100.0}}
    pool = policy.prepare((WARM_A, COLD), SERVICE, MODEL, leases=leases)
    best = policy.rank(pool, in_flight={"a": 1})
    assert (best[0].worker_id, best[0].as_dict()["state"]) == ("c", "loading")
    assert policy.starts_load(pool[1], best[0]) is None


def test_past_the_threshold_a_warm_worker_wins_ties_of_load_whatever_the_draw() -> None:
    policy = AffinityPolicy(threshold=2)
    rng = random.Random(7)
    for _ in range(50):
        assert ranked(policy, (COLD, WARM_A), {"a": 3, "c": 3}, rng=rng)[0].worker_id == "a"
    # One request fewer outweighs warmth past the threshold.
    assert ranked(policy, (COLD, WARM_A), {"a": 3, "c": 2}, rng=rng)[0].worker_id == "c"


def test_without_a_model_it_is_least_loaded() -> None:
    best = ranked(AffinityPolicy(), (WARM_A, COLD), {"a": 2}, model=None)
    assert [(b.worker_id, b.state) for b in best] == [("c", "none"), ("a", "none")]


def test_a_workers_total_never_falls_as_it_gains_requests() -> None:
    """The total depends on the worker's own load alone and never falls with it: what a
    router keeping its pools sorted between decisions relies on."""
    policy = AffinityPolicy(threshold=3)
    for worker in ("a", "c"):
        totals = [
            next(
                b.total
                for b in ranked(policy, (WARM_A, COLD), {worker: n})
                if b.worker_id == worker
            )
            for n in range(8)
        ]
        assert totals == sorted(totals), worker
        assert len(set(totals)) == len(totals), worker


def test_a_threshold_under_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        AffinityPolicy(threshold=0)


# ---- the simulator ------------------------------------------------------------------

CATALOG = (ModelSpec("a", GB), ModelSpec("b", 2 * GB), ModelSpec("c", 4 * GB))


def test_with_a_high_threshold_each_model_is_loaded_once() -> None:
    fleet = FleetSpec(workers=3, gpu_workers=3, slots=1)
    trace = [TraceRequest(i * 2.0, 1000, 100, "abc"[i % 3]) for i in range(300)]
    result = run(AffinityPolicy(threshold=100), trace, fleet=fleet, catalog=CATALOG, seed=1)
    assert sum(s.cold_load for s in result.served) == 3


def test_sim_policy_reads_a_threshold_and_refuses_one_elsewhere() -> None:
    policy = sim_policy("affinity:16")
    assert isinstance(policy, AffinityPolicy)
    assert policy.threshold == 16
    assert isinstance(sim_policy("affinity"), AffinityPolicy)
    for bad in ("cost:3", "affinity:0", "affinity:x"):
        with pytest.raises(ConfigError, match="only affinity takes a threshold"):
            sim_policy(bad)


def _row(policy: str, p99: float, cold: float, *, default: bool = False) -> Row:
    mean = {"p99_s": p99, "cold_loads": cold, "imbalance": 1.1}
    return Row(policy, default, mean, dict.fromkeys(mean, 0.0), 1)


def test_the_verdict_compares_with_the_affinity_row_of_lowest_p99() -> None:
    rows = [
        _row("p2c", 900.0, 500.0),
        _row("affinity", 400.0, 12.0),
        _row("affinity:64", 100.0, 20.0),
        _row("cost", 40.0, 25.0, default=True),
    ]
    assert best_affinity(rows) == rows[2]
    lines = verdict(rows)
    assert "p99 vs affinity:64 (best of the affinity rows): 0.400x (target <= 0.5)" in lines
    assert "cold loads vs affinity:64: 1.250x (target <= 1.5)" in lines


def test_affinity_thresholds_add_rows_beside_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.csv"
    lines = ["timestamp,ContextTokens,GeneratedTokens"]
    trace.write_text("\n".join([*lines, *(f"{i * 0.5},{400 + i},30" for i in range(80))]) + "\n")
    argv = ("--trace", str(trace), "--repeats", "1", "--no-plot", "--processes", "1")
    options = ("--policies", "p2c,affinity,cost", "--affinity-thresholds", "2,8,2")
    assert run_command(_args(*argv, "--json", *options), "cost") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in rows] == ["p2c", "affinity", "cost", "affinity:2", "affinity:8"]
    assert all(r["requests"] == 80 for r in rows)
    with pytest.raises(ConfigError, match="--affinity-thresholds"):
        run_command(_args(*argv, "--affinity-thresholds", "0"), "cost")
