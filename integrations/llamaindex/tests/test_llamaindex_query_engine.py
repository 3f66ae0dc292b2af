from __future__ import annotations

import asyncio

import pytest
from llama_index.core import Document
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import TextNode
from llama_index.core.tools import QueryEngineTool
from llamaindex_data import ALICE, BOB, DOC_PARIS, DOC_TEAL, DOC_TOOL

from d2l_memory import MemoryKind, MemoryProvider
from llama_index.memory.d2l import D2LQueryEngine
from llama_index.memory.d2l.query_engine import _rejoin

Q = "Where does Alice live?"


def _docs() -> list[Document]:
    return [Document(text=DOC_PARIS, metadata={"file_path": "/notes/paris.md", "year": 1999}),
            Document(text=DOC_TEAL, metadata={"file_path": "/notes/teal.md"})]


def test_built_from_documents_like_an_index(provider: MemoryProvider) -> None:
    qe = D2LQueryEngine.from_documents(_docs(), ALICE, provider=provider)
    records = provider.list_memories(ALICE)
    assert {r.metadata["name"] for r in records} == {"/notes/paris.md", "/notes/teal.md"}
    assert next(r for r in records if r.metadata["name"] == "/notes/paris.md").metadata["year"] == 1999
    assert [r.status for r in qe.insert_documents(_docs())] == ["unchanged", "unchanged"]  # nothing re-encoded
    changed = qe.insert(Document(text=DOC_TOOL, metadata={"file_path": "/notes/teal.md"}))
    assert changed.status == "superseded" and len(provider.list_memories(ALICE)) == 2
    assert provider.list_memories(BOB) == []


def test_answers_from_adapters_and_the_question_alone(provider: MemoryProvider) -> None:
    qe = D2LQueryEngine.from_documents(_docs(), ALICE, provider=provider, max_new_tokens=8)
    response = qe.query(Q)
    assert isinstance(response, Response)
    recall = provider.recall(Q, ALICE)
    assert response.response == provider.engine.generate(Q, memory=recall.adapter, max_new_tokens=8)
    assert response.metadata["prompt_tokens"] == provider.engine.count_prompt_tokens(Q)
    assert set(response.metadata["memory_ids"]) == {r.id for r in provider.list_memories(ALICE)}
    # source nodes: every activated chunk, best BM25 match first, none of them in the prompt
    n_chunks = sum(len(s.chunks) for s in recall.selections)
    assert len(response.source_nodes) == n_chunks
    scores = [n.score for n in response.source_nodes]
    assert scores == sorted(scores, reverse=True) and "Alice" in response.source_nodes[0].node.text
    assert all(n.node.metadata["activation"] and not n.node.metadata["in_prompt"] for n in response.source_nodes)
    assert [n.node.node_id for n in qe.retrieve(Q)] == [n.node.node_id for n in response.source_nodes]


def test_hybrid_adds_the_best_snippets_to_the_prompt(provider: MemoryProvider) -> None:
    # Every word of the question is in the chunks that say "teal" (the others share only "is").
    question = "Is it teal for Bob?"
    plain = D2LQueryEngine.from_documents(_docs(), ALICE, provider=provider, max_new_tokens=8)
    hybrid = D2LQueryEngine(ALICE, provider=provider, hybrid=True, max_new_tokens=8)
    a, b = plain.query(question), hybrid.query(question)
    shown = [n for n in b.source_nodes if n.node.metadata["in_prompt"]]
    assert shown and "teal" in shown[0].node.text
    assert b.metadata["prompt_tokens"] > a.metadata["prompt_tokens"]
    recall = provider.recall(question, ALICE, snippets=len(shown))
    context = "\n\n".join(s.text.strip() for s in recall.snippets)
    assert b.response == provider.engine.generate(
        question, memory=recall.adapter, context=context, max_new_tokens=8
    )


def test_memory_ids_pin_what_is_applied(provider: MemoryProvider) -> None:
    D2LQueryEngine.from_documents(_docs(), ALICE, provider=provider)
    teal = next(r for r in provider.list_memories(ALICE) if r.metadata["name"] == "/notes/teal.md")
    response = D2LQueryEngine(ALICE, provider=provider, memory_ids=[teal.id], max_new_tokens=2).query(Q)
    assert response.metadata["memory_ids"] == [teal.id]
    assert {n.node.metadata["memory_id"] for n in response.source_nodes} == {teal.id}


def test_streaming_and_async(provider: MemoryProvider) -> None:
    D2LQueryEngine.from_documents(_docs(), ALICE, provider=provider)
    full = D2LQueryEngine(ALICE, provider=provider, max_new_tokens=12).query(Q).response
    streaming = D2LQueryEngine(ALICE, provider=provider, max_new_tokens=12, streaming=True)
    streamed = streaming.query(Q)
    assert isinstance(streamed, StreamingResponse) and streamed.source_nodes
    assert "".join(streamed.response_gen).strip() == full

    async def run() -> tuple[str, str]:
        done = await D2LQueryEngine(ALICE, provider=provider, max_new_tokens=12).aquery(Q)
        stream = await streaming.aquery(Q)
        assert isinstance(stream, AsyncStreamingResponse) and stream.metadata["memory_ids"]
        return done.response, "".join([piece async for piece in stream.async_response_gen()]).strip()

    assert asyncio.run(asyncio.wait_for(run(), timeout=60)) == (full, full)


def test_from_nodes_makes_one_memory_per_source_document(provider: MemoryProvider) -> None:
    docs = [Document(text="Alice lives in Paris. She works as a baker there since 1999, near the old market."),
            Document(text="Bob likes teal. His bicycle, his door and his favourite mug are all teal.")]
    nodes = SentenceSplitter(chunk_size=16, chunk_overlap=6).get_nodes_from_documents(docs)
    assert len(nodes) > len(docs)
    D2LQueryEngine.from_nodes(nodes, ALICE, provider=provider, kind=MemoryKind.TOOL_DOC)
    records = provider.list_memories(ALICE, include_source_text=True)
    assert len(records) == 2 and {r.kind for r in records} == {MemoryKind.TOOL_DOC}
    # overlapping node texts are merged back into the document, not repeated
    assert {r.source_text for r in records} == {d.text for d in docs}


def test_is_a_drop_in_where_llama_index_expects_a_query_engine(provider: MemoryProvider) -> None:
    qe = D2LQueryEngine.from_documents(_docs(), ALICE, provider=provider, max_new_tokens=8)
    tool = QueryEngineTool.from_defaults(qe, name="notes", description="Alice's notes")
    assert tool.call(Q).content == qe.query(Q).response
    assert qe.get_prompts() == {}


def test_an_empty_scope_answers_with_the_base_model(provider: MemoryProvider) -> None:
    response = D2LQueryEngine(BOB, provider=provider, max_new_tokens=8).query(Q)
    assert response.source_nodes == [] and response.metadata["memory_ids"] == []
    assert response.response == provider.engine.generate(Q, max_new_tokens=8)


@pytest.mark.parametrize("case", ["offsets", "missing", "earlier occurrence", "disagreeing overlap"])
def test_rejoin_trusts_offsets_only_when_they_are_consistent(case: str) -> None:
    text = "abcdefghij"
    nodes = [
        TextNode(text=text[0:6], start_char_idx=0, end_char_idx=6),
        TextNode(text=text[4:10], start_char_idx=4, end_char_idx=10),
    ]
    if case == "missing":
        nodes[1].start_char_idx = None
    elif case == "earlier occurrence":
        nodes[1].start_char_idx, nodes[1].end_char_idx = 0, 6
    elif case == "disagreeing overlap":
        nodes[1].text = "XXghij"
    expected = text if case == "offsets" else "\n\n".join(n.text for n in nodes)
    assert _rejoin(nodes) == expected
