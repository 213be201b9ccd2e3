"""Unit tests of the broadcast job types (``coordinator.broadcast.job_types``).

Everything here is pure: job data is validated and split in memory, no Redis, Celery
worker or ChromaDB server is involved. The ``rag_ingestion`` data has the issue's shape.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from coordinator.broadcast.job_types import (
    JOB_TYPES,
    Document,
    JobData,
    PingData,
    RagIngestionData,
    WarmModelData,
    job_type,
    shard_documents,
    summarize_ingestion,
)
from coordinator.core.errors import CoordinatorError, JobError

RAG = job_type("rag_ingestion")


def issue_data(**overrides: Any) -> dict[str, Any]:
    """``rag_ingestion`` job data as the issue shows it; ``overrides`` replace fields."""
    data: dict[str, Any] = {
        "documents": [
            {"id": "doc-1", "text": "Reset the router.", "metadata": {"source": "manual.pdf"}},
            {"id": "doc-2", "text": "Hold the button for ten seconds.", "metadata": {"page": 2}},
            {"id": "doc-3", "text": "Done.", "metadata": {"draft": False, "score": 0.5}},
        ],
        "collection": "manuals",
        "chunk_size": 512,
        "chunk_overlap": 64,
    }
    data.update(overrides)
    return data


def rag(documents: list[dict[str, Any]], **fields: Any) -> RagIngestionData:
    """Parsed ``rag_ingestion`` data holding ``documents``."""
    parsed = RAG.parse({"documents": documents, "collection": "manuals", **fields})
    assert isinstance(parsed, RagIngestionData)
    return parsed


def docs_of(share: JobData) -> list[Document]:
    assert isinstance(share, RagIngestionData)
    return share.documents


def text_length(share: JobData) -> int:
    return sum(len(doc.text) for doc in docs_of(share))


# --- the registry -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "mode", "data_model", "capability"),
    [
        ("rag_ingestion", "sharded", RagIngestionData, "embeddings"),
        ("warm_model", "replicated", WarmModelData, "vllm"),
        ("ping", "replicated", PingData, None),
    ],
)
def test_known_job_types(
    name: str, mode: str, data_model: type[JobData], capability: str | None
) -> None:
    job = job_type(name)
    assert job is JOB_TYPES[name]
    assert (job.name, job.mode, job.data_model, job.required_capability) == (
        name,
        mode,
        data_model,
        capability,
    )
    assert (job.shard is not None) is (mode == "sharded")


def test_unknown_job_type_names_it_and_lists_the_known_ones() -> None:
    with pytest.raises(JobError) as caught:
        job_type("nope")
    message = str(caught.value)
    assert "'nope'" in message
    for known in ("rag_ingestion", "warm_model", "ping"):
        assert known in message
    assert isinstance(caught.value, CoordinatorError)
    assert caught.value.__cause__ is None  # the KeyError is not chained into the report


# --- parsing: rag_ingestion ---------------------------------------------------------------


def test_the_issues_rag_ingestion_data_parses() -> None:
    data = RAG.parse(issue_data())
    assert isinstance(data, RagIngestionData)
    assert [doc.id for doc in data.documents] == ["doc-1", "doc-2", "doc-3"]
    assert data.documents[1].text == "Hold the button for ten seconds."
    assert data.documents[0].metadata == {"source": "manual.pdf"}
    assert data.documents[1].metadata == {"page": 2}
    assert data.documents[2].metadata == {"draft": False, "score": 0.5}
    assert type(data.documents[2].metadata["draft"]) is bool  # not coerced to 0
    assert (data.collection, data.chunk_size, data.chunk_overlap) == ("manuals", 512, 64)
    assert data.model == "nomic-embed-text"


def test_rag_ingestion_defaults() -> None:
    data = rag([{"id": "a", "text": "x"}])
    assert (data.chunk_size, data.chunk_overlap, data.model) == (512, 64, "nomic-embed-text")
    assert data.documents[0].metadata == {}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"chunksize": 100}, ["chunksize=100", "Extra inputs are not permitted"]),
        ({"chunk_overlap": 512}, ["chunk_overlap=512", "chunk_size=512"]),
        ({"chunk_size": 100, "chunk_overlap": 200}, ["chunk_overlap=200", "chunk_size=100"]),
        ({"chunk_size": 8}, ["chunk_size=8"]),
        ({"chunk_overlap": -1}, ["chunk_overlap=-1"]),
        ({"collection": "no spaces"}, ["collection='no spaces'"]),
        ({"collection": "ab"}, ["collection='ab'"]),
        ({"collection": "-manuals"}, ["collection='-manuals'"]),
        ({"collection": "m" * 64}, ["collection='mmm"]),
        ({"collection": "manuals/2024"}, ["collection='manuals/2024'"]),
        (
            {
                "documents": [
                    {"id": "a", "text": "x"},
                    {"id": "b", "text": "y"},
                    {"id": "a", "text": "z"},
                ]
            },
            ["document id 'a' appears more than once"],
        ),
        (
            {"documents": [{"id": "a", "text": "x", "metadata": {"nested": {"k": 1}}}]},
            ["documents.0.metadata.nested", "{'k': 1}"],
        ),
        (
            {"documents": [{"id": "a", "text": "x", "metadata": {"tags": ["a", "b"]}}]},
            ["documents.0.metadata.tags", "['a', 'b']"],
        ),
        ({"documents": [{"id": "", "text": "x"}]}, ["documents.0.id=''"]),
        ({"documents": [{"id": "a"}]}, ["documents.0.text", "Field required"]),
        ({"documents": [{"id": "a", "text": "x", "lang": "en"}]}, ["documents.0.lang='en'"]),
    ],
)
def test_invalid_rag_ingestion_data_names_the_field_and_value(
    overrides: dict[str, Any], expected: list[str]
) -> None:
    with pytest.raises(JobError) as caught:
        RAG.parse(issue_data(**overrides))
    message = str(caught.value)
    assert message.startswith("invalid job_data for 'rag_ingestion': ")
    for part in expected:
        assert part in message


def test_missing_collection_is_named() -> None:
    data = issue_data()
    del data["collection"]
    with pytest.raises(JobError, match=r"collection=.*Field required"):
        RAG.parse(data)


def test_missing_documents_is_named() -> None:
    with pytest.raises(JobError, match=r"documents=.*Field required"):
        RAG.parse({"collection": "manuals"})


@pytest.mark.parametrize("collection", ["abc", "Manuals_2024", "team.docs-v2", "9lives"])
def test_valid_collection_names(collection: str) -> None:
    assert rag([], collection=collection).collection == collection


@pytest.mark.parametrize("collection", ["manuals-", "manuals.", "ab..cd", "10.0.0.1"])
def test_collection_names_chromadb_refuses_are_refused(collection: str) -> None:
    with pytest.raises(JobError, match="collection"):
        RAG.parse(issue_data(collection=collection))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_metadata_is_refused(value: float) -> None:
    documents = [{"id": "a", "text": "x", "metadata": {"score": value}}]
    with pytest.raises(JobError, match="metadata"):
        RAG.parse(issue_data(documents=documents))


# --- parsing: warm_model and ping ---------------------------------------------------------


def test_warm_model_requires_model() -> None:
    warm = job_type("warm_model")
    with pytest.raises(
        JobError, match=r"invalid job_data for 'warm_model': model=.*Field required"
    ):
        warm.parse({})
    with pytest.raises(JobError, match=r"model=''"):
        warm.parse({"model": ""})
    data = warm.parse({"model": "llama3.2", "keep_alive": "10m"})
    assert data == WarmModelData(model="llama3.2", keep_alive="10m")
    assert warm.parse({"model": "llama3.2"}) == WarmModelData(model="llama3.2", keep_alive=None)


def test_warm_model_rejects_unknown_fields() -> None:
    with pytest.raises(JobError, match=r"modle='llama3.2'"):
        job_type("warm_model").parse({"model": "llama3.2", "modle": "llama3.2"})


@pytest.mark.parametrize(
    ("job_data", "shown"),
    [({"x": 1}, "x=1"), ({"model": "llama3.2"}, "model='llama3.2'"), ({"": None}, "=None")],
)
def test_ping_rejects_any_field(job_data: dict[str, Any], shown: str) -> None:
    ping = job_type("ping")
    assert ping.parse({}) == PingData()
    with pytest.raises(JobError) as caught:
        ping.parse(job_data)
    assert str(caught.value).startswith("invalid job_data for 'ping': ")
    assert shown in str(caught.value)
    assert "Extra inputs are not permitted" in str(caught.value)


# --- splitting ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["warm_model", "ping"])
@pytest.mark.parametrize("recipients", [1, 2, 5])
def test_replicated_jobs_give_every_recipient_the_same_data(name: str, recipients: int) -> None:
    job = job_type(name)
    data = job.parse({"model": "llama3.2"} if name == "warm_model" else {})
    shares = job.split(data, recipients)
    assert len(shares) == recipients
    assert all(share == data for share in shares)


def test_rag_ingestion_split_is_sharded() -> None:
    data = rag([{"id": f"d{i}", "text": "x" * (i + 1)} for i in range(6)])
    shares = RAG.split(data, 3)
    assert shares == shard_documents(data, 3)
    assert len(shares) == 3
    assert sorted(doc.id for share in shares for doc in docs_of(share)) == [
        f"d{i}" for i in range(6)
    ]


def test_shards_are_balanced_longest_first() -> None:
    lengths = {"a": 10, "b": 9, "c": 8, "d": 3, "e": 2, "f": 1}
    data = rag([{"id": k, "text": "x" * n} for k, n in lengths.items()])
    shares = shard_documents(data, 2)
    assert [[doc.id for doc in docs_of(s)] for s in shares] == [["a", "d", "e", "f"], ["b", "c"]]
    assert [text_length(s) for s in shares] == [16, 17]


def test_more_parts_than_documents_gives_empty_shares() -> None:
    data = rag([{"id": "a", "text": "alpha"}, {"id": "b", "text": "be"}])
    shares = shard_documents(data, 5)
    assert [[doc.id for doc in docs_of(s)] for s in shares] == [["a"], ["b"], [], [], []]


def test_no_documents_gives_only_empty_shares() -> None:
    shares = shard_documents(rag([]), 3)
    assert [docs_of(s) for s in shares] == [[], [], []]


def test_every_share_keeps_the_settings() -> None:
    data = rag(
        [{"id": f"d{i}", "text": "word " * i, "metadata": {"i": i}} for i in range(5)],
        collection="team.docs",
        chunk_size=300,
        chunk_overlap=30,
        model="mxbai-embed-large",
    )
    for share in RAG.split(data, 4):
        assert isinstance(share, RagIngestionData)
        assert (share.collection, share.chunk_size, share.chunk_overlap, share.model) == (
            "team.docs",
            300,
            30,
            "mxbai-embed-large",
        )
        for doc in share.documents:
            assert doc.metadata == {"i": int(doc.id[1:])}
    assert (
        data.documents
        == rag(
            [{"id": f"d{i}", "text": "word " * i, "metadata": {"i": i}} for i in range(5)]
        ).documents
    )  # splitting left the original alone


documents_strategy = st.lists(
    st.fixed_dictionaries({"id": st.text(min_size=1, max_size=12), "text": st.text(max_size=120)}),
    max_size=30,
    unique_by=lambda doc: doc["id"],
)


@hyp_settings(database=None)
@given(documents=documents_strategy, parts=st.integers(min_value=1, max_value=8))
def test_shards_partition_the_documents(documents: list[dict[str, str]], parts: int) -> None:
    data = rag(documents)
    shares = shard_documents(data, parts)
    assert len(shares) == parts

    # Disjoint, and together exactly the documents: each one in exactly one share.
    placed = [doc for share in shares for doc in docs_of(share)]
    assert sorted(placed, key=lambda d: d.id) == sorted(data.documents, key=lambda d: d.id)

    # Deterministic, whatever the order the documents came in.
    assert shard_documents(data, parts) == shares
    assert shard_documents(rag(documents[::-1]), parts) == shares

    # Balanced: the heaviest share is at most one document heavier than the lightest.
    longest = max((len(doc["text"]) for doc in documents), default=0)
    lengths = [text_length(share) for share in shares]
    assert max(lengths) - min(lengths) <= longest

    if parts > len(documents):
        assert sum(1 for share in shares if not docs_of(share)) == parts - len(documents)

    for share in shares:
        assert isinstance(share, RagIngestionData)
        assert (share.collection, share.chunk_size, share.chunk_overlap, share.model) == (
            data.collection,
            data.chunk_size,
            data.chunk_overlap,
            data.model,
        )


# --- summarizing ----------------------------------------------------------------------------


def test_summarize_ingestion_sums_and_lists_failures_by_worker() -> None:
    summary = summarize_ingestion(
        [
            (
                "gpu-1",
                {
                    "collection": "manuals",
                    "documents": 2,
                    "chunks": 7,
                    "failed": [{"id": "doc-3", "error": "empty text"}],
                },
            ),
            (
                "cpu-1",
                {
                    "collection": "manuals",
                    "documents": 1,
                    "chunks": 4,
                    "failed": [
                        {"id": "doc-5", "error": "embedding failed"},
                        {"id": "doc-6", "error": "embedding failed", "worker_id": "forged"},
                    ],
                },
            ),
            ("cpu-2", {"documents": 3, "chunks": 3}),
            # The same worker twice: it ran a dead worker's share too.
            ("cpu-2", {"documents": 1, "chunks": 1}),
        ]
    )
    assert summary == {
        "documents": 7,
        "chunks": 15,
        "failed_documents": [
            {"id": "doc-3", "error": "empty text", "worker_id": "gpu-1"},
            {"id": "doc-5", "error": "embedding failed", "worker_id": "cpu-1"},
            {"id": "doc-6", "error": "embedding failed", "worker_id": "cpu-1"},
        ],
    }


def test_summarize_ingestion_of_nothing() -> None:
    assert summarize_ingestion([]) == {"documents": 0, "chunks": 0, "failed_documents": []}
    assert summarize_ingestion([("w", {})]) == {"documents": 0, "chunks": 0, "failed_documents": []}
