"""Fixtures: a tiny seeded engine (from the core test suite) and a throwaway store per test."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from d2l_store import AdapterStore

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))

from tiny import tiny_engine  # noqa: E402

from d2l_memory import MemoryEngine, MemoryProvider, ProviderConfig  # noqa: E402
from llama_index.memory.d2l import clear_shared_cache  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    # Fast tests never touch the user's cache or default store; slow tests share the converted
    # default model (as `make setup` prepares it) but still get their own store.
    if not request.node.get_closest_marker("slow"):
        monkeypatch.setenv("D2L_MEMORY_HOME", str(tmp_path_factory.mktemp("d2l-home")))
    clear_shared_cache()
    yield
    clear_shared_cache()


@pytest.fixture()
def engine() -> MemoryEngine:
    torch.manual_seed(0)
    return tiny_engine()


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[AdapterStore]:
    s = AdapterStore.open(f"sqlite:///{tmp_path / 'index.db'}", tmp_path / "blobs")
    yield s
    s.close()


@pytest.fixture()
def provider(engine: MemoryEngine, store: AdapterStore) -> MemoryProvider:
    return MemoryProvider(engine, store, ProviderConfig(verbatim_messages=4, compact_block=2, rank_budget=64, top_k=2))
