"""LangChain's own standard suites, on the tiny in-process model (answer quality does not matter here).

Declared unsupported, not faked: tool calling and structured output (the default base model's chat
template has no tool format), image / audio / PDF inputs (text-only model), per-call model override
(one ChatD2L runs one loaded model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import ALICE, DOC_PARIS, DOC_TEAL, DOC_TOOL, chat_engine, make_provider
from d2l_memory import MemoryProvider
from langchain_core.language_models import BaseChatModel
from langchain_core.retrievers import BaseRetriever
from langchain_tests.integration_tests import ChatModelIntegrationTests, RetrieversIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_d2l import ChatD2L, D2LRetriever


class _Declared:
    """What ChatD2L supports, stated once for both suites."""

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatD2L

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": chat_engine()}

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


class TestChatD2LUnit(_Declared, ChatModelUnitTests):
    pass


class TestChatD2LIntegration(_Declared, ChatModelIntegrationTests):
    pass


class TestD2LRetrieverStandard(RetrieversIntegrationTests):
    @pytest.fixture(autouse=True)
    def _provider(self, tmp_path: Path) -> None:
        self.provider = make_provider(tmp_path)
        for doc in (DOC_PARIS, DOC_TEAL, DOC_TOOL):
            self.provider.add_document(doc, ALICE)

    @property
    def retriever_constructor(self) -> type[BaseRetriever]:
        return D2LRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        provider: MemoryProvider = self.provider
        return {"provider": provider, "scope": ALICE, "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "Where does Alice live?"
