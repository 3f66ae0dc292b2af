"""Fixtures: a tiny in-process engine (tests/tiny.py of the repo) and throwaway stores."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from d2l_memory import ChunkConfig, GenerationConfig, MemoryEngine, MemoryProvider, ProviderConfig, Scope
from d2l_memory.checkpoint import hypernet_id_of
from d2l_store import AdapterStore

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))

from tiny import tiny_base, tiny_hypernet  # noqa: E402

ALICE = Scope(tenant="acme", user="alice")
BOB = Scope(tenant="acme", user="bob")
ALICE_CHAT = Scope(tenant="acme", user="alice", session="chat-1")
DOC_PARIS = "Alice lives in Paris and works as a baker since 1999. " * 3
DOC_TEAL = "What is the favourite colour of Bob? It is teal. " * 3
DOC_TOOL = "Tool docs: call search(query, limit=10) to find items; errors raise NotFound. " * 3


@functools.cache
def chat_engine() -> MemoryEngine:
    """A tiny engine whose greedy answers are not empty (the tied-embedding tiny model only emits
    newlines, and the standard suites require content). Shared: tests never mutate it."""
    base = tiny_base(0, tie=False)
    net = tiny_hypernet(base.model, 0)
    return MemoryEngine(base, net, hypernet_id=hypernet_id_of(net), chunking=ChunkConfig(chunk_tokens=16),
                        generation=GenerationConfig(max_new_tokens=8))


def open_test_store(root: Path) -> AdapterStore:
    return AdapterStore.open(f"sqlite:///{root / 'index.db'}", root / "blobs")


def make_provider(root: Path, **config: int) -> MemoryProvider:
    settings = {"verbatim_messages": 4, "compact_block": 2, "rank_budget": 64, "top_k": 2, **config}
    return MemoryProvider(chat_engine(), open_test_store(root), ProviderConfig(**settings))


@pytest.fixture()
def provider(tmp_path: Path) -> Iterator[MemoryProvider]:
    p = make_provider(tmp_path)
    yield p
    p.store.close()


@pytest.fixture(autouse=True)
def _isolated_home(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in the repo's tests/conftest.py: fast tests never touch the user's cache or store.
    if request.node.get_closest_marker("slow"):
        return
    monkeypatch.setenv("D2L_MEMORY_HOME", str(tmp_path_factory.mktemp("d2l-home")))


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> Iterator[None]:
    """Mark coroutine tests (the standard suites' async ones) for pytest-asyncio, which runs in
    strict mode for this repository. Runs inside pytest-asyncio's wrapper, before it looks."""
    outcome = yield
    if not inspect.iscoroutinefunction(obj):
        return
    items = outcome.get_result()
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, pytest.Function):
            item.add_marker(pytest.mark.asyncio)
