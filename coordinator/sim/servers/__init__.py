"""Simulated model servers for the demo, the tests and the benchmarks: no language model
runs, but the embeddings are real ones, WordLlama's (:mod:`.embeddings`).

:mod:`.ollama` speaks Ollama's API (its request checks and answer shapes are in
:mod:`.ollama_payloads`), :mod:`.openai_api` vLLM's and :mod:`.tei` TEI's. The parts they
share are apart: :mod:`.base` is the public face of every simulated server, :mod:`.harness`
serves its FastAPI app with uvicorn in a thread, with request counters and fault
injection, and :mod:`.model_memory` keeps the models on disk and in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coordinator.sim.servers.ollama import SimulatedModelServer

__all__ = ["SimulatedModelServer"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `python -m coordinator.sim.servers.ollama` imports this package
    # first, and importing ollama here too would load it twice (runpy warns about that).
    if name == "SimulatedModelServer":
        from coordinator.sim.servers.ollama import SimulatedModelServer

        return SimulatedModelServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
