"""Retrieval helpers shared by the ingesting workers and the applications that query.

Chunks have deterministic ids (``{document_id}:{chunk_index}``), so ingesting the same
documents again overwrites the same entries instead of adding copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from coordinator.core.errors import ServiceError, ServiceUnreachableError
from coordinator.core.task_spec import EMBED
from coordinator.dispatch.app import default_app, fleet_of

if TYPE_CHECKING:
    from celery import Celery
    from chromadb.api import ClientAPI


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a document, with the id it is stored under."""

    id: str
    document_id: str
    index: int
    text: str


def chunk_id(document_id: str, index: int) -> str:
    """The id a chunk is stored under; the same on every run."""
    return f"{document_id}:{index}"


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """Split ``text`` into pieces of at most ``size`` characters overlapping by ``overlap``.

    A piece ends at the last whitespace of its window when there is one in its second half
    and past the previous piece's end, so words are not cut and every piece reaches further
    than the one before; whitespace-only text gives no chunks.
    """
    if overlap >= size:
        raise ValueError(f"overlap={overlap!r} must be below size={size!r}")
    text = text.strip()
    pieces: list[str] = []
    start = previous_end = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = _last_space(text, max(start + size // 2, previous_end + 1), end)
            if cut is not None:
                end = cut
        piece = text[start:end].strip()
        if piece:
            pieces.append(piece)
        if end >= len(text):
            break
        previous_end = end
        start = max(end - overlap, start + 1)
    return pieces


def _last_space(text: str, low: int, high: int) -> int | None:
    """Index of the last whitespace character in ``text[low:high]``, if any."""
    for i in range(high - 1, low - 1, -1):
        if text[i].isspace():
            return i
    return None


def chunk_document(document_id: str, text: str, size: int, overlap: int) -> list[Chunk]:
    """A document's chunks with their ids."""
    return [
        Chunk(chunk_id(document_id, i), document_id, i, piece)
        for i, piece in enumerate(chunk_text(text, size, overlap))
    ]


def chroma_client(url: str) -> ClientAPI:
    """A ChromaDB HTTP client for ``url`` (``http://host:port``), telemetry off."""
    import chromadb  # heavy: only ingesting workers and querying applications need it
    from chromadb.config import Settings

    parts = urlsplit(url)
    if parts.hostname is None:
        raise ServiceError(url, "CHROMADB_URL has no host", what="ChromaDB")
    try:
        return chromadb.HttpClient(
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 8000),
            ssl=parts.scheme == "https",
            settings=Settings(anonymized_telemetry=False),
        )
    except ValueError as exc:  # what chromadb raises when its first heartbeat finds nobody
        raise ServiceUnreachableError(url, f"{exc} (CHROMADB_URL)", what="ChromaDB") from None


def search(
    collection: str,
    text: str,
    *,
    n_results: int = 5,
    app: Celery | None = None,
    timeout_s: float = 60.0,
) -> list[dict[str, Any]]:
    """Search a collection for ``text``: embedded by the fleet (an ``embed`` task, routed
    like any other), then queried in the ChromaDB at ``CHROMADB_URL``."""
    app = app or default_app()
    answer = app.send_task(EMBED, args=([text],)).get(timeout=timeout_s)
    embedding = answer["embeddings"][0]
    return query(
        chroma_client(fleet_of(app).settings.chromadb_url), collection, embedding, n_results
    )


def query(
    client: ClientAPI, collection: str, embedding: list[float], n_results: int = 5
) -> list[dict[str, Any]]:
    """The ``n_results`` chunks nearest to ``embedding``: id, document id, text, distance."""
    embeddings: list[Sequence[float]] = [embedding]
    found = client.get_collection(collection).query(
        query_embeddings=embeddings,
        n_results=n_results,
        include=["documents", "metadatas", "distances"],
    )
    ids = found["ids"][0]
    documents = (found.get("documents") or [[]])[0]
    metadatas = (found.get("metadatas") or [[]])[0]
    distances = (found.get("distances") or [[]])[0]
    return [
        {
            "id": ids[i],
            "document_id": (metadatas[i] or {}).get("document_id"),
            "text": documents[i],
            "distance": distances[i],
        }
        for i in range(len(ids))
    ]
