from __future__ import annotations

import asyncio

import pytest
from llama_index.core.llms import ChatMessage
from llama_index.core.prompts import PromptTemplate
from llamaindex_data import ALICE, BOB, DOC_PARIS, DOC_TEAL
from tiny import tiny_engine

import llama_index.memory.d2l._shared as shared
from d2l_memory import MemoryEngine, MemoryProvider
from llama_index.memory.d2l import D2LLLM, shared_engine

Q = "Where does Alice live?"


def test_metadata_is_read_from_the_model(engine: MemoryEngine) -> None:
    meta = D2LLLM(engine=engine, max_new_tokens=7).metadata
    assert meta.context_window == engine.model.config.max_position_embeddings == 512
    assert meta.num_output == 7 and meta.model_name == engine.base.name == "tiny-0"
    assert meta.is_chat_model and not meta.is_function_calling_model
    assert D2LLLM(engine=engine).to_dict()["base_model"] == "tiny-0"


def test_without_a_scope_it_is_the_plain_base_model(engine: MemoryEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared, "open_store", lambda *a: pytest.fail("no memories asked for: no store is opened"))
    done = D2LLLM(engine=engine, max_new_tokens=8).complete(Q)
    assert done.text == engine.generate(Q, max_new_tokens=8)
    assert done.additional_kwargs["memory_ids"] == [] and done.additional_kwargs["recall"] is None
    assert done.additional_kwargs["prompt_tokens"] == engine.count_prompt_tokens(Q)


def test_the_scope_recall_is_applied(provider: MemoryProvider) -> None:
    paris = provider.add_document(DOC_PARIS, ALICE).record
    provider.add_document(DOC_TEAL, BOB)
    done = D2LLLM(provider=provider, scope=ALICE, max_new_tokens=8).complete(Q)
    adapter = provider.recall(Q, ALICE).adapter
    assert done.additional_kwargs["memory_ids"] == [paris.id]  # Bob's memory is not visible
    assert done.text == provider.engine.generate(Q, memory=adapter, max_new_tokens=8)
    assert done.text != provider.engine.generate(Q, max_new_tokens=8)  # the adapter changed the answer
    # no document in the prompt
    assert done.additional_kwargs["prompt_tokens"] == provider.engine.count_prompt_tokens(Q)


def test_memories_per_call(provider: MemoryProvider) -> None:
    paris = provider.add_document(DOC_PARIS, ALICE).record
    teal = provider.add_document(DOC_TEAL, ALICE).record
    bob = provider.add_document(DOC_TEAL + " Bob", BOB).record
    llm = D2LLLM(provider=provider, max_new_tokens=4)
    assert llm.complete(Q).additional_kwargs["memory_ids"] == []
    assert llm.complete(Q, scope=BOB).additional_kwargs["memory_ids"] == [bob.id]
    assert llm.complete(Q, scope="acme/alice", memory_ids=[teal.id]).additional_kwargs["memory_ids"] == [teal.id]
    fixed = D2LLLM(provider=provider, scope=ALICE, memory_ids=[paris.id], max_new_tokens=4)
    assert fixed.complete(Q).additional_kwargs["memory_ids"] == [paris.id]
    with pytest.raises(ValueError, match="scope"):
        llm.complete(Q, memory_ids=[paris.id])


def test_chat_sends_the_messages_through_the_chat_template(provider: MemoryProvider) -> None:
    provider.add_document(DOC_PARIS, ALICE)
    llm = D2LLLM(provider=provider, scope=ALICE, max_new_tokens=8, system_prompt="Answer briefly.")
    messages = [ChatMessage(role="user", content="Hello"), ChatMessage(role="assistant", content="Hi."),
                ChatMessage(role="user", content=Q)]
    reply = llm.chat(messages)
    history = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello"},
               {"role": "assistant", "content": "Hi."}]
    expected = provider.engine.complete(Q, memory=provider.recall(Q, ALICE).adapter, history=history, max_new_tokens=8)
    assert reply.message.role == "assistant" and reply.message.content == expected.text
    assert reply.additional_kwargs["prompt_tokens"] == expected.prompt_tokens


def test_streams_add_up_to_the_complete_answer(provider: MemoryProvider) -> None:
    provider.add_document(DOC_PARIS, ALICE)
    llm = D2LLLM(provider=provider, scope=ALICE, max_new_tokens=12)
    full = llm.complete(Q).text
    parts = list(llm.stream_complete(Q))
    assert "".join(p.delta for p in parts).strip() == full and parts[-1].text.strip() == full
    chats = list(llm.stream_chat([ChatMessage(role="user", content=Q)]))
    assert chats[-1].message.content.strip() == full
    assert chats[-1].additional_kwargs["memory_ids"] == llm.complete(Q).additional_kwargs["memory_ids"]


def test_async_variants_match_and_release_the_engine(provider: MemoryProvider) -> None:
    provider.add_document(DOC_PARIS, ALICE)
    llm = D2LLLM(provider=provider, scope=ALICE, max_new_tokens=12)
    full = llm.complete(Q).text

    async def run() -> tuple[str, str, str, str]:
        done = await llm.acomplete(Q)
        chat = await llm.achat([ChatMessage(role="user", content=Q)])
        stream = await llm.astream_complete(Q)
        streamed = "".join([p.delta async for p in stream])
        early = await llm.astream_chat([ChatMessage(role="user", content=Q)])
        async for _ in early:
            break  # stop after the first piece: decoding must stop and the engine lock be released
        await early.aclose()
        return done.text, chat.message.content, streamed.strip(), (await llm.acomplete(Q)).text

    assert asyncio.run(asyncio.wait_for(run(), timeout=60)) == (full, full, full, full)


def test_it_works_inside_llama_index_calls(provider: MemoryProvider) -> None:
    provider.add_document(DOC_PARIS, ALICE)
    llm = D2LLLM(provider=provider, scope=ALICE, max_new_tokens=8)
    assert llm.predict(PromptTemplate("Where does {who} live?"), who="Alice") == llm.complete(Q).text


def test_weights_load_lazily_once_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[tuple[str, str | None]] = []

    def fake_from_pretrained(base_model: str, hypernet: str | None = None) -> MemoryEngine:
        loads.append((base_model, hypernet))
        return tiny_engine(seed=len(loads))

    monkeypatch.setattr(MemoryEngine, "from_pretrained", staticmethod(fake_from_pretrained))
    first, second = D2LLLM(base_model="tiny"), D2LLLM(base_model="tiny", max_new_tokens=3)
    other = D2LLLM(base_model="tiny", hypernet="elsewhere")
    assert loads == []  # nothing loads in a constructor
    assert first.engine is second.engine is shared_engine("tiny")
    assert other.engine is not first.engine
    assert loads == [("tiny", None), ("tiny", "elsewhere")]
    assert first.complete("Hi", max_new_tokens=2).additional_kwargs["completion_tokens"] <= 2
