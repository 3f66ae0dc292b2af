"""D2LRetriever: the source chunks of a scope's D2L memories, ranked by BM25 against the query."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from d2l_memory import MemoryProvider, Scope
from d2l_memory.recall import bm25_scores
from d2l_store import AdapterRecord
from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field


@dataclass(frozen=True)
class _Chunk:
    record: AdapterRecord
    index: int
    text: str


class D2LRetriever(BaseRetriever):
    """Returns the ``k`` chunks of stored memories most relevant to a query, best first.

    Every chunk of every memory visible in ``scope`` (the scope and its ancestors, as for recall)
    that kept its source text competes; chunks are ranked by BM25 of their text against the query,
    ties keep store order. Fewer than ``k`` Documents come back only when the scope holds fewer
    chunks. Each Document's metadata names its source, so a chain can cite it or apply exactly
    those memories: ``ChatD2L(...).invoke(q, memory_ids=memory_ids_of(docs))``.

    Metadata keys: ``memory_id``, ``scope`` (dict), ``kind``, ``name`` (document name or None),
    ``chunk`` (index in the memory's rank order), ``n_chunks``, ``token_span`` and ``char_span``
    (the chunk's [start, end) in the memory's source, in tokens and in characters), ``score``
    (BM25), ``version``.

    ```python
    retriever = D2LRetriever(provider=llm.memory_provider(), scope=Scope(tenant="acme", user="alice"), k=3)
    docs = retriever.invoke("Where does Alice live?", k=5)
    ```
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    provider: MemoryProvider = Field(exclude=True)
    """Where the memories are stored (e.g. ``ChatD2L.memory_provider()``)."""
    scope: Scope
    """Whose memories to search."""
    k: int = Field(default=4, ge=1)
    """Documents returned per query (a call may pass ``k=``)."""

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        n = self.k if k is None else k
        if n < 1:
            raise ValueError(f"k must be at least 1, got {n}")
        chunks = self._chunks()
        scores = bm25_scores(query, [c.text for c in chunks])
        order = sorted(range(len(chunks)), key=lambda i: -scores[i])[:n]  # stable: ties keep store order
        return [_document(chunks[i], scores[i]) for i in order]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        return await asyncio.to_thread(self._get_relevant_documents, query, run_manager=run_manager.get_sync(), k=k)

    def _chunks(self) -> list[_Chunk]:
        out = []
        for record in self.provider.visible_memories(self.scope):
            out += [_Chunk(record, i, t) for i, t in enumerate(self.provider.chunk_texts(record)) if t.strip()]
        return out


def _document(chunk: _Chunk, score: float) -> Document:
    record = chunk.record
    chars = (record.metadata.get("chunk_chars") or [None] * record.n_chunks)[chunk.index]
    return Document(
        id=f"{record.id}:{chunk.index}",
        page_content=chunk.text,
        metadata={
            "memory_id": record.id,
            "scope": record.scope.as_dict(),
            "kind": record.kind.value,
            "name": record.metadata.get("name"),
            "chunk": chunk.index,
            "n_chunks": record.n_chunks,
            "token_span": list(record.chunk_spans[chunk.index]),
            "char_span": None if chars is None else list(chars),
            "score": score,
            "version": record.version,
        },
    )


def memory_ids_of(documents: Sequence[Document]) -> list[str]:
    """The distinct memory ids behind retrieved Documents, in rank order (for ``ChatD2L(memory_ids=...)``)."""
    return list(dict.fromkeys(d.metadata["memory_id"] for d in documents if "memory_id" in d.metadata))

