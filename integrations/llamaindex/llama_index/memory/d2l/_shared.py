"""What the LlamaIndex classes share: the process-wide model cache, scopes, and a thread-to-async bridge.

Model cache: loading a base model and its hypernetwork takes seconds and hundreds of MB, so every
``D2LLLM`` / ``D2LQueryEngine`` / ``D2LMemoryBlock`` built from names (not from an existing engine or
provider) shares one ``MemoryEngine`` per (base model, hypernetwork) and one ``MemoryProvider`` per
(engine, store) in this process. Nothing is loaded at import or in a constructor: the first call
that needs the model loads it. ``clear_shared_cache()`` drops the cache (the objects stay alive while
anything still references them).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from d2l_memory import MemoryEngine, MemoryProvider, ProviderConfig, Scope
from d2l_memory.base_model import DEFAULT_BASE_MODEL
from d2l_memory.storage import open_store

logger = logging.getLogger(__name__)

T = TypeVar("T")
_SCOPE_FIELDS = ("tenant", "user", "agent", "session")

_lock = threading.Lock()
_engines: dict[tuple[str, str | None], MemoryEngine] = {}
_providers: dict[tuple[str, str | None, str | None, str | None], MemoryProvider] = {}


def shared_engine(base_model: str = DEFAULT_BASE_MODEL, hypernet: str | None = None) -> MemoryEngine:
    """The process-wide engine for this base model and hypernetwork, loaded on first use."""
    key = (base_model, hypernet)
    with _lock:
        if key not in _engines:
            logger.info("loading %s (hypernetwork %s) into the shared cache", base_model, hypernet or "shipped")
            _engines[key] = MemoryEngine.from_pretrained(base_model=base_model, hypernet=hypernet)
        return _engines[key]


def shared_provider(
    base_model: str = DEFAULT_BASE_MODEL,
    hypernet: str | None = None,
    index_url: str | None = None,
    blob_root: str | None = None,
) -> MemoryProvider:
    """The process-wide provider over the shared engine and this store (the default store when None)."""
    engine = shared_engine(base_model, hypernet)
    key = (base_model, hypernet, index_url, blob_root)
    with _lock:
        if key not in _providers:
            _providers[key] = MemoryProvider(engine, open_store(index_url, blob_root), ProviderConfig())
        return _providers[key]


def clear_shared_cache() -> None:
    """Forget the shared engines and providers (the next use loads again)."""
    with _lock:
        _engines.clear()
        _providers.clear()


@dataclass
class ProviderRef:
    """Where a component gets its model and memories: given objects, or names resolved lazily.

    An explicit ``provider`` wins; an explicit ``engine`` gets a provider of its own over the store
    named here, opened only when memories are first needed; otherwise both come from the shared cache.
    """

    provider: MemoryProvider | None = None
    engine: MemoryEngine | None = None
    base_model: str = DEFAULT_BASE_MODEL
    hypernet: str | None = None
    index_url: str | None = None
    blob_root: str | None = None

    def __post_init__(self) -> None:
        if self.provider is not None and self.engine is not None and self.provider.engine is not self.engine:
            raise ValueError("engine and provider disagree: pass the provider alone (its engine is provider.engine)")

    def get_engine(self) -> MemoryEngine:
        if self.provider is not None:
            return self.provider.engine
        if self.engine is None:
            self.engine = shared_engine(self.base_model, self.hypernet)
        return self.engine

    def get_provider(self) -> MemoryProvider:
        if self.provider is None:
            if self.engine is None:
                self.provider = shared_provider(self.base_model, self.hypernet, self.index_url, self.blob_root)
            else:
                store = open_store(self.index_url, self.blob_root)
                self.provider = MemoryProvider(self.engine, store, ProviderConfig())
        return self.provider


def as_scope(value: Scope | Mapping[str, str] | str) -> Scope:
    """A Scope from a Scope, a mapping of its fields, or ``"tenant/user/agent/session"`` (trailing parts optional)."""
    if isinstance(value, Scope):
        return value
    if isinstance(value, str):
        parts = value.split("/") if value else []
        if len(parts) > len(_SCOPE_FIELDS):
            raise ValueError(f"scope {value!r} has more than 4 parts (tenant/user/agent/session)")
        return Scope(**dict(zip(_SCOPE_FIELDS, parts, strict=False)))
    if isinstance(value, Mapping):
        return Scope(**value)
    raise TypeError(f"scope must be a Scope, a mapping or 'tenant/user/agent/session', got {type(value).__name__}")


_END = object()


async def iterate_in_thread(make: Callable[[], Iterator[T]]) -> AsyncGenerator[T, None]:
    """Run a blocking iterator in one worker thread and yield its items without blocking the event loop.

    One thread for the whole iteration matters: the engine holds its lock for the length of a stream,
    and a lock must be released by the thread that took it. Closing this async iterator early closes
    the blocking one too, which stops decoding.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
    stop = threading.Event()

    def put(item: Any, error: BaseException | None = None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
        except RuntimeError:  # the loop is gone: nobody is listening any more
            stop.set()

    def pump() -> None:
        try:
            items = make()
            try:
                for item in items:
                    if stop.is_set():
                        break
                    put(item)
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the consumer
            put(_END, exc)
        else:
            put(_END)

    worker = threading.Thread(target=pump, name="d2l-stream", daemon=True)
    worker.start()
    try:
        while True:
            item, error = await queue.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        await asyncio.to_thread(worker.join)
