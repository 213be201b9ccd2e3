"""The demo's fleet: three workers, each on another kind of model server.

* ``gpu-ocr`` talks to Ollama for every service (``llama-vision`` in memory);
* ``gpu-vllm`` to vLLM's OpenAI-compatible API, for generation only (``llama3.2``);
* ``cpu-1`` to TEI for embeddings (``nomic-embed-text``; the vectors are real ones,
  WordLlama's) and to an Ollama that has pulled nothing yet for the rest.

Every server is SIMULATED (:mod:`coordinator.sim.servers`), except that a real Ollama
answering at ``OLLAMA_URL`` stands in for the simulated Ollamas.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal, TypeVar

import httpx
from rich.console import Console

if TYPE_CHECKING:
    from coordinator.sim.servers.base import SimulatedServer
    from coordinator.sim.servers.ollama import SimulatedModelServer

LOAD_DELAY_S: Final = 3.0
"""How long the simulated Ollamas take to load a model that is on disk but not in memory."""

ServerKind = Literal["ollama", "vllm", "tei"]
SERVER_LABELS: Final[Mapping[ServerKind, str]] = {
    "ollama": "Ollama",
    "vllm": "vLLM (OpenAI API)",
    "tei": "TEI + Ollama",
}
_URL_SETTINGS: Final = ("OLLAMA_URL", "VLLM_URL", "EMBEDDINGS_URL", "OCR_URL")
S = TypeVar("S", bound="SimulatedServer")


@dataclass(frozen=True)
class DemoWorker:
    """One worker of the demo fleet and what its model servers start with."""

    worker_id: str
    tier: str
    specialization: str
    in_memory: str
    """The model its ``server`` holds from the start."""
    on_disk: tuple[str, ...]
    """What its Ollama has pulled (``in_memory`` too, when Ollama serves it)."""
    server: ServerKind = "ollama"
    """What serves ``in_memory``: Ollama (and every service), vLLM (generation, the only
    service of this worker) or TEI (embeddings; an Ollama serves the rest)."""


FLEET: Final = (
    DemoWorker("gpu-ocr", "gpu", "ocr", "llama-vision", ("llama-vision", "nomic-embed-text")),
    DemoWorker("gpu-vllm", "gpu", "vllm", "llama3.2", (), server="vllm"),
    DemoWorker("cpu-1", "cpu", "", "nomic-embed-text", (), server="tei"),
)


@dataclass
class ModelServers:
    """Where each worker's services are, and the simulated Ollamas the report asks how
    many models they loaded."""

    env: dict[str, dict[str, str]] = field(default_factory=dict)
    """By worker id: its model servers' settings (``OLLAMA_URL`` and the others)."""
    ollamas: list[tuple[SimulatedModelServer, int]] = field(default_factory=list)
    """Each simulated Ollama, with how many models it held at the start."""

    def loads(self) -> int | None:
        """Models the simulated Ollamas loaded since they started; None on a real Ollama."""
        if not self.ollamas:
            return None
        return sum(len(server.loaded_models()) - held for server, held in self.ollamas)


def start_model_servers(console: Console, stack: contextlib.ExitStack) -> ModelServers:
    """Start every :data:`FLEET` worker's servers, stopped when ``stack`` closes."""
    ollama_url = os.environ.get("OLLAMA_URL", "http://localhost:11434")
    real = _real_ollama(ollama_url)
    servers = ModelServers()
    for w in FLEET:
        servers.env[w.worker_id] = _start_for(w, stack, servers, ollama_url if real else None)
    kinds = ", ".join(f"{w.worker_id} {SERVER_LABELS[w.server]}" for w in FLEET)
    if real:
        console.print(
            f"Model servers: {kinds}; the real Ollama at {ollama_url}, [bold yellow]SIMULATED[/]"
            " vLLM and TEI (TEI's embeddings are real ones, WordLlama's)"
        )
    else:
        console.print(
            f"Model servers, [bold yellow]SIMULATED[/]: {kinds} (an Ollama loads a model in "
            f"{LOAD_DELAY_S:.0f} s; no language model runs; the embeddings are real ones, "
            "WordLlama's)"
        )
    return servers


def _start_for(
    w: DemoWorker, stack: contextlib.ExitStack, servers: ModelServers, real_ollama: str | None
) -> dict[str, str]:
    """Start ``w``'s servers; the settings that point its services at them."""
    from coordinator.sim.servers.ollama import SimulatedModelServer
    from coordinator.sim.servers.openai_api import SimulatedOpenAIServer
    from coordinator.sim.servers.tei import SimulatedTEIServer

    if w.server == "vllm":
        vllm = _started(stack, SimulatedOpenAIServer(w.worker_id, [w.in_memory]))
        # It serves one model, for generation: no OCR or embedding task is meant for it.
        return {**dict.fromkeys(_URL_SETTINGS, vllm.url), "WORKER_CAPABILITIES": "vllm"}
    ollama_url = real_ollama
    if ollama_url is None:
        held = [w.in_memory] if w.server == "ollama" else []
        ollama = SimulatedModelServer(
            w.worker_id, list(w.on_disk), models_in_memory=held, load_delay_s=LOAD_DELAY_S
        )
        servers.ollamas.append((_started(stack, ollama), len(held)))
        ollama_url = ollama.url
    env = dict.fromkeys(_URL_SETTINGS, ollama_url)
    if w.server == "tei":
        env["EMBEDDINGS_URL"] = _started(stack, SimulatedTEIServer(w.worker_id, w.in_memory)).url
    return env


def _started(stack: contextlib.ExitStack, server: S) -> S:
    server.start()
    stack.callback(server.stop)
    return server


def _real_ollama(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/version", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False
