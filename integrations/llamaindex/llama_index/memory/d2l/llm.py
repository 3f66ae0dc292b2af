"""D2LLLM: the base model of a MemoryEngine as a LlamaIndex LLM, with stored memories applied as adapters.

Which memories a call uses, in order of precedence:
- ``memory_ids=[...]`` passed to the call, or set on the LLM: exactly those memories (all chunks);
- otherwise, with a ``scope`` (passed to the call or set on the LLM): the provider's recall for the
  last message in that scope (the session's compacted history always, documents by BM25 within the
  rank budget, see ``d2l_memory.recall``);
- with neither: no adapter, the plain base model.
The memory ids applied, the recall and the token counts come back in the response's
``additional_kwargs``.

Prompts: every call goes through the model's own chat template. ``complete(prompt)`` sends the
prompt as one user turn (after ``system_prompt``, if set); ``chat(messages)`` sends the messages as
they are, the last one being the turn answered. SmolLM2's chat template has no tool support, so this
is a ``CustomLLM``, not a ``FunctionCallingLLM``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from d2l_memory import GenerationConfig, MemoryEngine, MemoryProvider, Recall, Scope
from d2l_memory.base_model import DEFAULT_BASE_MODEL
from d2l_memory.generation import context_window
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_validator
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from llama_index.memory.d2l._shared import ProviderRef, as_scope, iterate_in_thread

logger = logging.getLogger(__name__)

_CALL_OPTIONS = {"scope", "memory_ids", "max_new_tokens", "max_tokens", "temperature", "top_p", "stop"}


class D2LLLM(CustomLLM):
    """A d2l-memory base model as a LlamaIndex LLM; memories of a scope (or given ids) are applied as LoRA adapters.

    Build it from names (``D2LLLM(scope="acme/alice")``: the model loads on first use into a cache
    shared by every component of this package, see ``_shared``), or around objects you already have
    (``D2LLLM(provider=provider, scope=...)``, ``D2LLLM(engine=engine)``).
    """

    base_model: str = Field(
        default=DEFAULT_BASE_MODEL, description="Built-in name, folder or hub id of the base model.")
    hypernet: str | None = Field(default=None, description="Hypernetwork checkpoint folder (None: the shipped one).")
    index_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the memory index (None: $D2L_MEMORY_STORE or the default SQLite).")
    blob_root: str | None = Field(
        default=None, description="Adapter blob folder or fsspec URL (None: $D2L_MEMORY_BLOBS or the default folder).")
    scope: Scope | None = Field(
        default=None, description="Memories visible in this scope are recalled for every call (None: no memories).")
    memory_ids: tuple[str, ...] | None = Field(
        default=None,
        description="Apply exactly these memories on every call instead of recalling (needs their scope).",
    )
    max_new_tokens: int = Field(
        default=256, gt=0, description="Most tokens generated per call (reported as num_output)."
    )
    temperature: float = Field(default=0.0, ge=0.0, description="0 decodes greedily.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (used when temperature > 0).")
    stop: tuple[str, ...] = Field(default=(), description="Strings that end an answer early (not included in it).")

    _ref: ProviderRef = PrivateAttr()

    def __init__(
        self,
        *,
        provider: MemoryProvider | None = None,
        engine: MemoryEngine | None = None,
        scope: Scope | dict[str, str] | str | None = None,
        **kwargs: Any,
    ) -> None:
        given = provider.engine if provider is not None else engine
        if given is not None:
            kwargs.setdefault("base_model", given.base.name)  # so the serialised fields name the model in use
        super().__init__(scope=None if scope is None else as_scope(scope), **kwargs)
        self._ref = ProviderRef(provider, engine, self.base_model, self.hypernet, self.index_url, self.blob_root)

    @field_validator("memory_ids", mode="before")
    @classmethod
    def _ids_as_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @classmethod
    def class_name(cls) -> str:
        return "D2LLLM"

    # ---- the model -----------------------------------------------------------------------------

    @property
    def engine(self) -> MemoryEngine:
        """The engine (loaded on first access when built from names)."""
        return self._ref.get_engine()

    @property
    def provider(self) -> MemoryProvider:
        """The provider (its store is opened on first access)."""
        return self._ref.get_provider()

    @property
    def metadata(self) -> LLMMetadata:
        """Read from the loaded model (so asking for it loads the model when built from names)."""
        engine = self.engine
        return LLMMetadata(
            context_window=context_window(engine.model),
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=engine.base.name,
            system_role=MessageRole.SYSTEM,
        )

    # ---- one call --------------------------------------------------------------------------------

    def recall(self, query: str, **options: Any) -> Recall | None:
        """What a call with this query (and these call options) would apply; None when no memories are used."""
        scope = options.get("scope", self.scope)
        ids = options.get("memory_ids", self.memory_ids)
        if scope is None:
            if ids:
                raise ValueError("memory_ids need the scope they are visible from: pass scope=... as well")
            return None
        return self.provider.recall(query, as_scope(scope), memory_ids=None if ids is None else list(ids))

    def _generation(self, options: dict[str, Any]) -> GenerationConfig:
        unknown = set(options) - _CALL_OPTIONS
        if unknown:
            logger.debug("D2LLLM ignores call options %s", sorted(unknown))
        return GenerationConfig(
            max_new_tokens=int(options.get("max_new_tokens", options.get("max_tokens", self.max_new_tokens))),
            temperature=float(options.get("temperature", self.temperature)),
            top_p=float(options.get("top_p", self.top_p)),
            stop=tuple(options.get("stop", self.stop)),
        )

    def _turns(self, messages: Sequence[ChatMessage]) -> tuple[str, list[dict[str, str]]]:
        """The question (last message) and the turns before it, with ``system_prompt`` first if set."""
        if not messages:
            raise ValueError("chat needs at least one message")
        turns = [{"role": m.role.value, "content": m.content or ""} for m in messages]
        if self.system_prompt and turns[0]["role"] != MessageRole.SYSTEM.value:
            turns.insert(0, {"role": MessageRole.SYSTEM.value, "content": self.system_prompt})
        return turns[-1]["content"], turns[:-1]

    def _run(self, messages: Sequence[ChatMessage], options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        question, history = self._turns(messages)
        recall = self.recall(question, **options)
        done = self.engine.complete(question, memory=recall.adapter if recall else None, history=history,
                                    generation=self._generation(options))
        info = _usage(recall, done.prompt_tokens)
        info["completion_tokens"] = done.completion_tokens
        return done.text, info

    def _stream(
        self, messages: Sequence[ChatMessage], options: dict[str, Any]
    ) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """Yield (text so far, delta, info) as the answer is decoded."""
        question, history = self._turns(messages)
        recall = self.recall(question, **options)
        info = _usage(recall, self.engine.count_prompt_tokens(question, history=history))
        text = ""
        pieces = self.engine.stream(question, memory=recall.adapter if recall else None, history=history,
                                    generation=self._generation(options))
        try:
            for piece in pieces:
                text += piece
                yield text, piece, info
        finally:
            pieces.close()  # stops decoding when the consumer stops early

    def _as_chat(self, prompt: str) -> list[ChatMessage]:
        return [ChatMessage(role=MessageRole.USER, content=prompt)]

    # ---- LlamaIndex interface --------------------------------------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        text, info = self._run(self._as_chat(prompt), kwargs)
        return CompletionResponse(text=text, additional_kwargs=info)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        def gen() -> CompletionResponseGen:
            for text, delta, info in self._stream(self._as_chat(prompt), kwargs):
                yield CompletionResponse(text=text, delta=delta, additional_kwargs=info)

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        text, info = self._run(messages, kwargs)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), additional_kwargs=info)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        def gen() -> ChatResponseGen:
            for text, delta, info in self._stream(messages, kwargs):
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta,
                                   additional_kwargs=info)

        return gen()

    # Async variants run the model in a worker thread, so the event loop stays free while it decodes.

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        text, info = await asyncio.to_thread(self._run, self._as_chat(prompt), kwargs)
        return CompletionResponse(text=text, additional_kwargs=info)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        async def gen() -> CompletionResponseAsyncGen:
            async for text, delta, info in iterate_in_thread(lambda: self._stream(self._as_chat(prompt), kwargs)):
                yield CompletionResponse(text=text, delta=delta, additional_kwargs=info)

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        text, info = await asyncio.to_thread(self._run, messages, kwargs)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), additional_kwargs=info)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        async def gen() -> ChatResponseAsyncGen:
            async for text, delta, info in iterate_in_thread(lambda: self._stream(messages, kwargs)):
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta,
                                   additional_kwargs=info)

        return gen()


def _usage(recall: Recall | None, prompt_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "memory_ids": list(recall.memory_ids) if recall else [],
        "recall": recall.describe() if recall else None,
    }
