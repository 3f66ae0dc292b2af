"""The process-wide cache that lets LangChain components share one model in memory.

Components constructed by *name* (``ChatD2L(model="smollm2-135m-instruct")``) load nothing until
their first call, then ask this module for the engine. Every component naming the same
``(base_model, hypernet)`` pair gets the same MemoryEngine, and every one naming the same engine
and store location gets the same MemoryProvider. Components handed an engine or a provider
explicitly never touch this cache. ``clear_shared()`` drops it (the weights are freed once no
component refers to them any more).
"""

from __future__ import annotations

import functools
import logging
import threading

from d2l_memory import MemoryEngine, MemoryProvider, ProviderConfig
from d2l_memory.storage import open_store

logger = logging.getLogger(__name__)

_lock = threading.Lock()


@functools.cache
def _engine(base_model: str, hypernet: str | None) -> MemoryEngine:
    logger.info("loading base model %s (hypernetwork %s) for LangChain", base_model, hypernet or "shipped")
    return MemoryEngine.from_pretrained(base_model=base_model, hypernet=hypernet)


@functools.cache
def _provider(base_model: str, hypernet: str | None, index_url: str | None, blob_root: str | None) -> MemoryProvider:
    return MemoryProvider(_engine(base_model, hypernet), open_store(index_url, blob_root), ProviderConfig())


def shared_engine(base_model: str, hypernet: str | None = None) -> MemoryEngine:
    """The one engine of this process for ``(base_model, hypernet)``, loaded on first use."""
    with _lock:  # functools.cache alone could load the same weights twice from two threads
        return _engine(base_model, hypernet)


def shared_provider(
    base_model: str, hypernet: str | None = None, index_url: str | None = None, blob_root: str | None = None
) -> MemoryProvider:
    """The one provider of this process for this engine and store (default store: $D2L_MEMORY_HOME/store)."""
    with _lock:
        return _provider(base_model, hypernet, index_url, blob_root)


def clear_shared() -> None:
    with _lock:
        _provider.cache_clear()
        _engine.cache_clear()
