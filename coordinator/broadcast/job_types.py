"""Broadcast job types: what each job's data looks like and how it is split between workers.

A *replicated* job sends the same data to every recipient (``warm_model``: each worker
loads the model). A *sharded* job splits its items so each is processed once
(``rag_ingestion``: each worker ingests a disjoint share of the documents).

To add a job type, declare it here (a data model, a mode, and for sharded jobs a ``shard``
function) and register its handler in :mod:`worker_tasks.job_handlers`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from coordinator.core.errors import JobError, TaskInputError
from coordinator.core.task_spec import checked_model

Mode = Literal["replicated", "sharded"]
MetadataValue = str | int | float | bool
# ChromaDB refuses empty keys and keys starting with '#' or '$'.
MetadataKey = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^#$]")]


class JobData(BaseModel):
    """Base of every job's data: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Document(BaseModel):
    """One document to ingest."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: Annotated[str, Field(min_length=1, max_length=256)]
    text: str = Field(max_length=1_000_000)
    metadata: dict[MetadataKey, MetadataValue] = Field(default_factory=dict, max_length=64)


class RagIngestionData(JobData):
    """``rag_ingestion``: chunk, embed and upsert documents into a shared collection."""

    documents: list[Document] = Field(max_length=100_000)
    # ChromaDB's rules: 3-63 characters, alphanumeric at both ends, no '..', not an IP.
    collection: str = Field(
        min_length=3, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9]$"
    )
    chunk_size: int = Field(default=512, ge=16, le=16_384, description="characters")
    chunk_overlap: int = Field(default=64, ge=0, description="characters")
    model: str = Field(default="nomic-embed-text", min_length=1)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> RagIngestionData:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(
                f"chunk_overlap={self.chunk_overlap!r} must be below chunk_size={self.chunk_size!r}"
            )
        if ".." in self.collection or _is_ip(self.collection):
            raise ValueError(f"collection={self.collection!r} is not a valid ChromaDB name")
        seen: set[str] = set()
        for doc in self.documents:
            if doc.id in seen:
                raise ValueError(f"document id {doc.id!r} appears more than once")
            seen.add(doc.id)
        return self


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class WarmModelData(JobData):
    """``warm_model``: pull (if absent) and load a model through Ollama on every worker."""

    model: str = Field(min_length=1, max_length=256)
    keep_alive: str | int | None = Field(default=None, description="Ollama's keep_alive")

    @field_validator("model", mode="after")
    @classmethod
    def _a_model_name(cls, value: str) -> str:
        try:
            return checked_model(value)
        except TaskInputError as exc:  # a ValueError: pydantic reports it on the field
            raise ValueError(str(exc)) from None


class PingData(JobData):
    """``ping``: do nothing and answer; measures the broadcast machinery itself."""


def shard_documents(data: JobData, parts: int) -> list[JobData]:
    """Split documents into ``parts`` shares of similar total text length.

    Deterministic: the same documents and the same number of parts give the same shares.
    Longest first onto the lightest share keeps the slowest worker close to the average.
    """
    assert isinstance(data, RagIngestionData)
    shares: list[list[Document]] = [[] for _ in range(parts)]
    sizes = [0] * parts
    for doc in sorted(data.documents, key=lambda d: (-len(d.text), d.id)):
        lightest = min(range(parts), key=lambda i: (sizes[i], i))
        shares[lightest].append(doc)
        sizes[lightest] += len(doc.text) or 1
    return [data.model_copy(update={"documents": share}) for share in shares]


@dataclass(frozen=True, slots=True)
class JobType:
    """A kind of broadcast job."""

    name: str
    mode: Mode
    data_model: type[JobData]
    required_capability: str | None = None
    """Used when the caller names none."""
    shard: Callable[[JobData, int], list[JobData]] | None = None
    summarize: Callable[[Sequence[tuple[str, Mapping[str, Any]]]], dict[str, Any]] | None = None
    """Turns the accepted ``(worker_id, result)`` pairs into the job's aggregated result.
    A list, not a dict: a worker may run two shares when the reaper moved a dead one's."""

    def parse(self, job_data: Mapping[str, Any]) -> JobData:
        """Validate ``job_data``; raises :class:`JobError` naming the field and the value."""
        try:
            return self.data_model.model_validate(job_data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'job_data'}="
                f"{err.get('input')!r:.80}: {err['msg']}"
                for err in exc.errors()[:5]
            )
            raise JobError(f"invalid job_data for {self.name!r}: {problems}") from None

    def split(self, data: JobData, recipients: int) -> list[JobData]:
        """The data each of ``recipients`` workers receives."""
        if self.mode == "sharded":
            assert self.shard is not None
            return self.shard(data, recipients)
        return [data] * recipients


def summarize_ingestion(results: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Totals over the workers, and every failed document with its worker."""
    failures = [
        {**failure, "worker_id": worker_id}
        for worker_id, result in results
        for failure in result.get("failed", [])
    ]
    return {
        "documents": sum(int(r.get("documents", 0)) for _, r in results),
        "chunks": sum(int(r.get("chunks", 0)) for _, r in results),
        "failed_documents": failures,
    }


JOB_TYPES: Final[Mapping[str, JobType]] = {
    job.name: job
    for job in (
        JobType(
            "rag_ingestion",
            "sharded",
            RagIngestionData,
            required_capability="embeddings",
            shard=shard_documents,
            summarize=summarize_ingestion,
        ),
        JobType("warm_model", "replicated", WarmModelData, required_capability="vllm"),
        JobType("ping", "replicated", PingData),
    )
}


def job_type(name: str) -> JobType:
    """The job type called ``name``; raises :class:`JobError` listing the known ones."""
    try:
        return JOB_TYPES[name]
    except KeyError:
        raise JobError(
            f"unknown job type {name!r}; known: {', '.join(sorted(JOB_TYPES))}"
        ) from None
