"""Real text embeddings for the simulated model servers, computed with WordLlama.

WordLlama (https://github.com/dleemiller/WordLlama) ships its model inside its wheel: a
token-embedding table distilled from Llama 2 70B's (``l2_supercat``: 32,000 tokens by 256
dimensions, 16 MB) and Llama 2's tokenizer. A text's vector is the mean of its tokens'
vectors, computed on the CPU in microseconds, and still close texts land close together:
retrieval through the simulated servers finds the right document, which hash vectors
cannot. Nothing is downloaded, neither now nor at run time.

The model is read on first use, once per process (a few tenths of a second), so importing
the simulated servers stays cheap. :func:`vectors` also gives the old hash vectors, for
tests that want a vector size of their own or no model at all.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from coordinator.sim.servers.ollama_payloads import embedding

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray
    from tokenizers import Tokenizer

MODEL: Final = "wordllama/l2_supercat"
DIMENSIONS: Final = 256
_BEGIN_OF_TEXT: Final = "<s>"
_lock = threading.Lock()


@dataclass(frozen=True)
class _Model:
    table: NDArray[np.float32]
    """One row per token id."""
    tokenizer: Tokenizer
    begin_of_text: int


@functools.cache
def _read() -> _Model:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    # Importing wordllama calls logging.basicConfig(level=INFO): undone, so that the host
    # process (the demo's console, a test run) keeps its own logging.
    import wordllama
    from wordllama import WordLlama

    root.handlers = handlers
    root.setLevel(level)
    package = Path(wordllama.__file__).parent
    # The package itself as the cache: WordLlama looks for its tokenizer in tokenizer/ of
    # the package, but the wheel ships it in tokenizers/, so without this it downloads it
    # from Hugging Face. Downloads are off: a missing file is an error, not a fetch.
    loaded = WordLlama.load(cache_dir=package, disable_download=True)
    tokenizer: Tokenizer = loaded.tokenizer
    begin_of_text = tokenizer.token_to_id(_BEGIN_OF_TEXT)
    if begin_of_text is None:
        raise RuntimeError(f"WordLlama's tokenizer has no {_BEGIN_OF_TEXT} token")
    return _Model(loaded.embedding, tokenizer, begin_of_text)


def load() -> None:
    """Read the model now rather than at the first request (once per process)."""
    _model()


def _model() -> _Model:
    # functools.cache alone could read the model twice when two servers' first requests
    # race; reading it takes long enough for that to happen.
    with _lock:
        return _read()


def tokens(text: str) -> list[int]:
    """The token ids of ``text``, without the begin-of-text token (as WordLlama embeds)."""
    # A lone surrogate (JSON can carry one) cannot cross into the Rust tokenizer.
    clean = text.encode("utf-8", "replace").decode("utf-8")
    ids: list[int] = _model().tokenizer.encode(clean, add_special_tokens=False).ids
    return ids


def vector(ids: Sequence[int], *, normalize: bool = True) -> list[float]:
    """The mean of the tokens' vectors (the begin-of-text token's for no tokens, as a
    model that adds it would see an empty text), of unit length when ``normalize``."""
    model = _model()
    rows = model.table[list(ids) or [model.begin_of_text]]
    mean = rows.mean(axis=0)
    if normalize:
        norm = float((mean * mean).sum()) ** 0.5
        if norm > 0.0:
            mean = mean / norm
    values: list[float] = mean.tolist()
    return values


def embed(texts: Sequence[str], *, normalize: bool = True) -> list[list[float]]:
    """WordLlama's vectors of ``texts``: :data:`DIMENSIONS` floats each."""
    return [vector(tokens(text), normalize=normalize) for text in texts]


def vectors(texts: Sequence[str], dim: int | None = None) -> list[list[float]]:
    """Unit vectors of ``texts``: WordLlama's, or with ``dim`` hash vectors of that size
    (stable and cheap, but only an identical text is near)."""
    if dim is None:
        return embed(texts)
    return [embedding(text, dim) for text in texts]
