"""Old turns leave the prompt and become adapter chunks: the chat history and the agent middleware."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import ALICE, ALICE_CHAT, chat_engine
from d2l_memory import MemoryKind, MemoryProvider
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver

from langchain_d2l import ChatD2L, D2LChatMessageHistory, D2LCompactionMiddleware, plan_compaction

THINGS = ("gate", "safe", "desk", "bike", "vault", "wifi")
FACTS = [f"Fact {i}: the {thing} code is {1000 + 7 * i}." for i, thing in enumerate(THINGS)]


def _turns(n: int) -> list[HumanMessage | AIMessage]:
    out: list[HumanMessage | AIMessage] = []
    for i in range(n):
        out += [HumanMessage(FACTS[i % len(FACTS)]), AIMessage(f"Noted, fact {i}.")]
    return out


# ---- D2LChatMessageHistory ----------------------------------------------------------------------

def test_history_keeps_a_verbatim_window_and_compacts_the_rest(provider: MemoryProvider) -> None:
    history = D2LChatMessageHistory(provider, ALICE_CHAT)
    turns = _turns(3)
    history.add_messages(turns[:4])  # exactly the window (verbatim_messages=4)
    assert history.last_compaction is None and len(history.messages) == 4
    history.add_messages(turns[4:])  # 2 overflow = compact_block
    assert history.last_compaction is not None and history.last_compaction.messages == 2
    assert [m.content for m in history.messages] == [m.content for m in turns[2:]]
    assert [m.content for m in history.transcript()] == [m.content for m in turns]
    session = provider.session_memory(ALICE_CHAT)
    assert session is not None and session.kind == MemoryKind.COMPACTED_HISTORY

    # A ChatD2L in the same scope applies the compacted turns; the window goes into the prompt as text.
    answer = ChatD2L(provider=provider, scope=ALICE_CHAT).invoke([*history.messages, HumanMessage("Which codes?")])
    applied = answer.response_metadata["memory"]["memories"]
    assert [m["id"] for m in applied] == [session.id]


def test_history_round_trips_roles_and_needs_a_session(provider: MemoryProvider) -> None:
    with pytest.raises(ValueError, match="session"):
        D2LChatMessageHistory(provider, ALICE)
    history = D2LChatMessageHistory(provider, ALICE_CHAT)
    history.add_messages([SystemMessage("Be brief."), HumanMessage("hi"), AIMessage("hello"),
                          ToolMessage("42", tool_call_id="call-1")])
    got = history.messages
    assert [type(m) for m in got] == [SystemMessage, HumanMessage, AIMessage, ChatMessage]
    assert got[3].role == "tool" and got[3].content == "42"


def test_history_clear_forgets_the_session_only(provider: MemoryProvider) -> None:
    user_doc = provider.add_document("Alice lives in Paris. " * 3, ALICE).record.id
    history = D2LChatMessageHistory(provider, ALICE_CHAT)
    history.add_messages(_turns(4))
    assert provider.session_memory(ALICE_CHAT) is not None
    history.clear()
    assert history.messages == [] and history.transcript() == []
    assert provider.session_memory(ALICE_CHAT) is None
    assert [r.id for r in provider.visible_memories(ALICE)] == [user_doc]


def test_history_async_variants(provider: MemoryProvider) -> None:
    history = D2LChatMessageHistory(provider, ALICE_CHAT)

    async def run() -> tuple[int, int]:
        await history.aadd_messages(_turns(3))
        window = len(await history.aget_messages())
        await history.aclear()
        return window, len(await history.aget_messages())

    assert asyncio.run(run()) == (4, 0)


# ---- D2LCompactionMiddleware --------------------------------------------------------------------

def test_plan_keeps_tool_results_with_their_call() -> None:
    call = AIMessage("", tool_calls=[{"name": "lookup", "args": {"q": "x"}, "id": "c1"}])
    messages = [SystemMessage("sys"), HumanMessage("a"), call, ToolMessage("r", tool_call_id="c1"),
                AIMessage("b"), HumanMessage("c")]
    assert plan_compaction(messages, keep=4, block=2) == 0  # 5 conversation messages < 4 + 2
    assert plan_compaction(messages, keep=2, block=2) == 3  # cut lands on the ToolMessage: move past it
    assert plan_compaction(messages, keep=3, block=2) == 3
    assert plan_compaction(messages, keep=4, block=1) == 1


def test_middleware_compacts_old_messages_into_the_session(provider: MemoryProvider) -> None:
    middleware = D2LCompactionMiddleware(provider, ALICE_CHAT, keep_messages=3, compact_block=2)
    messages = [SystemMessage("You are terse."), *_turns(3)[:-1]]  # system + 5 conversation messages
    for i, m in enumerate(messages):
        m.id = f"m{i}"
    update = middleware.before_model({"messages": messages}, runtime=None)  # type: ignore[arg-type]
    assert update is not None
    remove_all, *kept = update["messages"]
    assert remove_all.type == "remove"
    assert [m.id for m in kept] == ["m0", "m3", "m4", "m5"]
    assert [m["content"] for m in provider.transcript(ALICE_CHAT)] == [FACTS[0], "Noted, fact 0."]
    assert provider.window(ALICE_CHAT) == []
    assert provider.session_memory(ALICE_CHAT) is not None
    assert middleware.before_model({"messages": kept}, runtime=None) is None  # type: ignore[arg-type]


def _agent(provider: MemoryProvider, middleware: list[Any]) -> Any:
    return create_agent(ChatD2L(provider=provider, max_tokens=4), middleware=middleware, checkpointer=InMemorySaver())


def test_agent_prompt_stays_short_without_llm_calls_on_write(
    provider: MemoryProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = chat_engine()
    decodes: list[int] = []
    original = engine.complete_batch

    def counted(questions, **kwargs):  # noqa: ANN001, ANN003, ANN202
        decodes.append(len(questions))
        return original(questions, **kwargs)

    monkeypatch.setattr(engine, "complete_batch", counted)
    compacting = _agent(provider, [D2LCompactionMiddleware(provider, ALICE_CHAT, keep_messages=3, compact_block=2)])
    keeping_all = _agent(provider, [])
    config = {"configurable": {"thread_id": "t1"}}
    for fact in FACTS:
        short = compacting.invoke({"messages": [HumanMessage(fact)]}, config)
        full = keeping_all.invoke({"messages": [HumanMessage(fact)]}, config)

    assert len(decodes) == 2 * len(FACTS)  # one decode per model call; compaction generated nothing
    assert len(short["messages"]) <= 3 + 2 and len(full["messages"]) == 2 * len(FACTS)
    # Nothing is lost: the compacted turns are in the transcript, the rest still in the agent state.
    logged = [m["content"] for m in provider.transcript(ALICE_CHAT) if m["role"] == "user"]
    assert logged + [str(m.content) for m in short["messages"] if m.type == "human"] == FACTS
    last_short, last_full = short["messages"][-1], full["messages"][-1]
    assert last_short.usage_metadata["input_tokens"] < last_full.usage_metadata["input_tokens"]
    # The middleware handed its scope to ChatD2L: the session's compacted turns were applied.
    session = provider.session_memory(ALICE_CHAT)
    assert [m["id"] for m in last_short.response_metadata["memory"]["memories"]] == [session.id]
    assert last_full.response_metadata["memory"] is None


def test_agent_async_path(provider: MemoryProvider) -> None:
    agent = _agent(provider, [D2LCompactionMiddleware(provider, ALICE_CHAT, keep_messages=2, compact_block=2)])
    config = {"configurable": {"thread_id": "t2"}}

    async def run() -> int:
        for fact in FACTS[:4]:
            state = await agent.ainvoke({"messages": [HumanMessage(fact)]}, config)
        return len(state["messages"])

    assert asyncio.run(run()) <= 4
    assert len(provider.transcript(ALICE_CHAT)) >= 4
