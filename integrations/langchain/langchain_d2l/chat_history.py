"""D2LChatMessageHistory: a session log whose old turns are compacted into a LoRA adapter."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from d2l_memory import Compaction, MemoryProvider, Scope
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage

from langchain_d2l._messages import from_dict, to_dicts


class D2LChatMessageHistory(BaseChatMessageHistory):
    """The chat history of one session, kept by a MemoryProvider.

    ``messages`` is the *verbatim window*: the recent messages that still go into the prompt as
    text. Adding messages logs them; once more than ``ProviderConfig.verbatim_messages`` (+ the
    ``compact_block``) are waiting, the oldest are compacted into the session's memory adapter in
    one hypernetwork pass (no LLM call) and leave the window. A ChatD2L with the same ``scope``
    applies that adapter, so the model still knows what the compacted turns said while the prompt
    stays short. ``transcript()`` returns every message ever logged, compacted or not.

    ```python
    history = D2LChatMessageHistory(provider, Scope(tenant="acme", user="alice", session="s1"))
    chain = RunnableWithMessageHistory(prompt | ChatD2L(provider=provider, scope=history.scope),
                                       lambda session_id: history)
    ```
    """

    def __init__(self, provider: MemoryProvider, scope: Scope) -> None:
        if not scope.session:
            raise ValueError("D2LChatMessageHistory needs a scope with a session (clear() deletes the whole scope)")
        self.provider = provider
        self.scope = scope
        self.last_compaction: Compaction | None = None
        """What the latest add_messages moved into the adapter (None if it compacted nothing)."""

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The verbatim window, oldest first."""
        return [from_dict(m) for m in self.provider.window(self.scope)]

    def transcript(self) -> list[BaseMessage]:
        """Every message of the session, including those compacted into the adapter."""
        return [from_dict(m) for m in self.provider.transcript(self.scope)]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        self.last_compaction = self.provider.append_messages(self.scope, to_dicts(messages))

    def clear(self) -> None:
        """Forget the session: its messages and its memories (the compacted adapter included)."""
        self.provider.forget_scope(self.scope)
        self.last_compaction = None

    async def aget_messages(self) -> list[BaseMessage]:
        return await asyncio.to_thread(lambda: self.messages)

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        await asyncio.to_thread(self.add_messages, messages)

    async def aclear(self) -> None:
        await asyncio.to_thread(self.clear)
