from __future__ import annotations

import asyncio

import pytest
from llama_index.core.llms import ChatMessage
from llama_index.core.memory import Memory
from llamaindex_data import ALICE, DOC_PARIS

from d2l_memory import MemoryKind, MemoryProvider, ProviderConfig, Scope
from llama_index.memory.d2l import D2LLLM, D2LMemoryBlock

SESSION = Scope(tenant="acme", user="alice", session="s1")


def _memory(block: D2LMemoryBlock) -> Memory:
    # A small short-term buffer, so a few turns overflow it and get flushed to the block.
    return Memory.from_defaults(session_id="s1", token_limit=80, chat_history_token_ratio=0.5, token_flush_size=20,
                                memory_blocks=[block])


def _talk(memory: Memory, turns: int) -> None:
    for i in range(turns):
        memory.put(ChatMessage(role="user", content=f"Message {i}: remember that the launch code is {1000 + i}."))
        memory.put(ChatMessage(role="assistant", content=f"Noted, code {1000 + i}."))


def test_flushed_messages_become_the_sessions_memory(provider: MemoryProvider) -> None:
    memory = _memory(D2LMemoryBlock(provider=provider, scope=SESSION))
    _talk(memory, 6)
    active = memory.get_all(status=None)
    buffered = [m.content for m in memory.get()]
    flushed = provider.transcript(SESSION)
    assert 0 < len(flushed) < len(active)
    assert provider.window(SESSION) == []  # nothing flushed stays verbatim on the d2l side
    assert all(m["content"] not in buffered for m in flushed)  # flushed = left the prompt
    record = provider.session_memory(SESSION)
    assert record is not None and record.kind == MemoryKind.COMPACTED_HISTORY
    text = "".join(provider.chunk_texts(record))
    assert all(m["content"] in text for m in flushed)


def test_get_reports_what_is_active_in_a_short_note(provider: MemoryProvider) -> None:
    provider = MemoryProvider(provider.engine, provider.store, ProviderConfig(rank_budget=512))  # room for both
    provider.add_document(DOC_PARIS, ALICE, name="paris.md")
    block = D2LMemoryBlock(provider=provider, scope=SESSION)
    note = asyncio.run(block.aget([ChatMessage(role="user", content="Hi")]))
    assert note == "Recalled from memory (applied as adapters, not shown here): paris.md."
    memory = _memory(block)
    _talk(memory, 6)
    system = memory.get(input="What is the launch code?")[0]
    assert system.role == "system" and "earlier conversation (" in system.content and "paris.md" in system.content
    silent = D2LMemoryBlock(provider=provider, scope=SESSION, note_template=None)
    assert asyncio.run(silent.aget([ChatMessage(role="user", content="Hi")])) == ""


def test_nothing_in_scope_means_nothing_in_the_prompt(provider: MemoryProvider) -> None:
    memory = _memory(D2LMemoryBlock(provider=provider, scope=SESSION))
    memory.put(ChatMessage(role="user", content="Hello"))
    assert [m.role for m in memory.get()] == ["user"]


def test_the_llm_in_the_same_scope_applies_the_flushed_conversation(provider: MemoryProvider) -> None:
    llm = D2LLLM(provider=provider, scope=SESSION, max_new_tokens=8)
    memory = _memory(D2LMemoryBlock.from_llm(llm))
    _talk(memory, 6)
    question = "What was the first launch code?"
    memory.put(ChatMessage(role="user", content=question))
    messages = memory.get()
    reply = llm.chat(messages)
    session_memory = provider.session_memory(SESSION)
    assert session_memory is not None and reply.additional_kwargs["memory_ids"] == [session_memory.id]
    history = [{"role": m.role.value, "content": m.content} for m in messages[:-1]]
    expected = provider.engine.complete(
        question, memory=provider.recall(question, SESSION).adapter, history=history, max_new_tokens=8
    )
    assert reply.message.content == expected.text and reply.additional_kwargs["prompt_tokens"] == expected.prompt_tokens


def test_empty_messages_are_skipped_and_a_scope_is_required(provider: MemoryProvider) -> None:
    block = D2LMemoryBlock(provider=provider, scope="acme/alice/agent/s2")
    asyncio.run(block.aput([ChatMessage(role="assistant", content=""), ChatMessage(role="user", content="Keep this.")]))
    assert provider.transcript(block.scope) == [{"role": "user", "content": "Keep this."}]
    with pytest.raises(ValueError, match="scope"):
        D2LMemoryBlock.from_llm(D2LLLM(provider=provider))
