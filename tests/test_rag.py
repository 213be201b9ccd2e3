"""Unit tests of chunking (``coordinator.broadcast.rag``) and the pure parts of broadcasting
(``coordinator.broadcast.client``): choosing the recipients and gathering their answers.

Everything here is pure: no Redis, Celery worker or ChromaDB server is involved.

The chunking properties locate every chunk in the original text. To make that position
exact, the generated texts are built from words whose characters are all distinct (each
character occurs once in the text), so ``text.index(chunk)`` cannot find a wrong copy.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from coordinator.broadcast.client import (
    STATUS_CODES,
    BroadcastResult,
    OutcomeStatus,
    WorkerOutcome,
    gather,
    select_recipients,
)
from coordinator.broadcast.job_types import job_type
from coordinator.broadcast.rag import Chunk, chunk_document, chunk_id, chunk_text
from coordinator.core.heartbeat import TIER_CPU, TIER_GPU, TIER_STORAGE, Heartbeat

FIRST_CHAR = 0x4E00  # CJK ideographs: ~20,000 non-whitespace characters to draw from


def unique_words(lengths: list[int], separators: list[str] | None = None) -> str:
    """Words of the given lengths, no character used twice, joined by ``separators``
    (single spaces when ``None``)."""
    words: list[str] = []
    code = FIRST_CHAR
    for length in lengths:
        words.append("".join(chr(code + i) for i in range(length)))
        code += length
    if separators is None:
        return " ".join(words)
    joined = words[:1]
    for word, sep in zip(words[1:], separators, strict=False):
        joined += [sep, word]
    return "".join(joined)


def spans(text: str, chunks: list[str]) -> list[tuple[int, int]]:
    """Where each chunk lies in ``text``: ``(start, end)``; exact for :func:`unique_words`."""
    found = []
    for chunk in chunks:
        start = text.index(chunk)
        found.append((start, start + len(chunk)))
    return found


@st.composite
def sizes(draw: st.DrawFn) -> tuple[int, int]:
    """A chunk size and an overlap below it."""
    size = draw(st.integers(min_value=1, max_value=48))
    return size, draw(st.integers(min_value=0, max_value=size - 1))


word_lengths = st.lists(st.integers(min_value=1, max_value=14), max_size=40)
whitespace = st.text(alphabet=" \n\t\r", min_size=1, max_size=4)


# --- chunk_text: examples -----------------------------------------------------------------


def test_chunk_text_example_with_overlap() -> None:
    text = "the quick brown fox jumps over the lazy dog"
    assert chunk_text(text, 16, 4) == [
        "the quick brown",
        "rown fox jumps",
        "umps over the",
        "the lazy dog",
    ]
    assert chunk_text(text, 16, 0) == ["the quick brown", "fox jumps over", "the lazy dog"]


def test_short_text_is_one_stripped_chunk() -> None:
    assert chunk_text("  padded words here \n", 100, 10) == ["padded words here"]
    assert chunk_text("exactly16chars!!", 16, 4) == ["exactly16chars!!"]


def test_a_word_longer_than_the_window_is_cut() -> None:
    assert chunk_text("x" * 25, 10, 0) == ["x" * 10, "x" * 10, "x" * 5]
    assert chunk_text("x" * 25, 10, 3) == ["x" * 10, "x" * 10, "x" * 10, "x" * 4]


def test_words_are_not_cut_when_the_window_has_a_space_in_its_second_half() -> None:
    # size 12: the first window is [0, 12) and its second half [6, 12).
    assert chunk_text("aaaaaa bbbbbbbbbb", 12, 0) == ["aaaaaa", "bbbbbbbbbb"]  # space at 6
    assert chunk_text("aaaaaaaa bbbbbbbbbb", 12, 0) == ["aaaaaaaa", "bbbbbbbbbb"]  # at 8
    # The only space is in the first half (at 4): the window is cut at its full size.
    assert chunk_text("aaaa bbbbbbbbbbbb", 12, 0) == ["aaaa bbbbbbb", "bbbbb"]


@pytest.mark.parametrize("text", ["", " ", "   ", "\n", "\t \r\n  \t"])
def test_blank_text_gives_no_chunks(text: str) -> None:
    assert chunk_text(text, 16, 4) == []
    assert chunk_document("doc", text, 16, 4) == []


@pytest.mark.parametrize(("size", "overlap"), [(16, 16), (16, 17), (1, 1), (512, 512)])
def test_overlap_not_below_size_is_refused(size: int, overlap: int) -> None:
    with pytest.raises(ValueError, match=rf"overlap={overlap}.*size={size}"):
        chunk_text("some words to chunk", size, overlap)
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("", size, overlap)  # refused before looking at the text


def test_words_separated_by_newlines_are_not_cut() -> None:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf"]
    chunks = chunk_text("\n".join(words), 16, 0)
    assert [word for chunk in chunks for word in chunk.split()] == words


@pytest.mark.parametrize(("size", "overlap"), [(16, 8), (16, 12), (20, 15), (512, 400)])
def test_every_chunk_reaches_past_the_previous_one_with_a_large_overlap(
    size: int, overlap: int
) -> None:
    long_word = size - overlap + size // 4
    text = unique_words([size // 4, long_word] * 6)
    chunks = chunk_text(text, size, overlap)
    found = spans(text, chunks)
    for (start, end), (next_start, next_end) in itertools.pairwise(found):
        assert next_start > start
        assert next_end > end


# --- chunk_text: properties ---------------------------------------------------------------


@hyp_settings(database=None)
@given(lengths=word_lengths, size_overlap=sizes())
def test_chunks_of_space_separated_words(lengths: list[int], size_overlap: tuple[int, int]) -> None:
    size, overlap = size_overlap
    text = unique_words(lengths)
    chunks = chunk_text(text, size, overlap)
    assert chunk_text(text, size, overlap) == chunks  # deterministic
    assert all(0 < len(chunk) <= size for chunk in chunks)
    assert all(chunk == chunk.strip() for chunk in chunks)
    found = spans(text, chunks)

    # Together the chunks cover every non-whitespace character.
    covered = {i for start, end in found for i in range(start, end)}
    assert {i for i, char in enumerate(text) if not char.isspace()} <= covered

    for (start, end), (next_start, _) in itertools.pairwise(found):
        if overlap == 0:
            assert next_start >= end  # no character repeated
        elif size >= 4:
            # The next chunk starts inside this one. (In a 2-3 character window a piece
            # can end one character in, at a space: the overlap is then that space alone,
            # which is stripped.)
            assert start <= next_start < end

    if overlap < size // 2:
        ends = [end for _, end in found]
        assert ends == sorted(set(ends))  # every chunk brings new text

    # A piece ending inside a word had no space to end at in its window's second half
    # past the previous piece's end.
    previous_end = 0
    for _, end in found:
        if end < len(text) and not text[end].isspace():
            window_start = end - size
            assert " " not in text[max(window_start + size // 2, previous_end + 1) : end]
        previous_end = end


@hyp_settings(database=None)
@given(
    lengths=word_lengths,
    separators=st.lists(whitespace, max_size=40),
    lead=st.text(alphabet=" \n\t", max_size=3),
    trail=st.text(alphabet=" \n\t", max_size=3),
    size_overlap=sizes(),
)
def test_chunks_of_words_separated_by_any_whitespace(
    lengths: list[int],
    separators: list[str],
    lead: str,
    trail: str,
    size_overlap: tuple[int, int],
) -> None:
    size, overlap = size_overlap
    separators += [" "] * (len(lengths) - len(separators))
    text = lead + unique_words(lengths, separators) + trail
    chunks = chunk_text(text, size, overlap)
    assert chunk_text(text, size, overlap) == chunks
    assert all(0 < len(chunk) <= size for chunk in chunks)
    assert all(chunk == chunk.strip() for chunk in chunks)
    found = spans(text, chunks)
    covered = {i for start, end in found for i in range(start, end)}
    assert {i for i, char in enumerate(text) if not char.isspace()} <= covered
    starts = [start for start, _ in found]
    assert starts == sorted(starts)
    if not text.strip():
        assert chunks == []


# --- chunk_document -----------------------------------------------------------------------


def test_chunk_document_ids_count_from_zero() -> None:
    text = "the quick brown fox jumps over the lazy dog"
    chunks = chunk_document("manual-7", text, 16, 4)
    assert [c.text for c in chunks] == chunk_text(text, 16, 4)
    assert [c.id for c in chunks] == ["manual-7:0", "manual-7:1", "manual-7:2", "manual-7:3"]
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    assert all(c.document_id == "manual-7" for c in chunks)
    assert all(c.id == chunk_id("manual-7", c.index) for c in chunks)
    assert chunks == chunk_document("manual-7", text, 16, 4)  # the same ids on every run
    assert chunks[0] == Chunk("manual-7:0", "manual-7", 0, "the quick brown")


@pytest.mark.parametrize(
    ("document_id", "index", "expected"),
    [("doc", 0, "doc:0"), ("doc", 12, "doc:12"), ("a:b", 3, "a:b:3"), ("é x", 1, "é x:1")],
)
def test_chunk_id(document_id: str, index: int, expected: str) -> None:
    assert chunk_id(document_id, index) == expected


# --- select_recipients --------------------------------------------------------------------


def hb(worker_id: str, **fields: Any) -> Heartbeat:
    return Heartbeat(worker_id=worker_id, **fields)


@pytest.mark.parametrize(
    ("fields", "chosen"),
    [
        ({"tier": TIER_GPU, "capabilities": ("embeddings",)}, True),
        ({"tier": TIER_CPU, "capabilities": ("vllm", "embeddings")}, True),
        ({"tier": "gpu", "capabilities": ("embeddings",), "status": "degraded"}, True),
        ({"tier": TIER_CPU, "services_status": {"embeddings": "healthy"}}, True),
        ({"tier": TIER_STORAGE, "capabilities": ("embeddings",)}, False),
        ({"tier": None, "capabilities": ("embeddings",)}, False),
        ({"capabilities": ("embeddings",)}, False),  # tier unknown
        ({"tier": TIER_GPU, "capabilities": ("embeddings",), "status": "unhealthy"}, False),
        ({"tier": TIER_CPU, "capabilities": ("embeddings",), "status": "draining"}, False),
        ({"tier": TIER_GPU, "capabilities": ("vllm", "ocr")}, False),
        ({"tier": TIER_GPU}, False),
    ],
)
def test_select_recipients_for_a_capability(fields: dict[str, Any], chosen: bool) -> None:
    worker = hb("candidate", **fields)
    reference = hb("reference", tier=TIER_GPU, capabilities=("embeddings",))
    picked = [r.worker_id for r in select_recipients([worker, reference], "embeddings")]
    assert picked == (["candidate", "reference"] if chosen else ["reference"])


def test_select_recipients_without_a_capability_takes_every_live_gpu_and_cpu_worker() -> None:
    fleet = [
        hb("z-gpu-bare", tier=TIER_GPU),
        hb("m-cpu-ocr", tier=TIER_CPU, capabilities=("ocr",), status="degraded"),
        hb("a-gpu-vllm", tier=TIER_GPU, capabilities=("vllm",)),
        hb("b-storage", tier=TIER_STORAGE, capabilities=("vllm",)),
        hb("c-untiered", capabilities=("vllm",)),
        hb("d-sick", tier=TIER_GPU, status="unhealthy"),
        hb("e-draining", tier=TIER_CPU, status="draining"),
    ]
    picked = select_recipients(fleet, None)
    assert [r.worker_id for r in picked] == ["a-gpu-vllm", "m-cpu-ocr", "z-gpu-bare"]
    assert [r.worker_id for r in select_recipients(fleet, "vllm")] == ["a-gpu-vllm"]
    assert select_recipients(fleet, "embeddings") == []
    assert select_recipients([], None) == []


def test_select_recipients_is_sorted_by_worker_id() -> None:
    ids = ["w-10", "w-2", "gpu-b", "gpu-a", "cpu-1", "W-0"]
    fleet = [hb(i, tier=TIER_GPU, capabilities=("embeddings",)) for i in ids]
    for order in (fleet, fleet[::-1]):
        picked = [r.worker_id for r in select_recipients(order, "embeddings")]
        assert picked == sorted(ids)


# --- gather -------------------------------------------------------------------------------


def outcome(
    worker_id: str,
    status: OutcomeStatus,
    result: dict[str, Any] | None = None,
    error: str | None = None,
) -> WorkerOutcome:
    return WorkerOutcome(
        worker_id=worker_id,
        status=status,
        status_code=STATUS_CODES[status],
        result=result,
        error=error,
        duration_s=0.25,
    )


def test_status_codes() -> None:
    assert dict(STATUS_CODES) == {"accepted": 200, "failed": 500, "timeout": 504}


def mixed_outcomes() -> list[WorkerOutcome]:
    return [
        outcome(
            "gpu-1",
            "accepted",
            {"documents": 2, "chunks": 9, "failed": [{"id": "d3", "error": "empty text"}]},
        ),
        outcome("cpu-1", "accepted", {"documents": 1, "chunks": 4, "failed": []}),
        # Not accepted: their results must not be counted even when they carry one.
        outcome("cpu-2", "failed", {"documents": 50, "chunks": 500}, error="boom"),
        outcome("gpu-2", "timeout", error="no answer within 5.0s"),
    ]


def test_gather_counts_and_aggregates_only_accepted_results() -> None:
    outcomes = mixed_outcomes()
    result = gather(job_type("rag_ingestion"), "b-1", outcomes)
    assert (result.job_type, result.broadcast_id) == ("rag_ingestion", "b-1")
    assert (result.broadcasted_to, result.successful, result.failed) == (4, 2, 2)
    assert result.workers == outcomes
    assert result.aggregated == {
        "documents": 3,
        "chunks": 13,
        "failed_documents": [{"id": "d3", "error": "empty text", "worker_id": "gpu-1"}],
    }


@pytest.mark.parametrize(
    ("statuses", "successful", "failed"),
    [
        ([], 0, 0),
        (["accepted"], 1, 0),
        (["timeout"], 0, 1),
        (["failed", "timeout", "timeout"], 0, 3),
        (["accepted", "accepted", "timeout"], 2, 1),
    ],
)
def test_gather_counts(statuses: list[OutcomeStatus], successful: int, failed: int) -> None:
    outcomes = [outcome(f"w{i}", s, {"documents": 1, "chunks": 2}) for i, s in enumerate(statuses)]
    result = gather(job_type("rag_ingestion"), "b", outcomes)
    assert result.broadcasted_to == len(outcomes)
    assert (result.successful, result.failed) == (successful, failed)
    assert result.aggregated["documents"] == successful
    assert result.aggregated["chunks"] == 2 * successful


def test_gather_accepted_without_a_result_counts_as_empty() -> None:
    result = gather(job_type("rag_ingestion"), "b", [outcome("w", "accepted")])
    assert result.successful == 1
    assert result.aggregated == {"documents": 0, "chunks": 0, "failed_documents": []}


@pytest.mark.parametrize("name", ["ping", "warm_model"])
def test_gather_without_a_summary_aggregates_nothing(name: str) -> None:
    outcomes = [outcome("a", "accepted", {"pong": True}), outcome("b", "failed", error="x")]
    result = gather(job_type(name), "b", outcomes)
    assert result.aggregated == {}
    assert (result.job_type, result.successful, result.failed) == (name, 1, 1)


def test_broadcast_result_round_trips_through_json() -> None:
    result = gather(job_type("rag_ingestion"), "b-42", mixed_outcomes())
    dumped = result.model_dump(mode="json")
    assert BroadcastResult.model_validate(dumped) == result
    assert BroadcastResult.model_validate(json.loads(json.dumps(dumped))) == result
    assert dumped["workers"][3] == {
        "worker_id": "gpu-2",
        "status": "timeout",
        "status_code": 504,
        "result": None,
        "error": "no answer within 5.0s",
        "duration_s": 0.25,
    }
