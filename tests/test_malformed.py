"""Malformed input, property-tested: registry entries, raw heartbeats and API bodies.

Whatever is stored under a heartbeat key, the registry skips what does not parse and the
router routes to the valid workers only; the heartbeat parser answers a Heartbeat or a
HeartbeatError and nothing else; the HTTP API answers a client error with a JSON ``detail``.
The tests at the end pin the inputs these properties once found breaking things (non-UTF-8
entries, counts beyond float range, bodies FastAPI's own 422 handler could not render).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, event, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from coordinator.broadcast.job_types import JOB_TYPES, job_type
from coordinator.core.errors import HeartbeatError, JobError
from coordinator.core.heartbeat import (
    MAX_HEARTBEAT_BYTES,
    TIER_BY_NAME,
    Heartbeat,
    is_eligible,
    parse_heartbeat,
)
from coordinator.dispatch.app import fleet_of
from coordinator.dispatch.route import Route
from coordinator.fleet.registry import Registry
from coordinator.ops.api import BroadcastRequest, create_api

GENERATE: Final = "worker_tasks.generate"
BROADCAST: Final = "/api/coordinator/broadcast-job"
PARSE_ERROR: Final = "There was an error parsing the body"
"""FastAPI's own 400 detail for a JSON body it cannot decode (see the test at the end)."""

FAST = hyp_settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
MANY = hyp_settings(FAST, max_examples=200)

STATUSES: Final = ("healthy", "degraded", "unhealthy", "draining")
# The names on the wire: the JSON keeps the design's names where code says them otherwise.
FIELDS: Final = tuple(f.alias or name for name, f in Heartbeat.model_fields.items())
NUMERIC_FIELDS: Final = ("current_load", "gpu_utilization", "active_requests", "tier", "timestamp")

# The valid worker beside the malformed entries: eligible for vllm, but scoring so low that
# any accepted "attractive" entry below would win the route instead.
GOOD: Final = Heartbeat(worker_id="good", tier=2, capabilities=("vllm",), current_load=0.5)


def attractive(worker_id: Any) -> dict[str, Any]:
    """A heartbeat that beats GOOD for ``generate`` on llama3.2 by far, were it accepted."""
    return {
        "worker_id": worker_id,
        "status": "healthy",
        "tier": 1,
        "capabilities": ["vllm"],
        "services_status": {"vllm": "healthy"},
        "loaded_models": ["llama3.2"],
        "specialization": "vllm",
        "current_load": 0.0,
        "active_requests": 0,
        "timestamp": 1_700_000_000.0,
    }


def to_json(value: Any, ensure_ascii: bool = True) -> str:
    """JSON text as a Python worker's json.dumps writes it (NaN and Infinity included).
    Lone surrogates stay escaped: unescaped they are not text Redis or HTTP can carry."""
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    try:
        text.encode()
    except UnicodeEncodeError:
        text = json.dumps(value)
    return text


def with_literal(payload: dict[str, Any], name: str, literal: str) -> str:
    """``payload`` as JSON with field ``name`` written as the raw JSON text ``literal``."""
    marker = "\x00placeholder\x00"
    return to_json({**payload, name: marker}).replace(json.dumps(marker), literal)


# -- value strategies ----------------------------------------------------------------------

# Redis values and HTTP bodies are bytes: text that cannot be encoded never reaches them.
TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
ANY_TEXT = st.text(max_size=12)
VALID_IDS = st.from_regex(r"[A-Za-z0-9_.@:-]{1,24}", fullmatch=True)
OTHER_IDS = (VALID_IDS | st.text(st.characters(codec="utf-8"), min_size=1)).filter(
    lambda wid: wid != "good"
)


def json_values(
    text: st.SearchStrategy[str], *, finite: bool, huge: bool = False
) -> st.SearchStrategy[Any]:
    """Arbitrary JSON documents; ``finite=False`` adds NaN and +-Infinity."""
    integers = st.integers(-(10**400), 10**400) if huge else st.integers(-(10**30), 10**30)
    floats = st.floats(allow_nan=not finite, allow_infinity=not finite)
    scalars = st.none() | st.booleans() | integers | floats | text
    return st.recursive(
        scalars,
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(text, kids, max_size=4),
        max_leaves=12,
    )


STORED_JSON = json_values(ANY_TEXT, finite=False)  # surrogates end up escaped by to_json
PARSER_JSON = json_values(ANY_TEXT, finite=False, huge=True)
API_JSON = json_values(TEXT, finite=True)

FINITE = st.floats(allow_nan=False, allow_infinity=False)
NEGATIVE = st.floats(max_value=-1e-300, allow_infinity=False) | st.integers(max_value=-1)
LISTS = st.lists(st.integers(), min_size=0, max_size=2)
DICTS = st.dictionaries(TEXT, st.integers(), max_size=2)
NON_STR = st.booleans() | st.integers() | FINITE | LISTS | DICTS  # null excluded: it may be valid
NON_NUMBER = st.booleans() | TEXT | LISTS | DICTS  # strict numbers take no bool or string
BAD_NAME = st.sampled_from(["", "x" * 257])
BAD_NAME_ITEM = st.none() | NON_STR | BAD_NAME


def bad_names(max_items: int) -> st.SearchStrategy[Any]:
    """Anything but a list of at most ``max_items`` names of 1-256 characters."""
    return (
        st.none()
        | st.booleans()
        | st.integers()
        | FINITE
        | TEXT
        | DICTS
        | st.builds(
            lambda ok, bad: [*ok, *bad],
            st.lists(st.sampled_from(["llama3.2", "vllm"]), max_size=2),
            st.lists(BAD_NAME_ITEM, min_size=1, max_size=2),
        )
        | st.just(["m"] * (max_items + 1))
    )


BAD_SERVICE_STATUS = NON_STR | st.none() | TEXT.filter(lambda s: s not in ("healthy", "unhealthy"))

INVALID: Final[dict[str, st.SearchStrategy[Any]]] = {
    "worker_id": st.none()
    | NON_STR
    | st.sampled_from(["", "has space", "x" * 129, "caf\u00e9", "a/b"]),
    "status": st.none() | NON_STR | TEXT.filter(lambda s: s not in STATUSES),
    "current_load": st.none()
    | NON_NUMBER
    | NEGATIVE
    | st.floats(min_value=1.0, exclude_min=True, allow_infinity=False)
    | st.integers(min_value=2),
    "gpu_utilization": NON_NUMBER
    | NEGATIVE
    | st.floats(min_value=100.0, exclude_min=True, allow_infinity=False)
    | st.integers(min_value=101),
    "active_requests": st.none() | NON_NUMBER | FINITE | st.integers(max_value=-1),
    "available_memory": NON_STR,
    "loaded_models": bad_names(1024),
    "models_in_memory": bad_names(1024),
    "specialization": NON_STR | BAD_NAME,
    "services_status": st.none()
    | st.booleans()
    | st.integers()
    | FINITE
    | TEXT
    | LISTS
    | st.dictionaries(TEXT.filter(bool), BAD_SERVICE_STATUS, min_size=1, max_size=2)
    | st.just({"": "healthy"})
    | st.just({f"s{i}": "healthy" for i in range(65)}),
    "service_errors": st.none()
    | st.booleans()
    | TEXT
    | LISTS
    | st.dictionaries(st.just("vllm"), NON_STR, min_size=1)
    | st.just({"": "down"})
    | st.just({f"s{i}": "down" for i in range(65)}),
    "server_load": st.none()
    | st.booleans()
    | TEXT
    | LISTS
    | st.dictionaries(
        st.just("vllm"),
        st.fixed_dictionaries({"waiting": NON_NUMBER | NEGATIVE | st.just(1.5)})
        | st.fixed_dictionaries({"kv_cache_usage": NON_NUMBER | NEGATIVE | st.just(1.01)})
        | NON_NUMBER,
        min_size=1,
    ),
    "tier": st.booleans()
    | st.integers().filter(lambda n: not 1 <= n <= 3)
    | FINITE
    | TEXT.filter(lambda s: s.lower() not in TIER_BY_NAME)
    | LISTS
    | DICTS,
    "capabilities": bad_names(64),
    "queue": NON_STR | BAD_NAME,
    "timestamp": NON_NUMBER | NEGATIVE,
    "model_bytes": st.none()
    | st.booleans()
    | st.integers()
    | TEXT
    | LISTS
    | st.dictionaries(
        st.just("m"),
        NON_NUMBER | NEGATIVE | st.just(1.5) | st.integers(min_value=2**50 + 1),
        min_size=1,
    )
    | st.just({"": 1}),
    "service_s": st.none()
    | st.booleans()
    | FINITE
    | TEXT
    | LISTS
    | st.dictionaries(
        st.just("m"),
        NON_NUMBER | NEGATIVE | st.floats(min_value=86_400.5, allow_infinity=False),
        min_size=1,
    ),
    "mean_service_s": NON_NUMBER | NEGATIVE | st.integers(min_value=86_401),
    "model_slots": NON_NUMBER | st.just(1.5) | st.integers(max_value=0) | st.integers(1025),
    "would_evict": NON_STR | BAD_NAME,
    "load_bps": NON_NUMBER | NEGATIVE | st.just(0),
    "download_bps": NON_NUMBER | NEGATIVE | st.just(0.0),
    "interval_s": NON_NUMBER | NEGATIVE | st.just(0.0) | st.just(3600.5),
    "ttl_s": NON_NUMBER | NEGATIVE | st.just(0) | st.just(86_401.0),
    "incarnation": NON_STR | BAD_NAME,
    "started_at": NON_NUMBER | NEGATIVE,
    "host": NON_STR | BAD_NAME,
    "pid": NON_NUMBER | st.just(0) | st.just(1.5) | st.integers(min_value=2**31 + 1),
}
assert set(INVALID) == set(FIELDS)

VALID: Final[dict[str, st.SearchStrategy[Any]]] = {
    "worker_id": st.just("w1") | VALID_IDS,
    "status": st.sampled_from(STATUSES),
    "current_load": st.floats(0.0, 1.0) | st.sampled_from([0, 1]),
    "gpu_utilization": st.none() | st.floats(0.0, 100.0) | st.integers(0, 100),
    "active_requests": st.integers(0, 10**400),
    "available_memory": st.none() | TEXT,
    "loaded_models": st.lists(st.text(min_size=1, max_size=20), max_size=4),
    "models_in_memory": st.lists(st.text(min_size=1, max_size=20), max_size=4),
    "specialization": st.none() | st.text(min_size=1, max_size=20),
    "services_status": st.dictionaries(
        st.text(min_size=1, max_size=12), st.sampled_from(["healthy", "unhealthy"]), max_size=3
    ),
    "service_errors": st.dictionaries(st.text(min_size=1, max_size=12), TEXT, max_size=3),
    "server_load": st.dictionaries(
        st.sampled_from(["vllm", "embeddings"]),
        st.fixed_dictionaries(
            {"waiting": st.integers(0, 1000), "running": st.integers(0, 1000)},
            optional={"kv_cache_usage": st.floats(0.0, 1.0)},
        ),
        max_size=2,
    ),
    "tier": st.none() | st.sampled_from([1, 2, 3, "gpu", "CPU", "Storage"]),
    "capabilities": st.lists(st.text(min_size=1, max_size=12), max_size=4),
    "queue": st.none() | st.text(min_size=1, max_size=20),
    "timestamp": st.none() | st.floats(min_value=0.0, allow_infinity=False) | st.integers(0),
    "model_bytes": st.dictionaries(
        st.text(min_size=1, max_size=20), st.integers(0, 2**50), max_size=3
    ),
    "service_s": st.dictionaries(
        st.text(min_size=1, max_size=20),
        st.floats(0.0, 86_400.0) | st.integers(0, 86_400),
        max_size=3,
    ),
    "mean_service_s": st.none() | st.floats(0.0, 86_400.0),
    "model_slots": st.none() | st.integers(1, 1024),
    "would_evict": st.none() | st.text(min_size=1, max_size=20),
    "load_bps": st.none() | st.floats(1e-3, 1e12) | st.integers(1, 10**12),
    "download_bps": st.none() | st.floats(1e-3, 1e12) | st.integers(1, 10**12),
    "interval_s": st.none() | st.floats(1e-3, 3600.0) | st.integers(1, 3600),
    "ttl_s": st.none() | st.floats(1e-3, 86_400.0),
    "incarnation": st.none() | st.text(min_size=1, max_size=32),
    "started_at": st.none() | st.floats(min_value=0.0, allow_infinity=False),
    "host": st.none() | st.text(min_size=1, max_size=32),
    "pid": st.none() | st.integers(1, 2**31),
}
assert set(VALID) == set(FIELDS)


# -- malformed registry entries: (worker id of the key, stored value) ---------------------

Entry = tuple[str, str | bytes]


@st.composite
def wrong_types(draw: st.DrawFn) -> Entry:
    """An attractive heartbeat with one to three fields of the wrong type or out of range."""
    wid = draw(VALID_IDS.filter(lambda w: w != "good"))
    names = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True))
    payload = attractive(wid)
    for name in names:
        payload[name] = draw(INVALID[name], label=name)
    return wid, to_json(payload, draw(st.booleans()))


@st.composite
def negative_numbers(draw: st.DrawFn) -> Entry:
    wid = draw(VALID_IDS.filter(lambda w: w != "good"))
    name = draw(st.sampled_from(NUMERIC_FIELDS))
    return wid, to_json({**attractive(wid), name: draw(NEGATIVE)})


@st.composite
def non_finite_numbers(draw: st.DrawFn) -> Entry:
    """NaN, +-Infinity and overflowing literals where a number belongs."""
    wid = draw(VALID_IDS.filter(lambda w: w != "good"))
    name = draw(st.sampled_from(NUMERIC_FIELDS))
    literal = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1E999"]))
    return wid, with_literal(attractive(wid), name, literal)


@st.composite
def oversized(draw: st.DrawFn) -> Entry:
    """An otherwise attractive heartbeat just over MAX_HEARTBEAT_BYTES (in UTF-8 bytes)."""
    wid = draw(VALID_IDS.filter(lambda w: w != "good"))
    pad = draw(st.sampled_from(["x", "\u00e9", "\u20ac", "\U0001f600"]))
    where = draw(st.sampled_from(["pad", "available_memory"]))
    excess = draw(st.integers(1, 512))
    base = len(json.dumps({**attractive(wid), where: ""}, ensure_ascii=False).encode())
    count = math.ceil((MAX_HEARTBEAT_BYTES + excess - base) / len(pad.encode()))
    raw = json.dumps({**attractive(wid), where: pad * count}, ensure_ascii=False)
    assert len(raw.encode()) > MAX_HEARTBEAT_BYTES
    return wid, raw.encode() if draw(st.booleans()) else raw


@st.composite
def deeply_nested(draw: st.DrawFn) -> Entry:
    """Arrays (or objects) nested up to the size limit, bare or where names belong."""
    wid = draw(VALID_IDS.filter(lambda w: w != "good"))
    # Two at least: "[]" where names belong is a valid (empty) list.
    depth = draw(st.integers(2, (MAX_HEARTBEAT_BYTES - 400) // 2))
    arrays = "[" * depth + "]" * depth
    shape = draw(st.sampled_from(["bare", "unclosed", "objects", "capabilities", "loaded_models"]))
    if shape == "bare":
        return wid, arrays
    if shape == "unclosed":
        return wid, "[" * depth
    if shape == "objects":
        depth //= 3
        return wid, '{"a":' * depth + "1" + "}" * depth
    return wid, with_literal(attractive(wid), shape, arrays)


@st.composite
def claiming_another_id(draw: st.DrawFn) -> Entry:
    """A valid, attractive heartbeat stored under another worker's key."""
    wid = draw(VALID_IDS.filter(lambda w: w != "good"))
    other = draw(st.just("good") | st.just(wid.swapcase()) | VALID_IDS)
    if other == wid:
        other = wid + "-impostor"
    return wid, to_json(attractive(other))


ALWAYS_MALFORMED = st.one_of(
    wrong_types(),
    negative_numbers(),
    non_finite_numbers(),
    oversized(),
    deeply_nested(),
    claiming_another_id(),
)

# Any bytes Redis hands back as text: UTF-8 of arbitrary text, and arbitrary bytes read as
# Latin-1 (every byte value, re-encoded). Non-UTF-8 bytes are tested at the end.
ARBITRARY_TEXT_BYTES = st.text(st.characters(codec="utf-8")).map(str.encode) | (
    st.binary().map(lambda b: b.decode("latin-1").encode())
)
HEARTBEAT_LIKE = st.builds(
    lambda fields, wid, keep: {**fields, "worker_id": wid} if keep else fields,
    st.dictionaries(st.sampled_from(FIELDS) | ANY_TEXT, STORED_JSON, max_size=6),
    st.sampled_from(["good", "w1"]) | VALID_IDS,
    st.booleans(),
)


@st.composite
def arbitrary_entries(draw: st.DrawFn) -> Entry:
    """Arbitrary bytes or JSON; some may even be valid heartbeats."""
    wid = draw(OTHER_IDS)
    value = draw(
        ARBITRARY_TEXT_BYTES
        | st.builds(to_json, STORED_JSON, st.booleans())
        | st.builds(to_json, HEARTBEAT_LIKE, st.booleans())
        | st.just(to_json({"worker_id": wid}))
    )
    return wid, value


# -- fixtures ------------------------------------------------------------------------------


@dataclass
class Stage:
    """GOOD plus malformed entries in one namespace, rewritten for every example."""

    registry: Registry
    redis_conn: redis.Redis
    app: Celery
    written: set[str] = field(default_factory=set)

    @property
    def good_route(self) -> Route:
        return Route(self.registry.keys.worker_queue("good"), "good")

    def reset(self) -> None:
        """Delete every key an earlier example wrote, then publish GOOD again."""
        keys = self.registry.keys
        stale = [keys.worker(wid) for wid in self.written]
        self.redis_conn.delete(
            keys.workers,
            keys.known,
            keys.claims("good"),
            keys.decisions,
            keys.leases,
            *stale,
        )
        self.written.clear()
        self.registry.publish(GOOD)
        self.written.add("good")

    def write(self, entries: list[Entry]) -> None:
        for wid, raw in entries:
            self.written.add(wid)
            self.redis_conn.set(self.registry.keys.worker(wid), raw, ex=60)
            self.redis_conn.sadd(self.registry.keys.workers, wid)

    def route(self) -> Route:
        return fleet_of(self.app).router.route(GENERATE, "vllm", "llama3.2")


@pytest.fixture
def stage(registry: Registry, redis_conn: redis.Redis, app: Celery) -> Stage:
    fleet_of(app).router.refresh_s = 0  # every route() reads the registry afresh
    return Stage(registry, redis_conn, app)  # the app fixture's close() writes its claims


@pytest.fixture
def lenient_client(app: Celery) -> Iterator[TestClient]:
    """A client that returns a server error as a 500 answer instead of raising it."""
    with TestClient(create_api(app, token=None), raise_server_exceptions=False) as test_client:
        yield test_client


# -- 1. registry and router ----------------------------------------------------------------


def test_the_harness_would_see_an_accepted_entry(stage: Stage) -> None:
    """Control: a valid attractive entry is returned and wins the route, and so does one
    exactly MAX_HEARTBEAT_BYTES long; the properties below would notice either."""
    stage.reset()
    payload = attractive("rival")
    stage.write([("rival", to_json(payload))])
    assert {hb.worker_id for hb in stage.registry.snapshot().heartbeats} == {"good", "rival"}
    assert stage.route().worker_id == "rival"

    stage.reset()
    base = len(to_json({**payload, "pad": ""}).encode())
    at_limit = to_json({**payload, "pad": "x" * (MAX_HEARTBEAT_BYTES - base)})
    assert len(at_limit.encode()) == MAX_HEARTBEAT_BYTES
    stage.write([("rival", at_limit)])
    assert stage.route().worker_id == "rival"


@MANY
@given(entries=st.lists(ALWAYS_MALFORMED, min_size=1, max_size=3, unique_by=lambda e: e[0]))
def test_malformed_entries_are_skipped_and_never_routed_to(
    stage: Stage, entries: list[Entry]
) -> None:
    stage.reset()
    stage.write(entries)
    assert stage.registry.snapshot().heartbeats == (GOOD,)
    assert stage.route() == stage.good_route


@FAST
@given(entries=st.lists(arbitrary_entries(), min_size=1, max_size=3, unique_by=lambda e: e[0]))
def test_arbitrary_entries_never_break_snapshot_or_route(
    stage: Stage, entries: list[Entry]
) -> None:
    """Arbitrary values: exactly the ones the parser accepts come back, GOOD always."""
    stage.reset()
    stage.write(entries)
    expected = {"good": GOOD}
    for wid, raw in entries:
        text = raw.decode() if isinstance(raw, bytes) else raw
        with contextlib.suppress(HeartbeatError):
            expected[wid] = parse_heartbeat(text, wid)
    event(f"valid entries besides GOOD: {len(expected) - 1}")
    snapshot = stage.registry.snapshot()
    assert {hb.worker_id: hb for hb in snapshot.heartbeats} == expected
    assert len(snapshot.heartbeats) == len(expected)
    eligible = {
        Route(hb.queue or stage.registry.keys.worker_queue(hb.worker_id), hb.worker_id)
        for hb in expected.values()
        if is_eligible(hb, "vllm")
    }
    assert stage.route() in eligible


# -- 2. the parser alone -------------------------------------------------------------------


def check_parse(raw: str | bytes) -> None:
    """A Heartbeat of w1 with every number finite and in range, or a HeartbeatError."""
    result: Heartbeat | HeartbeatError
    try:
        result = parse_heartbeat(raw, "w1")
    except HeartbeatError as exc:
        result = exc
    event(type(result).__name__)
    if isinstance(result, HeartbeatError):
        assert result.worker_id == "w1"
        assert str(result).startswith("malformed heartbeat from worker 'w1': ")
        return
    heartbeat = result
    assert heartbeat.worker_id == "w1"
    assert heartbeat.status in STATUSES
    assert math.isfinite(heartbeat.current_load)
    assert 0.0 <= heartbeat.current_load <= 1.0
    if heartbeat.gpu_utilization is not None:
        assert math.isfinite(heartbeat.gpu_utilization)
        assert 0.0 <= heartbeat.gpu_utilization <= 100.0
    assert type(heartbeat.active_requests) is int
    assert heartbeat.active_requests >= 0
    assert heartbeat.tier in (None, 1, 2, 3)
    if heartbeat.timestamp is not None:
        assert math.isfinite(heartbeat.timestamp)
        assert heartbeat.timestamp >= 0.0
    for name in (*heartbeat.models_on_disk, *heartbeat.models_in_memory):
        assert name
        assert not name.endswith(":latest")
    again = heartbeat.to_json()
    if len(again.encode()) <= MAX_HEARTBEAT_BYTES:
        assert parse_heartbeat(again, "w1") == heartbeat


@MANY
@given(raw=st.text() | st.binary())
def test_parse_arbitrary_text_and_bytes(raw: str | bytes) -> None:
    check_parse(raw)


@MANY
@given(
    value=PARSER_JSON | HEARTBEAT_LIKE,
    ensure_ascii=st.booleans(),
    as_bytes=st.booleans(),
)
def test_parse_arbitrary_json(value: Any, ensure_ascii: bool, as_bytes: bool) -> None:
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    check_parse(text.encode(errors="surrogatepass") if as_bytes else text)


@st.composite
def mixed_heartbeats(draw: st.DrawFn) -> dict[str, Any]:
    """Heartbeat-shaped objects: each field valid or absent, and up to two broken (of an
    invalid value or arbitrary JSON), so that about half of them parse."""
    broken = draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True))
    out: dict[str, Any] = {"worker_id": draw(st.sampled_from(["w1", "w1", "w2"]))}
    for name in FIELDS:
        if name in broken:
            out[name] = draw(INVALID[name] | PARSER_JSON, label=name)
        elif draw(st.booleans(), label=f"has {name}"):
            out[name] = draw(VALID[name], label=name)
    return out


@MANY
@given(value=mixed_heartbeats(), ensure_ascii=st.booleans(), as_bytes=st.booleans())
def test_parse_heartbeat_shaped_objects(
    value: dict[str, Any], ensure_ascii: bool, as_bytes: bool
) -> None:
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    check_parse(text.encode(errors="surrogatepass") if as_bytes else text)


# -- 3. the API ----------------------------------------------------------------------------

JSON_HEADERS: Final = {"content-type": "application/json"}
NO_WORKER: Final = "no live GPU or CPU worker"
JSON_TYPES: Final = ("application/json", "application/json; charset=utf-8", "application/x+json")
OTHER_TYPES: Final = ("text/plain", "application/octet-stream", None)

JOB_TYPE = st.sampled_from(sorted(JOB_TYPES)) | TEXT | API_JSON
RAG_DATA = st.fixed_dictionaries(
    {
        "documents": st.lists(
            st.fixed_dictionaries({"id": TEXT, "text": TEXT}, optional={"metadata": DICTS}),
            max_size=3,
        ),
        "collection": st.from_regex(r"[a-z0-9][a-z0-9._-]{1,8}[a-z0-9]", fullmatch=True),
    },
    optional={"chunk_size": st.integers(0, 20_000), "chunk_overlap": st.integers(-1, 600)},
)
JOB_DATA: st.SearchStrategy[Any] = (
    st.just({})
    | st.fixed_dictionaries({"model": TEXT}, optional={"keep_alive": TEXT | st.integers()})
    | RAG_DATA
    | st.dictionaries(TEXT, API_JSON, max_size=3)
    | API_JSON
)
VALID_BROADCASTS = st.fixed_dictionaries(
    {"job_type": st.just("ping"), "job_data": st.just({})},
    optional={
        "required_capability": st.none() | st.sampled_from(["vllm", "embeddings", "ocr"]),
        "timeout_s": st.floats(0.0, 3600.0, exclude_min=True) | st.integers(1, 3600),
    },
) | st.fixed_dictionaries(
    {
        "job_type": st.just("warm_model"),
        "job_data": st.fixed_dictionaries({"model": TEXT.filter(bool)}),
    }
)
BROADCAST_OBJECTS = st.builds(
    lambda body, extra: {**body, **extra},
    st.fixed_dictionaries(
        {},
        optional={
            "job_type": JOB_TYPE,
            "job_data": JOB_DATA,
            "required_capability": st.none()
            | st.sampled_from(["vllm", "embeddings", "ocr", "chromadb"])
            | TEXT
            | API_JSON,
            "timeout_s": st.floats(-1.0, 4000.0) | st.integers(-5, 4000) | API_JSON,
        },
    ),
    st.dictionaries(TEXT, API_JSON, max_size=1),
)


def no_worker_expected(body: Any) -> bool:
    """Whether ``body`` is a valid broadcast request whose job data parses."""
    try:
        request = BroadcastRequest.model_validate(body)
        job_type(request.job_type).parse(request.job_data)
    except (ValidationError, JobError):
        return False
    return True


def check_client_error(response: Any) -> Any:
    """A 4xx with a JSON ``detail`` and no traceback; returns the detail."""
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert detail
    return detail


@MANY
@given(body=API_JSON | BROADCAST_OBJECTS | VALID_BROADCASTS)
def test_broadcast_with_arbitrary_json_bodies_is_422(client: TestClient, body: Any) -> None:
    response = client.post(BROADCAST, content=json.dumps(body), headers=JSON_HEADERS)
    detail = check_client_error(response)
    assert response.status_code == 422, response.text
    event(f"422: {'no live worker' if no_worker_expected(body) else type(detail).__name__}")
    if no_worker_expected(body):
        # Any capability the body names: an arbitrary one is valid, and offered by nobody.
        assert detail == NO_WORKER or detail.startswith(f"{NO_WORKER} offers "), detail
    elif isinstance(detail, str):  # the body was a valid request: the job type or data not
        assert detail.startswith(("unknown job type ", "invalid job_data for ")), detail
    else:
        assert detail[0]["loc"][0] == "body"


def splice(document: Any, noise: bytes, at: int) -> bytes:
    """JSON with a few arbitrary bytes spliced into it."""
    raw = to_json(document).encode()
    at %= len(raw) + 1
    return raw[:at] + noise + raw[at:]


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A body and its content type. A JSON type takes any bytes; other types only bytes
    that are valid UTF-8, the others are tested at the end."""
    content_type = draw(st.sampled_from([*JSON_TYPES, *OTHER_TYPES]))
    if content_type in JSON_TYPES:
        body = draw(
            st.binary()
            | st.builds(splice, BROADCAST_OBJECTS, st.binary(max_size=4), st.integers(0))
        )
    else:
        body = draw(ARBITRARY_TEXT_BYTES)
    return body, content_type


def unrenderable(value: Any) -> bool:
    """Whether ``value`` holds NaN, +-Infinity or a lone surrogate: what FastAPI's 422
    handler echoed and then could not render (tested at the end)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, list):
        return any(unrenderable(item) for item in value)
    if isinstance(value, dict):
        return any(unrenderable(k) or unrenderable(v) for k, v in value.items())
    return False


def parsed_by_fastapi(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


@MANY
@given(request=raw_requests())
def test_broadcast_with_raw_bytes_is_a_client_error(
    client: TestClient, request: tuple[bytes, str | None]
) -> None:
    """Never 5xx: 422, or FastAPI's 400 for JSON it cannot decode (see the end)."""
    body, content_type = request
    # Unrenderable input has its own test at the end.
    assume(content_type not in JSON_TYPES or not unrenderable(parsed_by_fastapi(body)))
    headers = {"content-type": content_type} if content_type else {}
    response = client.post(BROADCAST, content=body, headers=headers)
    detail = check_client_error(response)
    assert response.status_code in (400, 422), response.text
    event(f"{response.status_code}")
    if response.status_code == 400:
        assert detail == PARSE_ERROR


@FAST
@given(
    limit=TEXT
    | st.integers(-(10**6), 10**6).map(str)
    | st.from_regex(r"\s*[+-]?[0-9_]{1,5}(\.0*)?\s*", fullmatch=True)
)
def test_decisions_with_arbitrary_limits(client: TestClient, limit: str) -> None:
    response = client.get("/api/admin/decisions", params={"limit": limit})
    assert response.status_code in (200, 422), response.text
    if response.status_code == 200:
        assert response.json() == {"decisions": []}
    else:
        assert response.json()["detail"][0]["loc"] == ["query", "limit"]
    if re.fullmatch(r"-?[0-9]+", limit):
        assert (response.status_code == 200) == (1 <= int(limit) <= 1000)


# -- inputs that once broke things ---------------------------------------------------------

# A worker that writes its JSON as Latin-1: valid JSON, invalid UTF-8.
LATIN1: Final = json.dumps({**attractive("bad"), "specialization": "caf\u00e9"}, ensure_ascii=False)
NON_UTF8: Final = [b"\xff", b"\x80", LATIN1.encode("latin-1")]


@pytest.mark.parametrize("raw", NON_UTF8, ids=["ff", "80", "latin-1-json"])
def test_non_utf8_heartbeat_bytes_are_skipped_by_snapshot(stage: Stage, raw: bytes) -> None:
    stage.reset()
    stage.write([("bad", raw)])
    heartbeats = stage.registry.snapshot().heartbeats
    # A fix may skip the Latin-1 heartbeat or read it leniently; GOOD stays either way.
    assert GOOD in heartbeats
    assert {hb.worker_id for hb in heartbeats} <= {"good", "bad"}


@pytest.mark.parametrize("raw", NON_UTF8, ids=["ff", "80", "latin-1-json"])
def test_non_utf8_heartbeat_bytes_do_not_break_route(stage: Stage, raw: bytes) -> None:
    stage.reset()
    stage.write([("bad", raw)])
    assert stage.route().worker_id in ("good", "bad")


OVERFLOWING: Final = 10**400  # a JSON integer no float can hold


def _huge_active_requests(stage: Stage) -> None:
    payload = {**attractive("bad"), "active_requests": OVERFLOWING}
    # The parser accepts it today (a non-negative int), so the router scores it.
    stage.write([("bad", to_json(payload))])


def _claims_of_the_wrong_type(stage: Stage) -> None:
    # Whoever can write to Redis can leave anything under a claims key.
    stage.redis_conn.set(stage.registry.keys.claims("good"), str(OVERFLOWING))


@pytest.mark.parametrize(
    "corrupt", [_huge_active_requests, _claims_of_the_wrong_type], ids=["heartbeat", "claims"]
)
def test_an_active_count_beyond_float_range_does_not_break_route(
    stage: Stage, corrupt: Callable[[Stage], None]
) -> None:
    stage.reset()
    corrupt(stage)
    route = stage.route()
    assert route.worker_id in ("good", "bad")


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"NaN", "application/json"),
        (b'{"job_type": "ping", "job_data": {}, "timeout_s": NaN}', "application/json"),
        (b'{"job_type": "ping", "job_data": {}, "timeout_s": 1e400}', "application/json"),
        (b'{"job_type": -Infinity, "job_data": {}}', "application/json"),
        (b'{"job_type": "\\ud800", "job_data": {}}', "application/json"),
        (b'{"job_type": "ping", "job_data": {}, "\\udfff": 1}', "application/json"),
        (b"\x80", "text/plain"),
        (b"\xff", None),
    ],
)
def test_unrenderable_input_in_a_broadcast_body_is_422_not_500(
    lenient_client: TestClient, body: bytes, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = lenient_client.post(BROADCAST, content=body, headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 2000 + b"]" * 2000,
        b'{"job_type": "ping", "job_data": {}, "timeout_s": ' + b"1" * 5000 + b"}",
        b'{"job_type": "\xff", "job_data": {}}',
    ],
    ids=["deep", "long-integer", "invalid-utf8"],
)
def test_an_undecodable_json_body_is_a_client_error(client: TestClient, body: bytes) -> None:
    """JSON that json.loads cannot decode other than with JSONDecodeError (too deep, an
    integer over 4300 digits, invalid UTF-8) gets FastAPI's 400, never a 5xx."""
    response = client.post(BROADCAST, content=body, headers=JSON_HEADERS)
    check_client_error(response)
    assert response.status_code in (400, 422), response.text
