"""D2LRetriever: the stored memories visible in a scope, ranked by BM25 per chunk, as LlamaIndex nodes.

Each node is one chunk of one memory (the unit an adapter is built from): its text is the chunk's
source text and its metadata says where it comes from (memory id, chunk index, token and character
span, scope, kind, name, and the metadata the document was added with). ``ref_doc_id`` is the
memory id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from d2l_memory import MemoryEngine, MemoryProvider, Scope
from d2l_memory.base_model import DEFAULT_BASE_MODEL
from d2l_memory.recall import bm25_scores
from d2l_store import AdapterRecord
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import NodeRelationship, NodeWithScore, QueryBundle, RelatedNodeInfo, TextNode

from llama_index.memory.d2l._shared import ProviderRef, as_scope

# Kept out of the text an LLM or an embedding model sees when a node is rendered.
_BOOKKEEPING_KEYS = ["memory_id", "chunk_index", "token_span", "char_span", "scope", "kind"]


def format_scope(scope: Scope) -> str:
    return "/".join((scope.tenant, scope.user, scope.agent, scope.session)).rstrip("/")


def chunk_node(record: AdapterRecord, chunk: int, text: str, score: float | None, **extra: Any) -> NodeWithScore:
    """One chunk of a stored memory as a node (its id is ``<memory id>:<chunk index>``)."""
    chars = record.metadata.get("chunk_chars")
    user_meta = {k: v for k, v in record.metadata.items() if k not in ("chunk_chars", "name")}
    metadata = {
        **user_meta,
        "memory_id": record.id,
        "chunk_index": chunk,
        "token_span": list(record.chunk_spans[chunk]),
        "char_span": list(chars[chunk]) if chars else None,
        "scope": format_scope(record.scope),
        "kind": record.kind.value,
        "name": record.metadata.get("name"),
        **extra,
    }
    node = TextNode(
        id_=f"{record.id}:{chunk}",
        text=text,
        metadata=metadata,
        excluded_llm_metadata_keys=[*_BOOKKEEPING_KEYS, *extra],
        excluded_embed_metadata_keys=[*_BOOKKEEPING_KEYS, *extra],
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=record.id)},
    )
    return NodeWithScore(node=node, score=score)


class D2LRetriever(BaseRetriever):
    """Top chunks of the memories a query in ``scope`` can see, by BM25 of their source text.

    Chunks that share no word with the query score 0 and are not returned. ``memory_ids`` restricts
    the search to those memories. Memories stored without source text cannot be retrieved.
    """

    def __init__(
        self,
        scope: Scope | dict[str, str] | str,
        *,
        provider: MemoryProvider | None = None,
        engine: MemoryEngine | None = None,
        similarity_top_k: int = 4,
        memory_ids: Sequence[str] | None = None,
        base_model: str = DEFAULT_BASE_MODEL,
        hypernet: str | None = None,
        index_url: str | None = None,
        blob_root: str | None = None,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
    ) -> None:
        if similarity_top_k < 1:
            raise ValueError(f"similarity_top_k must be at least 1, got {similarity_top_k}")
        self.scope = as_scope(scope)
        self.similarity_top_k = similarity_top_k
        self.memory_ids = None if memory_ids is None else tuple(memory_ids)
        self._ref = ProviderRef(provider, engine, base_model, hypernet, index_url, blob_root)
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    @property
    def provider(self) -> MemoryProvider:
        return self._ref.get_provider()

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        records = self.provider.visible_memories(self.scope)
        if self.memory_ids is not None:
            records = [r for r in records if r.id in self.memory_ids]
        pool = [(r, j, t) for r in records for j, t in enumerate(self.provider.chunk_texts(r)) if t.strip()]
        scores = bm25_scores(query_bundle.query_str, [t for _, _, t in pool])
        order = sorted((i for i in range(len(pool)) if scores[i] > 0), key=lambda i: -scores[i])
        return [chunk_node(*pool[i], scores[i]) for i in order[: self.similarity_top_k]]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)
