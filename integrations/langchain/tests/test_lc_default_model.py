"""The real default model (slow): answers make sense, streams are token by token, the example agent saves tokens."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from d2l_memory import MemoryEngine, MemoryProvider
from d2l_memory.base_model import DEFAULT_BASE_MODEL
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_d2l import ChatD2L, shared_engine

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "langchain_agent.py"


@pytest.fixture(scope="module")
def engine() -> MemoryEngine:
    return shared_engine(DEFAULT_BASE_MODEL)


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("langchain_agent_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_default_model_answers_streams_and_counts(engine: MemoryEngine) -> None:
    llm = ChatD2L(max_tokens=16)  # by name: resolved through the shared cache to the same engine
    assert llm.memory_engine() is engine
    answer = llm.invoke("What is the capital of France?")
    assert "paris" in str(answer.content).lower()
    chunks = list(llm.stream("What is the capital of France?"))
    assert len(chunks) > 3  # pieces as they are decoded, then the usage chunk
    assert "".join(c.text for c in chunks) == answer.content
    assert answer.usage_metadata["output_tokens"] <= 16


def test_example_agent_keeps_the_prompt_short(engine: MemoryEngine, tmp_path: Path) -> None:
    example = _example()
    provider = MemoryProvider(engine, example.open_store(f"sqlite:///{tmp_path / 'index.db'}", str(tmp_path / "blobs")))
    llm = ChatD2L(provider=provider, max_tokens=6)
    report = example.run(llm, provider, facts=example.FACTS[:3], questions=("Where do I live?",), keep=2, show=False)
    assert report.compacted_messages >= 3
    last = report.turns[-1]
    assert last.prompt_tokens < last.full_prompt_tokens
    assert report.prompt_tokens < report.full_prompt_tokens
    assert len(report.reference) == 1
    assert report.hypernet_trained == engine.hypernet_trained


class TestChatD2LDefaultModel(ChatModelIntegrationTests):
    """LangChain's integration suite again, on the real default model (constructed by name)."""

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatD2L

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": DEFAULT_BASE_MODEL, "max_tokens": 4}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True
