"""Shared fixtures: tiny seeded engines built in-process (no downloads, no weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_base, tiny_engine  # noqa: E402

from d2l_memory import MemoryEngine  # noqa: E402
from d2l_memory.base_model import LoadedBaseModel  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_home(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fast tests never touch the user's cache; slow tests share it, so the default model is
    # converted once per machine (as `make setup` does), not once per test.
    if request.node.get_closest_marker("slow"):
        return
    monkeypatch.setenv("D2L_MEMORY_HOME", str(tmp_path_factory.mktemp("d2l-home")))


@pytest.fixture()
def base() -> LoadedBaseModel:
    return tiny_base()


@pytest.fixture()
def engine() -> MemoryEngine:
    torch.manual_seed(0)
    return tiny_engine()
