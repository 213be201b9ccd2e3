"""The routing policies as pure functions, on small hand-made fleets; no Redis.

Every policy is reproducible for a seeded ``rng`` and never picks an ineligible worker;
the cost policy's estimates are checked against the arithmetic they stand for.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from coordinator.core.errors import ConfigError
from coordinator.core.heartbeat import TIER_CPU, Heartbeat
from coordinator.core.score_weights import Weights
from coordinator.routing import (
    POLICIES,
    CostPolicy,
    Estimate,
    Leases,
    LeastLoadedPolicy,
    Policy,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    SeedPolicy,
    make_policy,
)
from coordinator.routing.cost import GB, TIER_SLOWDOWN
from coordinator.routing.decisions import Decision

SERVICE = "vllm"
MODEL = "m"
NOW = 1_700_000_000.0


def hb(worker_id: str, **fields: Any) -> Heartbeat:
    """A healthy worker offering ``vllm``; ``fields`` override anything."""
    return Heartbeat.model_validate({"worker_id": worker_id, "capabilities": [SERVICE], **fields})


INELIGIBLE = (
    hb("draining", status="draining"),
    hb("sick", services_status={SERVICE: "unhealthy"}),
    hb("ocr-only", capabilities=["ocr"]),
)


def winners(
    policy: Policy[Any],
    fleet: tuple[Heartbeat, ...],
    *,
    seed: int,
    draws: int = 1,
    in_flight: dict[str, int] | None = None,
    leases: Leases | None = None,
) -> list[str]:
    """The winners of ``draws`` decisions in a row, with one rng seeded ``seed``."""
    rng = random.Random(seed)
    pool = policy.prepare(fleet, SERVICE, MODEL, leases=leases or {}, now=NOW)
    return [policy.rank(pool, in_flight=in_flight, rng=rng)[0].worker_id for _ in range(draws)]


def estimates(
    fleet: tuple[Heartbeat, ...],
    *,
    in_flight: dict[str, int] | None = None,
    leases: Leases | None = None,
    policy: CostPolicy | None = None,
) -> dict[str, Estimate]:
    """The cost policy's breakdown of every worker, by id, without the random jitter."""
    policy = policy or CostPolicy()
    pool = policy.prepare(fleet, SERVICE, MODEL, leases=leases or {}, now=NOW)
    ranked = policy.rank(pool, in_flight=in_flight)
    assert all(isinstance(b, Estimate) for b in ranked)
    return {b.worker_id: b for b in ranked if isinstance(b, Estimate)}


# -- every policy ---------------------------------------------------------------------------

EQUAL = (hb("a"), hb("b"), hb("c"), *INELIGIBLE)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_picks_only_eligible_workers(name: str) -> None:
    chosen = Counter(winners(make_policy(name), EQUAL, seed=3, draws=60))
    assert set(chosen) <= {"a", "b", "c"}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_is_reproducible_with_a_seeded_rng(name: str) -> None:
    assert winners(make_policy(name), EQUAL, seed=5, draws=20) == winners(
        make_policy(name), EQUAL, seed=5, draws=20
    )


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_breakdown_rows_line_up_with_the_policys_factors(name: str) -> None:
    """The decision log stores rows and names them with ``factors``: they must agree."""
    policy = make_policy(name)
    pool = policy.prepare(EQUAL, SERVICE, MODEL, now=NOW)
    for breakdown in policy.rank(pool):
        row = breakdown.as_row()
        assert len(row) == 1 + len(policy.factors)
        assert row[0] == breakdown.worker_id
        assert row[-1] == breakdown.total
        assert list(breakdown.as_dict()) == ["worker_id", *policy.factors]


def test_make_policy_refuses_an_unknown_name_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"ROUTING_POLICY='fastest'.*cost"):
        make_policy("fastest")


def test_make_policy_gives_seed_its_weights() -> None:
    heavy = Weights(model_loaded=500.0)
    policy = make_policy("seed", heavy)
    assert isinstance(policy, SeedPolicy)
    assert policy.weights == heavy


# -- the baselines --------------------------------------------------------------------------


def test_random_spreads_over_every_eligible_worker() -> None:
    chosen = Counter(winners(RandomPolicy(), EQUAL, seed=1, draws=300))
    assert set(chosen) == {"a", "b", "c"}
    assert min(chosen.values()) > 60  # about 100 each


def test_round_robin_cycles_through_eligible_workers_by_id() -> None:
    fleet = (hb("c"), hb("a"), *INELIGIBLE, hb("b"))
    assert winners(RoundRobinPolicy(), fleet, seed=0, draws=7) == list("abcabca")


def test_least_loaded_picks_the_fewest_requests_counting_in_flight() -> None:
    fleet = (hb("busy", active_requests=3), hb("quiet", active_requests=1), hb("idle"))
    assert winners(LeastLoadedPolicy(), fleet, seed=0) == ["idle"]
    # Tasks routed since the heartbeat count when they exceed what it reported.
    assert winners(LeastLoadedPolicy(), fleet, seed=0, in_flight={"idle": 2}) == ["quiet"]
    assert winners(LeastLoadedPolicy(), fleet, seed=0, in_flight={"quiet": 1}) == ["idle"]


def test_least_loaded_breaks_ties_at_random() -> None:
    chosen = Counter(winners(LeastLoadedPolicy(), EQUAL, seed=2, draws=90))
    assert set(chosen) == {"a", "b", "c"}


def test_power_of_two_choices_never_picks_the_busiest() -> None:
    fleet = tuple(hb(f"w{n}", active_requests=n) for n in range(4))
    policy = PowerOfTwoPolicy()
    pool = policy.prepare(fleet, SERVICE, MODEL)
    rng = random.Random(4)
    chosen: Counter[str] = Counter()
    for _ in range(200):
        first, second = policy.rank(pool, rng=rng)
        assert first.total < second.total  # the less loaded of the two drawn
        chosen[first.worker_id] += 1
    assert set(chosen) == {"w0", "w1", "w2"}  # w3 loses to whichever it is drawn with


# -- cost ------------------------------------------------------------------------------------


def crossover(
    fleet: tuple[Heartbeat, ...], busy: str, rival: str, leases: Leases | None = None
) -> int:
    """The number of requests on ``busy`` from which ``rival`` wins, checking on the way
    that the ranking follows the estimates exactly (no tie is left to the jitter)."""
    for n in range(100):
        got = estimates(fleet, in_flight={busy: n}, leases=leases)
        mine, theirs = got[busy].total, got[rival].total
        assert abs(mine - theirs) > CostPolicy.tie_s, f"a tie at {n} requests"
        chosen = winners(CostPolicy(), fleet, seed=n, in_flight={busy: n}, leases=leases)
        assert chosen == [busy if mine < theirs else rival]
        if mine > theirs:
            return n
    pytest.fail(f"{busy} still wins with 100 requests queued")


def test_a_worker_with_the_model_in_memory_wins_until_its_queue_is_slower() -> None:
    """2 s a request on the warm worker; the idle one must load 11.5 GB from disk first
    (a size that keeps the estimates off a tie)."""
    warm = hb("warm", loaded_models=[MODEL], models_in_memory=[MODEL], service_s={MODEL: 2.0})
    cold = hb("cold", loaded_models=[MODEL], model_bytes={MODEL: 11_500_000_000})
    fleet = (warm, cold)
    idle = estimates(fleet)
    assert (idle["warm"].state, idle["warm"].queue_s, idle["warm"].load_s) == ("memory", 0, 0)
    assert (idle["cold"].state, idle["cold"].load_s, idle["cold"].run_s) == ("disk", 11.5, 2.0)
    fresh_load = idle["cold"].total
    # The warm worker's estimate is at least its queue (n requests of 2 s) and a run; the
    # policy may charge more for what queues behind, never less.
    n = crossover(fleet, "warm", "cold")
    assert n > 0
    assert n <= next(k for k in range(1000) if 2.0 * k + 2.0 > fresh_load)
    assert estimates(fleet, in_flight={"warm": n})["warm"].queue_s == 2.0 * n
    assert estimates(fleet, in_flight={"warm": n})["cold"].total == fresh_load


def test_on_disk_beats_a_download() -> None:
    fleet = (hb("far", tier=1), hb("near", tier=2, loaded_models=[MODEL]))
    got = estimates(fleet)
    assert winners(CostPolicy(), fleet, seed=0) == ["near"]
    assert (got["far"].state, got["near"].state) == ("absent", "disk")
    assert got["far"].download_s > 0.0
    assert got["near"].download_s == 0.0
    assert got["far"].total > got["near"].total


def test_unknown_sizes_and_bandwidths_use_the_defaults() -> None:
    policy = CostPolicy()
    unknown = estimates((hb("disk", loaded_models=[MODEL]), hb("absent")))
    size = policy.default_model_bytes
    assert unknown["disk"].load_s == size / policy.default_load_bps
    assert unknown["absent"].download_s == size / policy.default_download_bps
    assert unknown["disk"].run_s == policy.default_service_s
    # Measured: this worker's bandwidths, and the size any worker reported.
    known = estimates(
        (
            hb("fast", loaded_models=[MODEL], load_bps=4e9),
            hb("fetcher", download_bps=5e8, load_bps=2e9),
            hb("sizer", capabilities=["ocr"], model_bytes={MODEL: 2 * GB}),
        )
    )
    assert known["fast"].load_s == 0.5
    assert (known["fetcher"].download_s, known["fetcher"].load_s) == (4.0, 1.0)


def test_a_lease_holder_wins_while_its_backlog_is_short() -> None:
    """``holder`` is loading the model (in memory in 3 s); ``other`` could start a load of
    its 3.25 GB too (a size that keeps the estimates off a tie)."""
    fleet = (
        hb("holder", loaded_models=[MODEL], model_bytes={MODEL: 3_250_000_000}),
        hb("other", loaded_models=[MODEL]),
    )
    leases = {MODEL: {"holder": NOW + 3.0}}
    got = estimates(fleet, leases=leases)
    assert (got["holder"].state, got["holder"].queue_s, got["holder"].load_s) == ("loading", 3, 0)
    assert (got["other"].state, got["other"].load_s) == ("disk", 3.25)
    # Requests queue behind the load under way while that beats a second load elsewhere,
    # and no longer than until they (1 s each, the default) and a run outlast one.
    n = crossover(fleet, "holder", "other", leases)
    assert n > 0
    fresh_load = got["other"].total
    assert n <= next(k for k in range(100) if max(k * 1.0, 3.0) + 1.0 > fresh_load)


def test_a_lease_rebuilds_its_holders_candidates_alone_as_a_whole_prepare_would() -> None:
    policy = CostPolicy()
    fleet = (
        hb("warm", loaded_models=[MODEL], models_in_memory=[MODEL], mean_service_s=2.0),
        hb("first", loaded_models=[MODEL], tier=2),
        hb("second", loaded_models=[MODEL]),
        hb("absent"),
    )
    before: dict[str, dict[str, float]] = {MODEL: {"first": NOW + 5}}
    pool = policy.prepare(fleet, SERVICE, MODEL, leases=before, now=NOW)
    after = {MODEL: {"first": NOW + 5, "second": NOW + 9}}
    fresh = policy.with_leases(pool, "second", after, NOW)
    whole = policy.prepare(fleet, SERVICE, MODEL, leases=after, now=NOW)
    assert fresh == next(c for c in whole if c.worker_id == "second")
    assert fresh is not None
    assert (fresh.state, fresh.ready_in_s) == ("loading", 9.0)
    # The first copy of a model nobody holds changes whether more are wanted, for every
    # worker: the whole pool is prepared again.
    demand = {MODEL: 0.1}
    cold = policy.prepare(fleet[1:], SERVICE, MODEL, now=NOW, demand=demand)
    assert policy.with_leases(cold, "second", {MODEL: {"second": NOW + 9}}, NOW) is None
    # Any model's pool: a load makes its worker busy whatever the model it is asked for.
    other = policy.prepare(fleet, SERVICE, "other", leases=before, now=NOW)
    busy = policy.with_leases(other, "second", after, NOW)
    assert busy is not None
    assert (busy.state, busy.ready_in_s) == ("absent", 9.0)
    # A lease that ended frees it again.
    freed = policy.with_leases(pool, "first", {MODEL: {"second": NOW + 9}}, NOW)
    assert freed is not None
    assert (freed.state, freed.ready_in_s) == ("disk", 0.0)


def test_only_a_load_that_nobody_holds_yet_starts_a_lease() -> None:
    policy = CostPolicy()
    fleet = (
        hb("warm", loaded_models=[MODEL], models_in_memory=[MODEL]),
        hb("holder", loaded_models=[MODEL]),
        hb("disk", loaded_models=[MODEL]),
        hb("absent"),
    )
    pool = policy.prepare(fleet, SERVICE, MODEL, leases={MODEL: {"holder": NOW + 3}}, now=NOW)
    by_id = {b.worker_id: b for b in policy.rank(pool)}
    loads = {c.worker_id: policy.starts_load(c, by_id[c.worker_id]) for c in pool}
    assert loads["warm"] is None
    assert loads["holder"] is None
    for worker_id in ("disk", "absent"):
        load = loads[worker_id]
        assert load is not None
        estimate = by_id[worker_id]
        assert isinstance(estimate, Estimate)
        # In memory once the download and the load (and whatever is ahead) are done.
        assert load[0] == MODEL
        assert estimate.download_s + estimate.load_s <= load[1] < estimate.total
    # A task without a model loads nothing.
    plain = policy.prepare(fleet, SERVICE, None, now=NOW)
    ranked = {b.worker_id: b for b in policy.rank(plain)}
    assert all(policy.starts_load(c, ranked[c.worker_id]) is None for c in plain)


def test_evicting_the_only_copy_of_a_model_costs_its_reload() -> None:
    """``full`` would evict ``other`` (6 GB) to load the model; nobody else holds it."""
    full = hb(
        "full",
        loaded_models=[MODEL, "other"],
        models_in_memory=["other"],
        would_evict="other",
        model_bytes={"other": 6 * GB},
    )
    spare = hb("spare", loaded_models=[MODEL])
    alone = estimates((full, spare))
    assert alone["full"].evict_s >= 6.0  # at least the reload of 6 GB at 1 GB/s
    assert alone["spare"].evict_s == 0.0
    assert alone["spare"].total < alone["full"].total
    # Another worker keeps "other" in memory: evicting this copy costs nothing.
    keeper = hb("keeper", capabilities=["ocr"], models_in_memory=["other"])
    shared = estimates((full, spare, keeper))
    assert shared["full"].evict_s == 0.0
    assert shared["full"].total == shared["spare"].total


# -- decisions as stored ------------------------------------------------------------------


def stored(policy: str | None, rows: list[list[float | str]]) -> dict[str, Any]:
    decision: dict[str, Any] = {
        "at": NOW,
        "task": "worker_tasks.generate",
        "service": SERVICE,
        "model": MODEL,
        "outcome": "routed",
        "queue": "aiq.worker.a",
        "worker_id": "a",
        "candidates": rows,
    }
    if policy is not None:
        decision["policy"] = policy
    return decision


def test_a_cost_decision_reads_back_named_with_the_state() -> None:
    fleet = (hb("a", loaded_models=[MODEL]), hb("b"))
    policy = CostPolicy()
    ranked = policy.rank(policy.prepare(fleet, SERVICE, MODEL, now=NOW))
    decision = Decision.model_validate(stored("cost", [b.as_row() for b in ranked]))
    assert (decision.policy, decision.unit, decision.unnamed) == ("cost", CostPolicy.unit, None)
    best, second = decision.candidates
    named = zip(CostPolicy.factors, ranked[0].as_row()[1:], strict=True)
    assert best == {"worker_id": "a", **dict(named)}
    assert (best["state"], second["state"]) == ("disk", "absent")
    again = Decision.model_validate_json(decision.model_dump_json())
    assert again.candidates == decision.candidates


def test_a_decision_stored_without_a_policy_is_the_seed_tables() -> None:
    row: list[float | str] = ["a", 100.0, 50.0, 30.0, 10.0, -6.0, 0.0, 0.0, 1.5, 185.5]
    decision = Decision.model_validate(stored(None, [row]))
    assert (decision.policy, decision.unit) == ("seed", SeedPolicy.unit)
    assert decision.candidates[0]["model_loaded"] == 100.0
    assert decision.candidates[0]["total"] == 185.5


@pytest.mark.parametrize(
    ("policy", "row"),
    [("newer", ["a", "x", 1.0, 2.0, 3.5]), ("cost", ["a", 1.0, 3.5])],
    ids=["unknown policy", "rows of another shape"],
)
def test_rows_this_reader_cannot_name_keep_the_worker_and_total(
    policy: str, row: list[float | str]
) -> None:
    decision = Decision.model_validate(stored(policy, [row]))
    assert decision.candidates == [{"worker_id": "a", "total": 3.5}]
    assert decision.unnamed is not None
    assert repr(policy) in decision.unnamed
    again = Decision.model_validate_json(decision.model_dump_json())
    assert (again.candidates, again.unnamed) == (decision.candidates, decision.unnamed)


# -- the design's preferences before anything is measured ------------------------------------


def test_a_gpu_worker_beats_a_cpu_worker_from_the_first_task() -> None:
    fleet = (
        hb("cpu", tier="cpu", models_in_memory=[MODEL], loaded_models=[MODEL]),
        hb("gpu", tier="gpu", specialization=SERVICE, models_in_memory=[MODEL]),
    )
    assert set(winners(CostPolicy(), fleet, seed=1, draws=200)) == {"gpu"}
    parts = estimates(fleet)
    assert parts["cpu"].run_s == pytest.approx(TIER_SLOWDOWN[TIER_CPU] * parts["gpu"].run_s)


def test_specialisation_breaks_ties() -> None:
    fleet = (
        hb("plain", tier="gpu", models_in_memory=[MODEL]),
        hb("special", tier="gpu", specialization=SERVICE, models_in_memory=[MODEL]),
    )
    assert set(winners(CostPolicy(), fleet, seed=2, draws=200)) == {"special"}


def test_measured_times_replace_the_tier_prior() -> None:
    # This CPU worker measured itself faster than the GPU worker did.
    fleet = (
        hb("cpu", tier="cpu", models_in_memory=[MODEL], service_s={MODEL: 0.5}),
        hb("gpu", tier="gpu", models_in_memory=[MODEL], service_s={MODEL: 2.0}),
    )
    assert set(winners(CostPolicy(), fleet, seed=3, draws=50)) == {"cpu"}
    # One that has not measured is priced from the others' times, scaled by its tier.
    grown = (*fleet, hb("new-cpu", tier="cpu", models_in_memory=[MODEL]))
    gpu_scale = (0.5 / TIER_SLOWDOWN[TIER_CPU] + 2.0) / 2
    assert estimates(grown)["new-cpu"].run_s == pytest.approx(gpu_scale * TIER_SLOWDOWN[TIER_CPU])


def test_a_server_busy_with_other_clients_or_with_a_full_kv_cache_is_avoided() -> None:
    idle = hb("idle", models_in_memory=[MODEL])
    for load in ({"waiting": 50}, {"kv_cache_usage": 0.95}):
        busy = hb("busy", models_in_memory=[MODEL], server_load={SERVICE: load})
        assert set(winners(CostPolicy(), (busy, idle), seed=4, draws=50)) == {"idle"}
    # Our own requests queued there are counted once, not again as the server's.
    ours = hb(
        "ours", models_in_memory=[MODEL], active_requests=3, server_load={SERVICE: {"waiting": 3}}
    )
    assert estimates((ours,))["ours"].queue_s == pytest.approx(3 * CostPolicy().default_service_s)
