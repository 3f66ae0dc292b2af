"""D2LMemoryBlock: long-term memory for ``llama_index.core.memory.Memory`` as LoRA adapters.

How it fits ``Memory``:
- ``Memory`` keeps recent messages verbatim; when they pass its token limit it flushes the oldest
  to every block's ``aput``. This block logs them in the provider's message log for its scope and
  compacts them at once into that scope's conversation memory (new chunks are appended to the
  stored adapter; old chunks are never re-encoded). The text stays in the transcript of record
  (``provider.transcript(scope)``) but leaves the prompt.
- ``Memory.get`` calls ``aget``: the block recalls what the next answer should use for the
  latest user message in its scope (the compacted conversation always, documents by BM25) and
  loads those adapters into the provider's cache.

How the active memory reaches the LLM: not through the prompt. Weights cannot travel inside chat
messages, so the adapters are applied by a ``D2LLLM`` with the same provider and scope (build it
with ``D2LLLM(provider=block.provider, scope=block.scope)`` or the block with
``D2LMemoryBlock.from_llm(llm)``). That LLM recalls with the same query (the last user message)
and so applies the same memories the block reported. The block's only prompt content is an
optional one-line note naming what is active (``note_template``; None or "" puts nothing in the
prompt); with ``Memory``'s default ``insert_method="system"`` the note goes into the system
message and the user message, the recall query, stays untouched.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from d2l_memory import MemoryProvider, Recall, Scope
from d2l_memory.base_model import DEFAULT_BASE_MODEL
from d2l_memory.provider import HISTORY_KINDS
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_validator
from llama_index.core.memory.memory import BaseMemoryBlock

from llama_index.memory.d2l._shared import ProviderRef, as_scope
from llama_index.memory.d2l.llm import D2LLLM

logger = logging.getLogger(__name__)

DEFAULT_NOTE = "Recalled from memory (applied as adapters, not shown here): {memories}."


class D2LMemoryBlock(BaseMemoryBlock[str]):
    """Internalizes flushed chat messages into the scope's conversation memory; reports what is active."""

    name: str = Field(default="d2l_memory", description="Name of the block inside Memory.")
    scope: Scope = Field(description="Scope of the conversation memory (give it a session to keep sessions apart).")
    note_template: str | None = Field(
        default=DEFAULT_NOTE,
        description="One-line note for the prompt when memories are active ({memories} lists them); None or '': none.",
    )

    _ref: ProviderRef = PrivateAttr()

    def __init__(
        self,
        *,
        scope: Scope | dict[str, str] | str,
        provider: MemoryProvider | None = None,
        base_model: str = DEFAULT_BASE_MODEL,
        hypernet: str | None = None,
        index_url: str | None = None,
        blob_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        """``provider``, or the names of a model and store to take from the shared cache on first use."""
        super().__init__(scope=scope, **kwargs)  # type: ignore[call-arg]  # scope is this class's field
        self._ref = ProviderRef(provider, None, base_model, hypernet, index_url, blob_root)

    @field_validator("scope", mode="before")
    @classmethod
    def _scope(cls, value: Any) -> Scope:
        return as_scope(value)

    @classmethod
    def from_llm(cls, llm: D2LLLM, **kwargs: Any) -> D2LMemoryBlock:
        """A block writing to the provider and scope the LLM reads from."""
        if llm.scope is None:
            raise ValueError("the D2LLLM has no scope: build it with scope=... so it applies this block's memories")
        return cls(provider=llm.provider, scope=llm.scope, **kwargs)

    @property
    def provider(self) -> MemoryProvider:
        return self._ref.get_provider()

    # ---- Memory hooks -------------------------------------------------------------------------

    async def _aput(self, messages: list[ChatMessage]) -> None:
        turns = [{"role": m.role.value, "content": m.content} for m in messages if m.content and m.content.strip()]
        if not turns:
            return
        await asyncio.to_thread(self._internalize, turns)

    def _internalize(self, turns: list[dict[str, str]]) -> None:
        self.provider.append_messages(self.scope, turns)  # may already compact the overflow of its window
        done = self.provider.compact(self.scope, keep=0)  # Memory flushed these: none stay verbatim
        if done is not None:
            logger.info(
                "internalized %d flushed messages of %s into memory %s", done.messages, self.scope, done.record.id
            )

    async def _aget(self, messages: list[ChatMessage] | None = None, **block_kwargs: Any) -> str:
        query = _last_user_text(messages or [])
        recall = await asyncio.to_thread(self.provider.recall, query, self.scope)
        if not recall.selections:
            return ""
        logger.debug("active for %r in %s: %s", query[:80], self.scope, recall.describe())
        return self.note_template.format(memories=self.describe(recall)) if self.note_template else ""

    def describe(self, recall: Recall) -> str:
        """Short human-readable list of the recalled memories, e.g. ``earlier conversation (3 chunks); notes.md``."""
        parts = []
        for sel in recall.selections:
            record = self.provider.store.get_record(sel.record_id)
            if record.kind in HISTORY_KINDS:
                parts.append(f"earlier conversation ({len(sel.chunks)} chunks)")
            elif record.metadata.get("name"):
                parts.append(str(record.metadata["name"]))
            else:
                parts.append("a " + record.kind.value.replace("_", " "))
        return "; ".join(parts)


def _last_user_text(messages: list[ChatMessage]) -> str:
    for m in reversed(messages):
        if m.role == MessageRole.USER and m.content:
            return m.content
    return ""
