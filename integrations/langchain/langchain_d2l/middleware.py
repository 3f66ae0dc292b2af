"""D2LCompactionMiddleware: keep an agent's prompt short by compacting old turns into a LoRA adapter.

The D2L counterpart of summary-buffer memory (LangChain's SummarizationMiddleware): where that
middleware asks an LLM to write a summary, this one runs the hypernetwork once over the old turns
and appends the result to the session's memory adapter. No text is generated on write, and nothing
the old turns said is paraphrased away: a ChatD2L applies the adapter on every later call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from d2l_memory import Compaction, MemoryProvider, Scope
from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse
from langchain_core.messages import AnyMessage, RemoveMessage, SystemMessage, ToolMessage
from langgraph.graph.message import REMOVE_ALL_MESSAGES
from langgraph.runtime import Runtime

from langchain_d2l._messages import to_dicts
from langchain_d2l.chat_models import ChatD2L

logger = logging.getLogger(__name__)


def plan_compaction(messages: Sequence[AnyMessage], keep: int, block: int) -> int:
    """How many of the oldest non-system messages to compact (0: not yet).

    Waits until ``keep + block`` messages are present, then compacts all but the newest ``keep``,
    extended so that tool results are never separated from the assistant turn that called them.
    """
    conversation = [m for m in messages if not isinstance(m, SystemMessage)]
    if len(conversation) < keep + block:
        return 0
    cut = len(conversation) - keep
    while cut < len(conversation) and isinstance(conversation[cut], ToolMessage):
        cut += 1
    return cut


class D2LCompactionMiddleware(AgentMiddleware):
    """Before each model call, move the agent's old messages into the session's D2L memory.

    Once the conversation holds ``keep_messages + compact_block`` messages (system messages are
    never compacted), all but the newest ``keep_messages`` are logged to the provider's transcript
    for ``scope``, compacted into its session adapter, and removed from the agent state. With
    ``apply_to_model`` (default), every model call of an agent whose model is a ChatD2L gets
    ``scope`` passed along, so the adapter of the compacted turns is applied; other models are
    left alone (and then gain nothing from the compacted turns).

    One middleware instance owns one session scope: ``compact`` moves *every* verbatim message the
    provider logged for it, so do not also write to that session through another history.

    ```python
    from langchain.agents import create_agent

    scope = Scope(tenant="acme", user="alice", session="chat-1")
    llm = ChatD2L(max_tokens=64)
    agent = create_agent(llm, middleware=[D2LCompactionMiddleware(llm.memory_provider(), scope)],
                         checkpointer=InMemorySaver())
    ```
    """

    def __init__(
        self,
        provider: MemoryProvider,
        scope: Scope,
        *,
        keep_messages: int = 6,
        compact_block: int = 4,
        apply_to_model: bool = True,
    ) -> None:
        super().__init__()
        if not scope.session:
            raise ValueError("D2LCompactionMiddleware needs a scope with a session to compact into")
        if keep_messages < 1 or compact_block < 1:
            raise ValueError(f"keep_messages and compact_block must be >= 1, got {keep_messages} and {compact_block}")
        self.provider = provider
        self.scope = scope
        self.keep_messages = keep_messages
        """Newest messages left verbatim in the prompt after a compaction."""
        self.compact_block = compact_block
        """Compaction waits until this many messages are beyond ``keep_messages`` (one chunk of real content)."""
        self.apply_to_model = apply_to_model
        self._warned_other_provider = False

    # ---- write: old turns -> adapter -------------------------------------------------------------

    def compact(self, messages: Sequence[AnyMessage]) -> tuple[list[AnyMessage], Compaction | None]:
        """The messages that stay in the prompt, and the compaction that absorbed the others (if any)."""
        cut = plan_compaction(messages, self.keep_messages, self.compact_block)
        if cut == 0:
            return list(messages), None
        old = [m for m in messages if not isinstance(m, SystemMessage)][:cut]
        old_ids = {id(m) for m in old}
        # Logged and compacted in one pass (append_messages could compact part of them separately).
        self.provider.messages.append(self.scope, to_dicts(old))
        done = self.provider.compact(self.scope, keep=0)
        logger.info("compacted %d agent messages of %s into its memory", len(old), self.scope)
        return [m for m in messages if id(m) not in old_ids], done

    def before_model(self, state: AgentState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        messages = state["messages"]
        kept, _ = self.compact(messages)
        if len(kept) == len(messages):
            return None
        return {"messages": [RemoveMessage(id=REMOVE_ALL_MESSAGES), *kept]}

    async def abefore_model(self, state: AgentState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.before_model, state, runtime)

    # ---- read: apply the adapter ---------------------------------------------------------------

    def _with_scope(self, request: ModelRequest) -> ModelRequest:
        if not self.apply_to_model or not isinstance(request.model, ChatD2L):
            return request
        if request.model.memory_provider() is not self.provider and not self._warned_other_provider:
            self._warned_other_provider = True
            logger.warning("the agent's ChatD2L reads memories from another provider than D2LCompactionMiddleware "
                           "writes them to, so it will not see the compacted turns; pass provider= to both")
        return request.override(model_settings={**request.model_settings, "scope": self.scope})

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> ModelResponse:
        return handler(self._with_scope(request))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse:
        return await handler(self._with_scope(request))
