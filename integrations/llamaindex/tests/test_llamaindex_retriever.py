from __future__ import annotations

import asyncio

from llama_index.core import PromptHelper, PromptTemplate, get_response_synthesizer
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import MetadataMode
from llamaindex_data import ACME, ALICE, BOB, DOC_PARIS, DOC_TEAL, DOC_TOOL

from d2l_memory import MemoryProvider
from llama_index.memory.d2l import D2LLLM, D2LRetriever


def test_returns_the_best_chunks_with_their_provenance(provider: MemoryProvider) -> None:
    paris = provider.add_document(DOC_PARIS, ALICE, name="paris.md", metadata={"author": "ann"}).record
    provider.add_document(DOC_TOOL, ALICE)
    hits = D2LRetriever(ALICE, provider=provider, similarity_top_k=2).retrieve("Where does Alice work as a baker?")
    assert len(hits) == 2 and hits[0].score >= hits[1].score > 0
    for hit in hits:
        meta = hit.node.metadata
        assert meta["memory_id"] == paris.id == hit.node.ref_doc_id
        assert hit.node.node_id == f"{paris.id}:{meta['chunk_index']}"
        start, end = meta["char_span"]
        assert paris.source_text[start:end] == hit.node.text
        assert tuple(meta["token_span"]) == paris.chunk_spans[meta["chunk_index"]]
        assert meta["scope"] == "acme/alice" and meta["kind"] == "document" and meta["name"] == "paris.md"
        assert meta["author"] == "ann"
        # bookkeeping stays out of what an LLM sees; the document's own metadata does not
        llm_text = hit.node.get_content(metadata_mode=MetadataMode.LLM)
        assert paris.id not in llm_text and "author: ann" in llm_text


def test_sees_the_scope_and_its_ancestors_only(provider: MemoryProvider) -> None:
    shared = provider.add_document(DOC_TOOL, ACME).record
    provider.add_document(DOC_TEAL, BOB)
    retriever = D2LRetriever(ALICE, provider=provider, similarity_top_k=50)
    assert {h.node.metadata["memory_id"] for h in retriever.retrieve("teal colour of Bob search items")} == {shared.id}


def test_filters_top_k_and_unrelated_queries(provider: MemoryProvider) -> None:
    paris = provider.add_document(DOC_PARIS, ALICE).record
    teal = provider.add_document(DOC_TEAL, ALICE).record
    query = "Alice Bob"
    assert len(D2LRetriever(ALICE, provider=provider, similarity_top_k=3).retrieve(query)) == 3
    only = D2LRetriever(ALICE, provider=provider, memory_ids=[teal.id], similarity_top_k=50).retrieve(query)
    assert only and {h.node.metadata["memory_id"] for h in only} == {teal.id}
    assert D2LRetriever(ALICE, provider=provider).retrieve("zebra xylophone") == []
    assert paris.id in {h.node.metadata["memory_id"] for h in D2LRetriever(ALICE, provider=provider).retrieve("baker")}


def test_async_retrieve_matches(provider: MemoryProvider) -> None:
    provider.add_document(DOC_PARIS, ALICE)
    retriever = D2LRetriever(ALICE, provider=provider)
    sync = retriever.retrieve("baker in Paris")
    async_ids = [h.node.node_id for h in asyncio.run(retriever.aretrieve("baker in Paris"))]
    assert async_ids == [h.node.node_id for h in sync]


def test_plugs_into_a_core_retriever_query_engine(provider: MemoryProvider) -> None:
    # Classic RAG over the same store: retrieved chunk text goes into the prompt.
    provider.add_document(DOC_PARIS, ALICE)
    llm = D2LLLM(provider=provider, max_new_tokens=4)  # no scope: no adapters, text only
    # The tiny model has 512 positions and a 300-word vocabulary: count with its own tokenizer
    # (LlamaIndex counts with tiktoken by default), use a short template, leave room for the chat
    # template's role markers (LlamaIndex does not count them), and use simple_summarize, since
    # "compact" reserves 500 tokens for refining.
    meta = llm.metadata
    helper = PromptHelper(meta.context_window - 32, meta.num_output, tokenizer=provider.engine.tokenizer.encode)
    synthesizer = get_response_synthesizer(llm=llm, response_mode="simple_summarize", prompt_helper=helper,
                                           text_qa_template=PromptTemplate("{context_str}\n\n{query_str}"))
    rag = RetrieverQueryEngine(D2LRetriever(ALICE, provider=provider, similarity_top_k=2), synthesizer)
    response = rag.query("Where does Alice live?")
    assert len(response.source_nodes) == 2 and isinstance(response.response, str)
