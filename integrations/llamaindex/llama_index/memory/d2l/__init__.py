"""LlamaIndex integration of d2l-memory: memories are LoRA adapters, not prompt text.

- ``D2LLLM``: the base model as a LlamaIndex LLM; a scope's memories (or given ids) are applied per call.
- ``D2LRetriever``: BM25 over the chunk texts of the memories visible in a scope, as ``NodeWithScore``s.
- ``D2LQueryEngine``: drop-in for ``index.as_query_engine()`` that activates the recalled memories'
  adapters and answers from a short prompt (``hybrid=True`` adds the best snippets too).
- ``D2LMemoryBlock``: a ``llama_index.core.memory.Memory`` block that internalizes flushed messages.
"""

from llama_index.memory.d2l._shared import clear_shared_cache, shared_engine, shared_provider
from llama_index.memory.d2l.llm import D2LLLM
from llama_index.memory.d2l.memory_block import D2LMemoryBlock
from llama_index.memory.d2l.query_engine import D2LQueryEngine
from llama_index.memory.d2l.retriever import D2LRetriever

__all__ = [
    "D2LLLM",
    "D2LMemoryBlock",
    "D2LQueryEngine",
    "D2LRetriever",
    "clear_shared_cache",
    "shared_engine",
    "shared_provider",
]
