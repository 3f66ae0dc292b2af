"""ChatD2L behaviour on the tiny model: prompts, memories, streaming, stops, laziness, async safety."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import ALICE, BOB, DOC_PARIS, DOC_TEAL, chat_engine
from d2l_memory import GenerationConfig, MemoryEngine, MemoryProvider
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage

import langchain_d2l._shared as shared
from langchain_d2l import ChatD2L, clear_shared
from langchain_d2l.chat_models import trimmed

QUESTION = "Where does Alice live?"


def test_messages_become_history_and_question() -> None:
    engine = chat_engine()
    messages = [SystemMessage("Be brief."), HumanMessage("Hi"), AIMessage("Hello."), HumanMessage(QUESTION)]
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}]
    expected = engine.complete(QUESTION, history=history)
    result = ChatD2L(engine=engine).invoke(messages)
    assert result.content == expected.text
    n_in, n_out = expected.prompt_tokens, expected.completion_tokens
    assert result.usage_metadata == {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}
    assert result.response_metadata["model_name"] == engine.base.name
    assert result.response_metadata["memory"] is None


def test_conversation_must_end_with_a_human_message() -> None:
    llm = ChatD2L(engine=chat_engine())
    with pytest.raises(ValueError, match="ends with a AIMessage"):
        llm.invoke([HumanMessage("hi"), AIMessage("hello")])
    with pytest.raises(ValueError, match="ToolMessage"):
        llm.invoke([HumanMessage("hi"), ToolMessage("42", tool_call_id="1")])


def test_scope_memories_are_applied(provider: MemoryProvider) -> None:
    doc = provider.add_document(DOC_PARIS, ALICE).record
    recall = provider.recall(QUESTION, ALICE)
    expected = provider.engine.complete(QUESTION, memory=recall.adapter)
    bare = provider.engine.complete(QUESTION)
    assert expected.text != bare.text  # the tiny hypernetwork's adapters do change the answer

    result = ChatD2L(provider=provider, scope=ALICE).invoke(QUESTION)
    assert result.content == expected.text
    assert [m["id"] for m in result.response_metadata["memory"]["memories"]] == [doc.id]
    assert ChatD2L(provider=provider).invoke(QUESTION, scope=ALICE.as_dict()).content == expected.text
    # Another user's scope sees none of Alice's memories: the base model answers.
    other = ChatD2L(provider=provider, scope=BOB).invoke(QUESTION)
    assert other.content == bare.text and other.response_metadata["memory"]["memories"] == []


def test_memory_ids_per_call_apply_exactly_those(provider: MemoryProvider) -> None:
    paris = provider.add_document(DOC_PARIS, ALICE).record
    teal = provider.add_document(DOC_TEAL, ALICE).record
    llm = ChatD2L(provider=provider, scope=ALICE)
    result = llm.invoke(QUESTION, memory_ids=[teal.id])
    applied = result.response_metadata["memory"]["memories"]
    assert [m["id"] for m in applied] == [teal.id] and applied[0]["reason"] == "requested explicitly"
    _, adapter = provider.get_memory(teal.id)
    assert result.content == provider.engine.complete(QUESTION, memory=adapter).text
    bound = llm.bind(memory_ids=[paris.id]).invoke(QUESTION)
    assert [m["id"] for m in bound.response_metadata["memory"]["memories"]] == [paris.id]


def test_hybrid_snippets_put_source_chunks_in_the_prompt(provider: MemoryProvider) -> None:
    provider.add_document(DOC_PARIS, ALICE)
    plain = ChatD2L(provider=provider, scope=ALICE).invoke(QUESTION)
    hybrid = ChatD2L(provider=provider, scope=ALICE, snippets=2).invoke(QUESTION)
    assert len(hybrid.response_metadata["memory"]["snippets"]) == 2
    assert hybrid.usage_metadata["input_tokens"] > plain.usage_metadata["input_tokens"]


def test_stream_concatenates_to_invoke_and_ends_with_usage(provider: MemoryProvider) -> None:
    provider.add_document(DOC_PARIS, ALICE)
    llm = ChatD2L(provider=provider, scope=ALICE, max_tokens=12)
    chunks = list(llm.stream(QUESTION))
    full = chunks[0]
    for c in chunks[1:]:
        full += c
    assert len(chunks) >= 2 and all(isinstance(c, AIMessageChunk) for c in chunks)
    assert full.content == llm.invoke(QUESTION).content
    assert chunks[-1].chunk_position == "last" and chunks[-1].content == ""
    assert full.usage_metadata["input_tokens"] == llm.invoke(QUESTION).usage_metadata["input_tokens"]
    assert 0 < full.usage_metadata["output_tokens"] <= 12 + 2  # re-tokenised text may merge or split a token


def test_stop_sequences_cut_invoke_and_stream() -> None:
    llm = ChatD2L(engine=chat_engine(), max_tokens=16)
    text = llm.invoke(QUESTION).content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    expected = text[: text.find(stop)].strip()
    assert llm.invoke(QUESTION, stop=[stop]).content == expected
    assert ChatD2L(engine=chat_engine(), max_tokens=16, stop=[stop]).invoke(QUESTION).content == expected
    assert "".join(c.text for c in llm.stream(QUESTION, stop=[stop])) == expected


def test_max_tokens_and_temperature_reach_the_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = chat_engine()
    seen: list[GenerationConfig] = []
    original = engine.complete

    def spy(question, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append(kwargs["generation"])
        return original(question, **kwargs)

    monkeypatch.setattr(engine, "complete", spy)
    llm = ChatD2L(engine=engine, max_tokens=5, temperature=0.7, top_p=0.9, stop=["x"])
    result = llm.invoke("hi")
    assert seen[-1] == GenerationConfig(max_new_tokens=5, temperature=0.7, top_p=0.9, stop=("x",))
    assert result.usage_metadata["output_tokens"] <= 5
    llm.invoke("hi", max_tokens=3, temperature=0.0)
    assert (seen[-1].max_new_tokens, seen[-1].temperature) == (3, 0.0)


def test_streaming_flag_streams_invoke_through_callbacks() -> None:
    tokens: list[str] = []

    class Collect(BaseCallbackHandler):
        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            tokens.append(token)

    llm = ChatD2L(engine=chat_engine(), max_tokens=12)
    streamed = ChatD2L(engine=chat_engine(), max_tokens=12, streaming=True).invoke(QUESTION, {"callbacks": [Collect()]})
    assert streamed.content == llm.invoke(QUESTION).content == "".join(tokens)
    assert streamed.usage_metadata is not None


def test_tokens_are_counted_with_the_base_models_tokenizer() -> None:
    llm = ChatD2L(engine=chat_engine())
    assert llm.get_num_tokens("Alice lives in Paris.") == len(chat_engine().tokenizer.encode("Alice lives in Paris."))


def test_bad_call_arguments_are_refused() -> None:
    llm = ChatD2L(engine=chat_engine())
    with pytest.raises(TypeError, match="unexpected call arguments \\['memoryids'\\]"):
        llm.invoke("hi", memoryids=["x"])
    with pytest.raises(ValueError, match="cannot switch"):
        llm.invoke("hi", model="another-model")
    with pytest.raises(NotImplementedError):
        llm.bind_tools([])


def test_construction_is_lazy_and_named_models_share_one_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[tuple[str, str | None]] = []

    def fake_from_pretrained(base_model: str, hypernet: str | None = None) -> MemoryEngine:
        loads.append((base_model, hypernet))
        return chat_engine()

    clear_shared()
    monkeypatch.setattr(shared.MemoryEngine, "from_pretrained", fake_from_pretrained)
    try:
        a, b = ChatD2L(model="some-model"), ChatD2L(model="some-model", temperature=0.5)
        assert loads == []
        a.invoke("hi")
        b.invoke("hi")
        assert loads == [("some-model", None)]
        assert a.memory_engine() is b.memory_engine()
        assert a.memory_provider() is b.memory_provider()  # the default store, under the test's D2L home
        ChatD2L(model="other-model").invoke("hi")
        assert loads == [("some-model", None), ("other-model", None)]
    finally:
        clear_shared()


def test_batch_matches_single_calls(provider: MemoryProvider) -> None:
    provider.add_document(DOC_PARIS, ALICE)
    llm = ChatD2L(provider=provider, scope=ALICE)
    questions = [QUESTION, "What colour?", "hi"]
    assert [m.content for m in llm.batch(questions)] == [llm.invoke(q).content for q in questions]


def test_streams_closed_early_release_the_engine() -> None:
    llm = ChatD2L(engine=chat_engine(), max_tokens=64)
    stream = llm.stream("hi")
    next(stream)
    stream.close()  # decoding stops; the engine lock is released in this thread

    async def run() -> list[str]:
        async for _ in llm.astream("hi"):
            break  # leaving an async stream early must not leave the engine locked either
        done = await asyncio.gather(llm.ainvoke("hi", max_tokens=4), llm.ainvoke("hey", max_tokens=4))
        return [str(m.content) for m in done]

    assert len(asyncio.run(asyncio.wait_for(run(), timeout=60))) == 2
    assert llm.invoke("hi", max_tokens=4).content == ChatD2L(engine=chat_engine(), max_tokens=4).invoke("hi").content


def test_trimmed_stream_equals_stripped_text() -> None:
    for pieces in (["  ", "\nHello", " ", "world", " \n", ""], ["a"], [" ", "\n"], ["x ", " y", "  "]):
        raw: list[str] = []
        assert "".join(trimmed(pieces, raw)) == "".join(pieces).strip()
        assert raw == pieces
