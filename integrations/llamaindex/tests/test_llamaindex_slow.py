"""The integration on the real default base model (SmolLM2-135M-Instruct, converted once by `make setup`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from d2l_store import AdapterStore
from llama_index.core import Document
from llama_index.core.llms import ChatMessage
from llama_index.core.memory import Memory

from d2l_memory import MemoryEngine, MemoryProvider, ProviderConfig, Scope
from llama_index.memory.d2l import D2LLLM, D2LMemoryBlock, D2LQueryEngine

pytestmark = pytest.mark.slow

NOTES = Scope(tenant="slow", user="ann")
FACTS = [
    "The Zorbel project launches on 14 March. Its launch code is 4417 and the lead engineer is Mira Olsen.",
    "The cafeteria on floor 3 serves lentil soup every Tuesday. It closes at 2 pm on Fridays.",
]


@pytest.fixture(scope="module")
def default_engine() -> MemoryEngine:
    return MemoryEngine.from_pretrained()


@pytest.fixture()
def provider(default_engine: MemoryEngine, tmp_path: Path) -> Iterator[MemoryProvider]:
    store = AdapterStore.open(f"sqlite:///{tmp_path / 'index.db'}", tmp_path / "blobs")
    yield MemoryProvider(default_engine, store, ProviderConfig())
    store.close()


def test_llm_metadata_and_answers_on_the_default_model(default_engine: MemoryEngine) -> None:
    llm = D2LLLM(engine=default_engine, max_new_tokens=8)
    meta = llm.metadata
    assert meta.context_window == 8192 and meta.num_output == 8 and meta.model_name == "smollm2-135m-instruct"
    assert "Paris" in llm.complete("What is the capital of France? Answer in one word.").text
    chat = llm.chat([ChatMessage(role="system", content="You answer in one word."),
                     ChatMessage(role="user", content="What is the capital of France?")])
    assert "Paris" in chat.message.content


def test_query_engine_prompt_is_the_question_alone(provider: MemoryProvider) -> None:
    docs = [Document(text=t, metadata={"file_path": f"fact{i}.md"}) for i, t in enumerate(FACTS)]
    question = "What is the launch code of the Zorbel project?"
    adapters = D2LQueryEngine.from_documents(docs, NOTES, provider=provider, max_new_tokens=8).query(question)
    hybrid = D2LQueryEngine(NOTES, provider=provider, hybrid=True, max_new_tokens=8).query(question)
    in_context = provider.engine.count_prompt_tokens(question, context="\n\n".join(FACTS))
    assert adapters.metadata["prompt_tokens"] < hybrid.metadata["prompt_tokens"] <= in_context
    assert len(adapters.metadata["memory_ids"]) == 2 and adapters.source_nodes
    assert "Zorbel" in adapters.source_nodes[0].node.text  # best BM25 match first
    shown = [n.node.text for n in hybrid.source_nodes if n.node.metadata["in_prompt"]]
    assert any("4417" in t for t in shown) and adapters.response and hybrid.response


def test_memory_block_flow_on_the_default_model(provider: MemoryProvider) -> None:
    session = Scope(tenant="slow", user="ann", session="chat")
    llm = D2LLLM(provider=provider, scope=session, max_new_tokens=8)
    memory = Memory.from_defaults(session_id="chat", token_limit=120, chat_history_token_ratio=0.5, token_flush_size=40,
                                  memory_blocks=[D2LMemoryBlock.from_llm(llm)])
    for i, fact in enumerate(FACTS * 2):
        memory.put(ChatMessage(role="user", content=f"Note {i}: {fact}"))
        memory.put(ChatMessage(role="assistant", content="Noted."))
    memory.put(ChatMessage(role="user", content="What is the launch code?"))
    reply = llm.chat(memory.get())
    record = provider.session_memory(session)
    assert record is not None and reply.additional_kwargs["memory_ids"] == [record.id]
    assert reply.message.content.strip()
