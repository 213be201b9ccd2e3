"""Broadcast job handlers, the task that runs them, the chord body, and control messages.

A handler gets the job's validated data and a :class:`JobContext`, and returns a JSON-ready
dict. To add a job type: declare it in :mod:`coordinator.broadcast.job_types`, write a
handler here, and list it in :data:`HANDLERS`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx
from celery import Task, shared_task

from coordinator.broadcast.client import (
    GATHER,
    REFUSED_CODE,
    RUN_JOB,
    STATUS_CODES,
    OutcomeStatus,
    WorkerOutcome,
    gather,
)
from coordinator.broadcast.job_types import (
    JOB_TYPES,
    JobData,
    RagIngestionData,
    WarmModelData,
    job_type,
)
from coordinator.broadcast.rag import chroma_client, chunk_document
from coordinator.core.errors import CoordinatorError, JobError
from coordinator.core.heartbeat import TIER_BY_NAME, TIER_CPU
from coordinator.core.settings import Endpoint, WorkerSettings, load_settings
from coordinator.core.task_spec import normalize_model
from worker_tasks import model_servers
from worker_tasks.heartbeat_sender import HeartbeatSender
from worker_tasks.lifecycle import runtime_of
from worker_tasks.model_servers import Backend
from worker_tasks.model_servers.ollama import OllamaBackend

log = logging.getLogger(__name__)

EMBED_BATCH: Final = 64
"""Chunks per embedding request; a failing batch is retried document by document."""


@dataclass
class JobContext:
    """What a handler may use on the worker that runs it."""

    settings: WorkerSettings
    heartbeat: HeartbeatSender | None

    def server(self, service: str) -> tuple[httpx.Client, Endpoint, Backend]:
        """The pooled client, ``service``'s endpoint and the backend for its API."""
        return model_servers.connect(self.settings, service)


Handler = Callable[[JobContext, Any], dict[str, Any]]


def ping(ctx: JobContext, data: JobData) -> dict[str, Any]:
    """Answer at once."""
    return {"pong": True}


def warm_model(ctx: JobContext, data: WarmModelData) -> dict[str, Any]:
    """Load the model into memory, pulling it first if Ollama lacks it; a server that serves
    a fixed set of models (OpenAI-compatible, TEI) answers whether it serves this one."""
    model = normalize_model(data.model)
    for service in ("vllm", "embeddings", "ocr"):
        client, endpoint, server = ctx.server(service)
        state = server.probe(client, endpoint)
        if not isinstance(server, OllamaBackend):
            if model in state.in_memory:
                return {"model": model, "pulled": False, "loaded": True}
            continue
        pulled = model not in state.on_disk
        if pulled:
            server.pull(client, endpoint, model)
        server.load(client, endpoint, model, data.keep_alive)
        if ctx.heartbeat is not None:
            ctx.heartbeat.refresh_probes()
            ctx.heartbeat.beat()  # routing should find the model loaded from now on
        return {"model": model, "pulled": pulled, "loaded": True}
    raise JobError(f"no model server on {ctx.settings.worker_id} serves or can load {model!r}")


def rag_ingestion(ctx: JobContext, data: RagIngestionData) -> dict[str, Any]:
    """Chunk, embed and upsert this worker's share of the documents.

    A document that cannot be chunked or embedded is reported by id; the others are stored.
    Chunk ids are deterministic, so a second run overwrites instead of adding.
    """
    failed: list[dict[str, str]] = []
    chunked = []
    for doc in data.documents:
        chunks = chunk_document(doc.id, doc.text, data.chunk_size, data.chunk_overlap)
        if chunks:
            chunked.append((doc, chunks))
        else:
            failed.append({"id": doc.id, "error": "empty text"})
    collection = chroma_client(ctx.settings.chromadb_url).get_or_create_collection(
        data.collection, metadata={"hnsw:space": "cosine"}, embedding_function=None
    )
    stored_docs = stored_chunks = 0
    for batch in _batches(chunked):
        embedded = _embed_batch(ctx, data.model, batch, failed)
        if not embedded:
            continue
        ids, vectors, texts, metas = [], [], [], []
        for doc, chunks, doc_vectors in embedded:
            for chunk, vector in zip(chunks, doc_vectors, strict=True):
                ids.append(chunk.id)
                vectors.append(vector)
                texts.append(chunk.text)
                metas.append(
                    {
                        **doc.metadata,
                        "document_id": doc.id,
                        "chunk_index": chunk.index,
                        "ingested_by": ctx.settings.worker_id,
                    }
                )
        collection.upsert(ids=ids, embeddings=vectors, documents=texts, metadatas=metas)  # type: ignore[arg-type]
        stored_docs += len(embedded)
        stored_chunks += len(ids)
    return {
        "collection": data.collection,
        "documents": stored_docs,
        "chunks": stored_chunks,
        "failed": failed,
    }


def _batches(chunked: list[Any]) -> list[list[Any]]:
    batches: list[list[Any]] = [[]]
    size = 0
    for doc, chunks in chunked:
        if batches[-1] and size + len(chunks) > EMBED_BATCH:
            batches.append([])
            size = 0
        batches[-1].append((doc, chunks))
        size += len(chunks)
    return [b for b in batches if b]


def _embed_batch(
    ctx: JobContext, model: str, batch: list[Any], failed: list[dict[str, str]]
) -> list[Any]:
    """Embed a batch of documents' chunks; on failure, document by document."""
    texts = [chunk.text for _, chunks in batch for chunk in chunks]
    try:
        client, endpoint, server = ctx.server("embeddings")
        vectors = server.embed(client, endpoint, model=model, texts=texts)["embeddings"]
    except CoordinatorError:
        if len(batch) == 1:
            doc, _ = batch[0]
            failed.append({"id": doc.id, "error": "embedding failed"})
            return []
        return [item for one in batch for item in _embed_batch(ctx, model, [one], failed)]
    out, at = [], 0
    for doc, chunks in batch:
        out.append((doc, chunks, vectors[at : at + len(chunks)]))
        at += len(chunks)
    return out


HANDLERS: Final[Mapping[str, Handler]] = {
    "ping": ping,
    "warm_model": warm_model,
    "rag_ingestion": rag_ingestion,
}
assert set(HANDLERS) == set(JOB_TYPES), "every job type needs a handler"


def _outcome(
    worker_id: str,
    started: float,
    *,
    result: dict[str, Any] | None = None,
    error: str = "",
    code: int | None = None,
) -> dict[str, Any]:
    status: OutcomeStatus = "accepted" if result is not None else "failed"
    return WorkerOutcome(
        worker_id=worker_id,
        status=status,
        status_code=code or STATUS_CODES[status],
        result=result,
        error=error or None,
        duration_s=round(time.monotonic() - started, 6),
    ).model_dump(mode="json")


@shared_task(name=RUN_JOB, bind=True)
def run_broadcast_job(
    self: Task[Any, Any],
    job_name: str,
    job_data: dict[str, Any],
    broadcast_id: str,
    recipient: str,
    required_capability: str | None,
) -> dict[str, Any]:
    """Run one recipient's part of a broadcast. Never raises: a failure is an outcome, so
    the chord body always runs and the others' results are not lost."""
    started = time.monotonic()
    runtime = runtime_of(self.app)
    settings = runtime.settings if runtime is not None else load_settings(WorkerSettings)
    me = settings.worker_id
    try:
        job = job_type(job_name)
        if me != recipient and job.mode == "replicated":
            return _outcome(me, started, error=f"sent to {recipient!r}", code=REFUSED_CODE)
        sender = runtime.heartbeat if runtime is not None else None
        tier = TIER_BY_NAME.get(sender.tier if sender is not None else "cpu", TIER_CPU)
        capabilities = sender.capabilities(sender.latest_probe()) if sender is not None else ()
        if tier > TIER_CPU:
            return _outcome(
                me, started, error="storage-tier workers take no jobs", code=REFUSED_CODE
            )
        if required_capability is not None and required_capability not in capabilities:
            reason = f"worker {me!r} does not offer {required_capability!r}"
            return _outcome(me, started, error=reason, code=REFUSED_CODE)
        data = job.parse(job_data)
        result = HANDLERS[job.name](JobContext(settings, sender), data)
    except JobError as exc:
        return _outcome(me, started, error=str(exc), code=REFUSED_CODE)
    except CoordinatorError as exc:  # a service down: its one-line reason, no traceback
        log.warning("broadcast %s %s failed on %s: %s", job_name, broadcast_id, me, exc)
        return _outcome(me, started, error=str(exc))
    except Exception as exc:  # a job's failure is reported, never raised into the chord
        log.exception("broadcast %s %s failed on %s", job_name, broadcast_id, me)
        return _outcome(me, started, error=f"{type(exc).__name__}: {exc}")
    return _outcome(me, started, result=result)


@shared_task(name=GATHER)
def gather_broadcast(
    outcomes: list[dict[str, Any]], job_name: str, broadcast_id: str
) -> dict[str, Any]:
    """The chord body: aggregate every recipient's outcome."""
    parsed = [WorkerOutcome.model_validate(o) for o in outcomes]
    return gather(job_type(job_name), broadcast_id, parsed).model_dump(mode="json")
