"""Unit tests of the routing policy (``coordinator.routing.seed``) and model detection.

Everything here is pure: heartbeats are built in memory, no Redis or Celery is involved.
The expected numbers are the design document's "Scoring Factors" table and its two
"Example Scenarios".
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from coordinator.core.heartbeat import TIER_CPU, TIER_GPU, TIER_STORAGE, Heartbeat, is_eligible
from coordinator.core.score_weights import Weights
from coordinator.routing.seed import FACTORS as SCORE_FACTORS
from coordinator.routing.seed import (
    ScoreBreakdown,
    candidates,
    rank_candidates,
    rank_workers,
    score_worker,
    select_best_worker,
)

SERVICES = ("vllm", "ocr", "embeddings")
MODELS = ("llama3.2", "llama-vision", "nomic-embed-text")
FACTORS = SCORE_FACTORS[:-1]  # the points that add up to the total


def hb(worker_id: str = "w", **fields: Any) -> Heartbeat:
    """A heartbeat that earns nothing and loses nothing unless ``fields`` say so."""
    return Heartbeat(worker_id=worker_id, **fields)


def factor_sum(b: ScoreBreakdown) -> float:
    return float(sum(getattr(b, name) for name in FACTORS))


# --- the design's table, one factor at a time -------------------------------------------


def test_a_bare_worker_scores_zero() -> None:
    b = score_worker(hb(), "ocr", "llama-vision")
    assert b.worker_id == "w"
    assert all(getattr(b, name) == 0.0 for name in FACTORS)
    assert b.total == 0.0


@pytest.mark.parametrize(
    ("fields", "service", "model", "factor", "points"),
    [
        # model loaded: +100, only for the required model
        ({"loaded_models": ("llama-vision",)}, "ocr", "llama-vision", "model_loaded", 100.0),
        ({"loaded_models": ("llama3.2",)}, "ocr", "llama-vision", "model_loaded", 0.0),
        ({"loaded_models": ("llama3.2:latest",)}, "vllm", "llama3.2", "model_loaded", 100.0),
        ({"loaded_models": ("llama3.2",)}, "vllm", None, "model_loaded", 0.0),
        # specialization: +50, only for the requested service
        ({"specialization": "ocr"}, "ocr", None, "specialization", 50.0),
        ({"specialization": "vllm"}, "ocr", None, "specialization", 0.0),
        # tier: GPU 30, CPU 20, storage 10, unknown 0
        ({"tier": TIER_GPU}, "ocr", None, "tier", 30.0),
        ({"tier": TIER_CPU}, "ocr", None, "tier", 20.0),
        ({"tier": TIER_STORAGE}, "ocr", None, "tier", 10.0),
        ({"tier": None}, "ocr", None, "tier", 0.0),
        # service health: +10 only when this service is reported "healthy"
        ({"services_status": {"ocr": "healthy"}}, "ocr", None, "service_health", 10.0),
        ({"services_status": {"ocr": "unhealthy"}}, "ocr", None, "service_health", 0.0),
        ({"services_status": {"vllm": "healthy"}}, "ocr", None, "service_health", 0.0),
        # CPU load: -30 per 100%
        ({"current_load": 1.0}, "ocr", None, "cpu_load", -30.0),
        ({"current_load": 0.5}, "ocr", None, "cpu_load", -15.0),
        # active requests: -5 each
        ({"active_requests": 1}, "ocr", None, "active_requests", -5.0),
        ({"active_requests": 4}, "ocr", None, "active_requests", -20.0),
        # GPU utilization: -20 per 100%, GPU tier only
        ({"tier": TIER_GPU, "gpu_utilization": 100.0}, "ocr", None, "gpu_utilization", -20.0),
        ({"tier": TIER_GPU, "gpu_utilization": 50.0}, "ocr", None, "gpu_utilization", -10.0),
        ({"tier": TIER_GPU, "gpu_utilization": None}, "ocr", None, "gpu_utilization", 0.0),
        ({"tier": TIER_CPU, "gpu_utilization": 80.0}, "ocr", None, "gpu_utilization", 0.0),
        ({"tier": TIER_STORAGE, "gpu_utilization": 80.0}, "ocr", None, "gpu_utilization", 0.0),
        ({"tier": None, "gpu_utilization": 80.0}, "ocr", None, "gpu_utilization", 0.0),
    ],
)
def test_each_factor_of_the_table(
    fields: dict[str, Any], service: str, model: str | None, factor: str, points: float
) -> None:
    b = score_worker(hb(**fields), service, model)
    assert getattr(b, factor) == pytest.approx(points)
    others = [name for name in FACTORS if name not in (factor, "tier")]
    assert all(getattr(b, name) == 0.0 for name in others)
    assert b.tiebreak == 0.0  # no rng, no tiebreak
    assert b.total == pytest.approx(factor_sum(b))


def test_gpu_penalty_applies_on_top_of_gpu_tier_points() -> None:
    b = score_worker(hb(tier=TIER_GPU, gpu_utilization=65.3), "vllm", None)
    assert b.tier == 30.0
    assert b.gpu_utilization == pytest.approx(-13.06)
    assert b.total == pytest.approx(30.0 - 13.06)


def test_cpu_worker_reporting_gpu_use_scores_like_one_that_does_not() -> None:
    with_gpu = score_worker(hb(tier=TIER_CPU, gpu_utilization=100.0), "vllm", None)
    without = score_worker(hb(tier=TIER_CPU), "vllm", None)
    assert with_gpu.total == without.total == 20.0


@pytest.mark.parametrize(
    ("reported", "in_flight", "penalty"),
    [(2, 0, -10.0), (2, 1, -10.0), (2, 2, -10.0), (2, 5, -25.0), (0, 3, -15.0)],
)
def test_in_flight_counts_when_larger_than_heartbeat(
    reported: int, in_flight: int, penalty: float
) -> None:
    b = score_worker(hb(active_requests=reported), "ocr", None, in_flight=in_flight)
    assert b.active_requests == penalty
    assert b.total == penalty


def test_in_flight_mapping_is_used_by_ranking() -> None:
    a = hb("a", capabilities=("ocr",))
    b = hb("b", capabilities=("ocr",), active_requests=1)
    # Without in-flight counts "a" is better; five tasks sent to it since its beat flip that.
    assert [r.worker_id for r in rank_workers([a, b], "ocr", None)] == ["a", "b"]
    ranked = rank_workers([a, b], "ocr", None, in_flight={"a": 5})
    assert [r.worker_id for r in ranked] == ["b", "a"]
    assert ranked[1].active_requests == -25.0
    assert select_best_worker([a, b], "ocr", None, in_flight={"a": 5}) == b


# --- the design's example scenarios -----------------------------------------------------


def test_scenario_1_ocr_request_goes_to_the_ocr_specialist() -> None:
    gpu1 = hb(
        "gpu-1",
        loaded_models=("llama-vision",),
        current_load=0.20,
        active_requests=0,
        specialization="ocr",
        tier=TIER_GPU,
        capabilities=("ocr", "vllm"),
    )
    gpu2 = hb(
        "gpu-2",
        loaded_models=("llama3.2",),
        current_load=0.15,
        active_requests=2,
        specialization="vllm",
        tier=TIER_GPU,
        capabilities=("ocr", "vllm"),
    )
    s1 = score_worker(gpu1, "ocr", "llama-vision")
    s2 = score_worker(gpu2, "ocr", "llama-vision")

    assert (s1.model_loaded, s1.specialization, s1.tier) == (100.0, 50.0, 30.0)
    assert s1.cpu_load == pytest.approx(-6.0)
    assert (s1.active_requests, s1.service_health, s1.gpu_utilization) == (0.0, 0.0, 0.0)
    assert s1.total == pytest.approx(174.0)

    assert (s2.model_loaded, s2.specialization, s2.tier) == (0.0, 0.0, 30.0)
    assert s2.cpu_load == pytest.approx(-4.5)
    assert s2.active_requests == -10.0
    assert s2.total == pytest.approx(15.5)

    assert select_best_worker([gpu2, gpu1], "ocr", "llama-vision") == gpu1
    ranked = rank_workers([gpu2, gpu1], "ocr", "llama-vision")
    assert [r.worker_id for r in ranked] == ["gpu-1", "gpu-2"]
    assert [r.total for r in ranked] == [pytest.approx(174.0), pytest.approx(15.5)]


def test_scenario_2_vllm_request_under_load_goes_to_the_less_busy_worker() -> None:
    common: dict[str, Any] = {
        "loaded_models": ("llama3.2",),
        "tier": TIER_GPU,
        "capabilities": ("vllm",),
    }
    gpu1 = hb("gpu-1", current_load=0.90, active_requests=5, **common)
    gpu2 = hb("gpu-2", current_load=0.30, active_requests=1, **common)
    s1 = score_worker(gpu1, "vllm", "llama3.2")
    s2 = score_worker(gpu2, "vllm", "llama3.2")
    assert s1.cpu_load == pytest.approx(-27.0)
    assert s1.active_requests == -25.0
    assert s1.total == pytest.approx(78.0)
    assert s2.cpu_load == pytest.approx(-9.0)
    assert s2.active_requests == -5.0
    assert s2.total == pytest.approx(116.0)
    assert select_best_worker([gpu1, gpu2], "vllm", "llama3.2") == gpu2


# --- random tiebreak --------------------------------------------------------------------


def test_tiebreak_is_in_zero_to_five() -> None:
    worker = hb(tier=TIER_GPU)
    draws = [
        score_worker(worker, "vllm", None, rng=random.Random(seed)).tiebreak for seed in range(500)
    ]
    assert all(0.0 <= d < 5.0 for d in draws)
    assert len(set(draws)) > 400  # really random, not a constant
    assert max(draws) > 4.0
    assert min(draws) < 1.0
    for d, seed in zip(draws, range(500), strict=True):
        total = score_worker(worker, "vllm", None, rng=random.Random(seed)).total
        assert total == pytest.approx(30.0 + d)


def test_tiebreak_uses_its_weight() -> None:
    worker = hb()
    draws = [
        score_worker(worker, "vllm", None, weights=Weights(tiebreak=1.0), rng=random.Random(s))
        for s in range(200)
    ]
    assert all(0.0 <= d.tiebreak < 1.0 for d in draws)
    none = score_worker(worker, "vllm", None, weights=Weights(tiebreak=0.0), rng=random.Random(1))
    assert none.tiebreak == 0.0


def test_same_seed_gives_same_totals() -> None:
    pool = [hb(f"w{i}", capabilities=("ocr",), current_load=i / 10) for i in range(6)]
    first = rank_workers(pool, "ocr", None, rng=random.Random(42))
    again = rank_workers(pool, "ocr", None, rng=random.Random(42))
    other = rank_workers(pool, "ocr", None, rng=random.Random(43))
    assert [(r.worker_id, r.total) for r in first] == [(r.worker_id, r.total) for r in again]
    assert {r.worker_id: r.tiebreak for r in first} != {r.worker_id: r.tiebreak for r in other}
    one = score_worker(pool[0], "ocr", None, rng=random.Random(7))
    assert one == score_worker(pool[0], "ocr", None, rng=random.Random(7))


def test_tiebreak_splits_a_tie_both_ways() -> None:
    twins = [hb("a", capabilities=("ocr",)), hb("b", capabilities=("ocr",))]
    winners = {
        best.worker_id
        for seed in range(100)
        if (best := select_best_worker(twins, "ocr", None, rng=random.Random(seed))) is not None
    }
    assert winners == {"a", "b"}


@pytest.mark.parametrize("gap_load", [0.17, 0.5, 1.0])  # 5.1, 15 and 30 points
def test_tiebreak_never_overturns_a_gap_over_five_points(gap_load: float) -> None:
    better = hb("better", capabilities=("ocr",))
    worse = hb("worse", capabilities=("ocr",), current_load=gap_load)
    gap = score_worker(better, "ocr", None).total - score_worker(worse, "ocr", None).total
    assert gap > 5.0
    for seed in range(1000):
        for order in ([better, worse], [worse, better]):
            best = select_best_worker(order, "ocr", None, rng=random.Random(seed))
            assert best == better, seed


# --- weights ----------------------------------------------------------------------------


def test_custom_weights_change_the_outcome() -> None:
    has_model = hb("has-model", capabilities=("ocr",), loaded_models=("llama-vision",))
    specialist = hb("specialist", capabilities=("ocr",), specialization="ocr")
    pool = [has_model, specialist]
    assert select_best_worker(pool, "ocr", "llama-vision") == has_model
    heavy = Weights(specialization=500.0)
    assert select_best_worker(pool, "ocr", "llama-vision", weights=heavy) == specialist
    assert score_worker(specialist, "ocr", "llama-vision", weights=heavy).specialization == 500.0


def test_custom_tier_weights_prefer_cpu() -> None:
    gpu = hb("gpu", capabilities=("embeddings",), tier=TIER_GPU)
    cpu = hb("cpu", capabilities=("embeddings",), tier=TIER_CPU)
    assert select_best_worker([gpu, cpu], "embeddings", None) == gpu
    flipped = Weights(tier_gpu=0.0)
    assert select_best_worker([gpu, cpu], "embeddings", None, weights=flipped) == cpu


def test_weights_default_to_the_design_table() -> None:
    w = Weights()
    assert (w.model_loaded, w.specialization) == (100.0, 50.0)
    assert (w.tier_points(TIER_GPU), w.tier_points(TIER_CPU)) == (30.0, 20.0)
    assert (w.tier_points(TIER_STORAGE), w.tier_points(None), w.tier_points(7)) == (10.0, 0, 0)
    assert (w.service_healthy, w.cpu_load, w.active_request) == (10.0, 30.0, 5.0)
    assert (w.gpu_utilization, w.tiebreak) == (20.0, 5.0)


def test_weights_reject_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="modle_loaded"):
        Weights.model_validate({"modle_loaded": 120})


def test_weights_reject_negative_tiebreak() -> None:
    with pytest.raises(ValidationError, match="tiebreak"):
        Weights(tiebreak=-1.0)


# --- eligibility ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "eligible"),
    [
        ({"capabilities": ("ocr",)}, True),
        ({"capabilities": ("ocr",), "status": "degraded"}, True),
        ({"capabilities": ("ocr",), "services_status": {"ocr": "healthy"}}, True),
        ({"services_status": {"ocr": "healthy"}}, True),  # capabilities from services
        ({"capabilities": ("vllm",)}, False),
        ({}, False),
        ({"capabilities": ("ocr",), "status": "unhealthy"}, False),
        ({"capabilities": ("ocr",), "status": "draining"}, False),
        ({"capabilities": ("ocr",), "services_status": {"ocr": "unhealthy"}}, False),
        ({"services_status": {"ocr": "unhealthy"}}, False),
        ({"capabilities": ("ocr",), "services_status": {"vllm": "unhealthy"}}, True),
    ],
)
def test_eligibility(fields: dict[str, Any], eligible: bool) -> None:
    # The worker would win on every factor if it were eligible.
    star = hb(
        "star",
        tier=TIER_GPU,
        loaded_models=("llama-vision",),
        specialization="ocr",
        **fields,
    )
    plain = hb("plain", capabilities=("ocr",), tier=TIER_STORAGE, current_load=1.0)
    assert is_eligible(star, "ocr") is eligible
    ranked = [r.worker_id for r in rank_workers([star, plain], "ocr", "llama-vision")]
    assert ranked == (["star", "plain"] if eligible else ["plain"])
    best = select_best_worker([star, plain], "ocr", "llama-vision")
    assert best == (star if eligible else plain)


def test_no_eligible_worker() -> None:
    pool = [
        hb("a", capabilities=("vllm",), loaded_models=("llama-vision",)),
        hb("b", capabilities=("ocr",), status="draining"),
        hb("c", capabilities=("ocr",), status="unhealthy"),
        hb("d", capabilities=("ocr",), services_status={"ocr": "unhealthy"}),
    ]
    assert select_best_worker(pool, "ocr", "llama-vision") is None
    assert rank_workers(pool, "ocr", "llama-vision") == []
    assert select_best_worker([], "ocr", None, rng=random.Random(1)) is None
    assert rank_workers([], "ocr", None) == []


# --- ranking and breakdowns -------------------------------------------------------------


def _pool() -> list[Heartbeat]:
    # Several exact ties (same load) to check that limited and full rankings agree on them.
    return [
        hb(
            f"w{i}",
            capabilities=("vllm",),
            tier=(TIER_GPU, TIER_CPU, TIER_STORAGE)[i % 3],
            current_load=(i % 4) / 4,
            active_requests=i % 3,
            loaded_models=("llama3.2",) if i % 2 else (),
            gpu_utilization=float(i * 7 % 100),
        )
        for i in range(12)
    ]


@pytest.mark.parametrize("seed", [None, 0, 1, 99])
@pytest.mark.parametrize("limit", [0, 1, 2, 5, 12, 20])
def test_limited_ranking_is_a_prefix_of_the_full_one(seed: int | None, limit: int) -> None:
    pool = candidates(_pool(), "vllm", "llama3.2")
    flight = {"w3": 4, "w8": 1}

    def rng() -> random.Random | None:
        return random.Random(seed) if seed is not None else None

    full = rank_candidates(pool, in_flight=flight, rng=rng())
    some = rank_candidates(pool, in_flight=flight, rng=rng(), limit=limit)
    assert len(full) == 12
    assert some == full[:limit]
    totals = [r.total for r in full]
    assert totals == sorted(totals, reverse=True)


def test_breakdown_total_is_the_sum_of_its_factors() -> None:
    for seed in range(20):
        for b in rank_workers(_pool(), "vllm", "llama3.2", rng=random.Random(seed)):
            assert b.total == pytest.approx(factor_sum(b))
    rich = hb(
        "rich",
        tier=TIER_GPU,
        loaded_models=("llama3.2",),
        specialization="vllm",
        services_status={"vllm": "healthy"},
        current_load=0.42,
        gpu_utilization=65.3,
        active_requests=2,
    )
    b = score_worker(rich, "vllm", "llama3.2", in_flight=3, rng=random.Random(5))
    assert all(getattr(b, name) != 0.0 for name in FACTORS)
    assert b.total == pytest.approx(factor_sum(b))


def test_breakdown_as_dict_is_json() -> None:
    rich = hb("rich", tier=TIER_GPU, current_load=1 / 3, gpu_utilization=12.3456)
    b = score_worker(rich, "vllm", None, rng=random.Random(3))
    d = b.as_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {"worker_id", "total", *FACTORS}
    assert d["worker_id"] == "rich"
    assert d["cpu_load"] == -10.0
    assert d["total"] == round(b.total, 3)


# --- property: the winner is an eligible worker with the best total ----------------------


@st.composite
def heartbeats(draw: st.DrawFn) -> list[Heartbeat]:
    n = draw(st.integers(min_value=0, max_value=8))
    beats = []
    for i in range(n):
        beats.append(
            Heartbeat(
                worker_id=f"w{i}",
                status=draw(st.sampled_from(["healthy", "degraded", "unhealthy", "draining"])),
                current_load=draw(st.floats(min_value=0.0, max_value=1.0)),
                gpu_utilization=draw(st.none() | st.floats(min_value=0.0, max_value=100.0)),
                active_requests=draw(st.integers(min_value=0, max_value=50)),
                loaded_models=tuple(draw(st.lists(st.sampled_from(MODELS), max_size=3))),
                specialization=draw(st.none() | st.sampled_from(SERVICES)),
                services_status=draw(
                    st.dictionaries(
                        st.sampled_from(SERVICES), st.sampled_from(["healthy", "unhealthy"])
                    )
                ),
                tier=draw(st.sampled_from([None, TIER_GPU, TIER_CPU, TIER_STORAGE])),
                capabilities=tuple(draw(st.lists(st.sampled_from(SERVICES), max_size=3))),
            )
        )
    return beats


@hyp_settings(database=None)
@given(
    beats=heartbeats(),
    service=st.sampled_from(SERVICES),
    model=st.none() | st.sampled_from(MODELS),
    flight=st.dictionaries(
        st.sampled_from([f"w{i}" for i in range(8)]), st.integers(min_value=0, max_value=20)
    ),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_selected_worker_is_eligible_and_has_the_best_total(
    beats: list[Heartbeat],
    service: str,
    model: str | None,
    flight: dict[str, int],
    seed: int,
) -> None:
    eligible = [b for b in beats if is_eligible(b, service)]
    best = select_best_worker(beats, service, model, in_flight=flight)
    if not eligible:
        assert best is None
        assert rank_workers(beats, service, model, rng=random.Random(seed)) == []
        return
    assert best is not None
    assert best in eligible
    totals = [
        score_worker(b, service, model, in_flight=flight.get(b.worker_id, 0)) for b in eligible
    ]
    chosen = score_worker(best, service, model, in_flight=flight.get(best.worker_id, 0))
    assert chosen.total == max(t.total for t in totals)

    # With a tiebreak, the cheap top-1 path agrees with the full ranking.
    picked = select_best_worker(beats, service, model, in_flight=flight, rng=random.Random(seed))
    ranked = rank_workers(beats, service, model, in_flight=flight, rng=random.Random(seed))
    assert picked is not None
    assert picked.worker_id == ranked[0].worker_id
    assert {r.worker_id for r in ranked} == {b.worker_id for b in eligible}
