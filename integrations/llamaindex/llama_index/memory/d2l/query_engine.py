"""D2LQueryEngine: the drop-in for ``index.as_query_engine()`` that answers from adapters, not prompt text.

A classic RAG query engine retrieves chunks and pastes them into the prompt. This one internalizes
the documents once (``from_documents``: one stored memory per document) and, per query, recalls the
memories of its scope (all of them when they fit the rank budget, otherwise the best by BM25, see
``d2l_memory.recall``), applies their LoRA adapters and sends the question alone. ``hybrid=True``
also puts the best few chunk texts in the prompt.

The prompt is fixed: the question (after the snippets in hybrid mode) as one user turn through the
model's chat template, the format the hypernetwork is trained with. So there are no prompt templates
to update (``get_prompts()`` is empty).

``Response.source_nodes`` are the chunks whose adapters were applied, best BM25 match first; each
node's metadata carries ``activation`` (why it was applied) and ``in_prompt`` (hybrid snippet or
not). ``Response.metadata`` has the recall, the memory ids and the token counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from d2l_memory import AddResult, GenerationConfig, MemoryEngine, MemoryKind, MemoryProvider, Recall, Scope
from d2l_memory.base_model import DEFAULT_BASE_MODEL
from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.response.schema import RESPONSE_TYPE, AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.callbacks import CallbackManager
from llama_index.core.prompts.mixin import PromptDictType, PromptMixinType
from llama_index.core.schema import BaseNode, NodeWithScore, QueryBundle

from llama_index.memory.d2l._shared import ProviderRef, as_scope, iterate_in_thread
from d2l_memory.recall import bm25_scores
from llama_index.memory.d2l.retriever import chunk_node

logger = logging.getLogger(__name__)

_JSON_SCALARS = (str, int, float, bool, type(None))


class D2LQueryEngine(BaseQueryEngine):
    """Answers questions about the memories of one scope with their adapters applied."""

    def __init__(
        self,
        scope: Scope | dict[str, str] | str,
        *,
        provider: MemoryProvider | None = None,
        engine: MemoryEngine | None = None,
        hybrid: bool = False,
        streaming: bool = False,
        memory_ids: Sequence[str] | None = None,
        max_new_tokens: int | None = None,
        generation: GenerationConfig | None = None,
        name_key: str | None = "file_path",
        kind: MemoryKind = MemoryKind.DOCUMENT,
        base_model: str = DEFAULT_BASE_MODEL,
        hypernet: str | None = None,
        index_url: str | None = None,
        blob_root: str | None = None,
        callback_manager: CallbackManager | None = None,
    ) -> None:
        """
        Args:
            scope: memories visible in this scope are recalled; documents inserted go into it.
            hybrid: also put the best-matching chunk texts in the prompt.
            streaming: ``query`` returns a StreamingResponse.
            memory_ids: apply exactly these memories instead of recalling.
            max_new_tokens, generation: decoding settings (default: the engine's).
            name_key: metadata key whose value names an inserted document, so a changed document
                supersedes its previous version (e.g. ``file_path`` from SimpleDirectoryReader);
                documents without it are deduplicated by their text only.
            kind: the memory kind inserted documents are stored as.
        """
        self.scope = as_scope(scope)
        self.hybrid = hybrid
        self.streaming = streaming
        self.memory_ids = None if memory_ids is None else list(memory_ids)
        self.max_new_tokens = max_new_tokens
        self.generation = generation
        self.name_key = name_key
        self.kind = kind
        self._ref = ProviderRef(provider, engine, base_model, hypernet, index_url, blob_root)
        super().__init__(callback_manager)

    @property
    def provider(self) -> MemoryProvider:
        return self._ref.get_provider()

    # ---- building, the way an index is built ---------------------------------------------------

    @classmethod
    def from_documents(
        cls, documents: Iterable[BaseNode], scope: Scope | dict[str, str] | str, **kwargs: Any
    ) -> D2LQueryEngine:
        """Internalize each document into one stored memory of ``scope`` (unchanged ones cost nothing)."""
        engine = cls(scope, **kwargs)
        engine.insert_documents(documents)
        return engine

    @classmethod
    def from_nodes(
        cls, nodes: Iterable[BaseNode], scope: Scope | dict[str, str] | str, **kwargs: Any
    ) -> D2LQueryEngine:
        """Internalize parsed nodes: the nodes of one source document become one memory (see ``insert_nodes``)."""
        engine = cls(scope, **kwargs)
        engine.insert_nodes(nodes)
        return engine

    def insert(self, document: BaseNode) -> AddResult:
        """Internalize one document (LlamaIndex ``Document`` or any text node) into a memory of this scope."""
        return self._add(document.get_content(), document.metadata)

    def insert_documents(self, documents: Iterable[BaseNode]) -> list[AddResult]:
        results = [self.insert(d) for d in documents]
        logger.info("documents in %s: %s", self.scope, _count_statuses(results))
        return results

    def insert_nodes(self, nodes: Iterable[BaseNode]) -> list[AddResult]:
        """One memory per source document (``ref_doc_id``; a node without one is its own document).

        The hypernetwork chunks text itself, so splitting into nodes is not needed; when the nodes
        carry character offsets into their document, overlapping node texts are merged back
        without repeating the overlap.
        """
        groups: dict[str, list[BaseNode]] = {}
        for node in nodes:
            groups.setdefault(node.ref_doc_id or node.node_id, []).append(node)
        results = [self._add(_rejoin(group), group[0].metadata) for group in groups.values()]
        logger.info("nodes of %d documents in %s: %s", len(groups), self.scope, _count_statuses(results))
        return results

    def _add(self, text: str, metadata: dict[str, Any]) -> AddResult:
        kept = {k: v for k, v in metadata.items() if isinstance(v, _JSON_SCALARS)}
        if len(kept) < len(metadata):
            logger.debug("metadata keys %s are not JSON scalars and are not stored", sorted(set(metadata) - set(kept)))
        name = metadata.get(self.name_key) if self.name_key else None
        return self.provider.add_document(text, self.scope, name=None if name is None else str(name), kind=self.kind,
                                          metadata=kept)

    # ---- querying --------------------------------------------------------------------------------

    def _get_prompts(self) -> PromptDictType:
        return {}

    def _get_prompt_modules(self) -> PromptMixinType:
        return {}

    def retrieve(self, query_bundle: QueryBundle | str) -> list[NodeWithScore]:
        """The chunks a query would activate, without answering."""
        query = query_bundle if isinstance(query_bundle, str) else query_bundle.query_str
        recall = self.provider.recall(query, self.scope, snippets=self._snippets(), memory_ids=self.memory_ids)
        return self._source_nodes(recall)

    def _snippets(self) -> int:
        return (self.provider.config.snippets or 3) if self.hybrid else 0

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        query = query_bundle.query_str
        options = self._options()
        if self.streaming:
            recall, pieces = self.provider.stream(query, self.scope, **options)
            return StreamingResponse(pieces, self._source_nodes(recall), self._metadata(recall))
        answer = self.provider.answer(query, self.scope, **options)
        meta = self._metadata(answer.recall, answer.prompt_tokens)
        meta["completion_tokens"] = answer.completion_tokens
        return Response(answer.text, self._source_nodes(answer.recall), meta)

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        if not self.streaming:
            return await asyncio.to_thread(self._query, query_bundle)
        query = query_bundle.query_str
        recall, pieces = await asyncio.to_thread(self.provider.stream, query, self.scope, **self._options())
        return AsyncStreamingResponse(
            iterate_in_thread(lambda: pieces), self._source_nodes(recall), self._metadata(recall)
        )

    def _options(self) -> dict[str, Any]:
        return {"hybrid": self.hybrid, "with_history": False, "memory_ids": self.memory_ids,
                "generation": self.generation, "max_new_tokens": self.max_new_tokens}

    def _metadata(self, recall: Recall, prompt_tokens: int | None = None) -> dict[str, Any]:
        if prompt_tokens is None:
            context = "\n\n".join(s.text.strip() for s in recall.snippets) or None
            prompt_tokens = self.provider.engine.count_prompt_tokens(recall.query, context=context)
        return {"recall": recall.describe(), "memory_ids": list(recall.memory_ids), "prompt_tokens": prompt_tokens}

    def _source_nodes(self, recall: Recall) -> list[NodeWithScore]:
        if not recall.selections:
            return []
        in_prompt = {(s.record_id, s.chunk) for s in recall.snippets}
        pool = []
        for sel in recall.selections:
            record = self.provider.store.get_record(sel.record_id)  # with its source text
            texts = self.provider.chunk_texts(record)
            pool += [(record, j, texts[j], sel.reason) for j in sel.chunks]
        scores = bm25_scores(recall.query, [p[2] for p in pool])
        order = sorted(range(len(pool)), key=lambda i: -scores[i])
        return [chunk_node(pool[i][0], pool[i][1], pool[i][2], scores[i], activation=pool[i][3],
                           in_prompt=(pool[i][0].id, pool[i][1]) in in_prompt) for i in order]


def _rejoin(nodes: Sequence[BaseNode]) -> str:
    """The text of one document from its nodes (in document order), overlaps removed when it is safe.

    Node offsets from LlamaIndex's splitters are found by searching the document, so in repetitive
    text they can point at an earlier occurrence. They are trusted only when they increase, match
    each node's length, and every overlap agrees character for character; otherwise the node
    texts are joined with blank lines (their overlaps then appear twice). Gaps between nodes were
    whitespace and come back as spaces.
    """
    texts = [n.get_content() for n in nodes]
    spans = [(getattr(n, "start_char_idx", None), getattr(n, "end_char_idx", None)) for n in nodes]
    out, prev_start, covered = "", -1, 0
    for (start, end), text in zip(spans, texts, strict=True):
        if start is None or end is None or end - start != len(text) or start <= prev_start or end <= covered:
            return "\n\n".join(texts)
        if start < covered and not out.endswith(text[: covered - start]):
            return "\n\n".join(texts)
        if not out:
            out = text
        elif start < covered:
            out += text[covered - start :]
        else:
            out += " " * (start - covered) + text  # the splitter dropped whitespace between nodes
        prev_start, covered = start, end
    return out


def _count_statuses(results: Sequence[AddResult]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts
