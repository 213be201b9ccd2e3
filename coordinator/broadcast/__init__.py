"""Broadcast jobs: one message per capable worker, gathered by a chord; the job types and RAG.

``from coordinator.broadcast import broadcast`` is the application's entry point; the job
types are declared in :mod:`coordinator.broadcast.job_types`, RAG ingestion and search in
:mod:`coordinator.broadcast.rag`.
"""

from coordinator.broadcast.client import (
    BroadcastHandle,
    BroadcastResult,
    WorkerOutcome,
    broadcast,
    broadcast_async,
    send_control,
)

__all__ = [
    "BroadcastHandle",
    "BroadcastResult",
    "WorkerOutcome",
    "broadcast",
    "broadcast_async",
    "send_control",
]
