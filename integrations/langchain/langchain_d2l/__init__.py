"""LangChain integration for d2l-memory: agent memory as LoRA adapters.

- ``ChatD2L``: a local chat model answering with the memories of its scope applied;
- ``D2LRetriever``: the source chunks of those memories, BM25-ranked, with provenance;
- ``D2LChatMessageHistory``: a session history whose old turns are compacted into an adapter;
- ``D2LCompactionMiddleware``: the same compaction for LangChain v1 agents (no LLM call on write).
"""

from langchain_d2l._shared import clear_shared, shared_engine, shared_provider
from langchain_d2l.chat_history import D2LChatMessageHistory
from langchain_d2l.chat_models import ChatD2L
from langchain_d2l.middleware import D2LCompactionMiddleware, plan_compaction
from langchain_d2l.retrievers import D2LRetriever, memory_ids_of

__all__ = [
    "ChatD2L",
    "D2LChatMessageHistory",
    "D2LCompactionMiddleware",
    "D2LRetriever",
    "clear_shared",
    "memory_ids_of",
    "plan_compaction",
    "shared_engine",
    "shared_provider",
]

__version__ = "0.1.0"
