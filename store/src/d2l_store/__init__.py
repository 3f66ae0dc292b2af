"""d2l-store: LoRA adapters as content-addressed safetensors blobs, indexed in SQL.

    from d2l_store import AdapterStore, Scope, MemoryKind
    store = AdapterStore.open("sqlite:////abs/index.db", "/abs/blobs")
    rec = store.put(tensors, scope=Scope(tenant="t", user="u"), kind=MemoryKind.DOCUMENT, ...)
    rec, tensors = store.get(rec.id, scope=Scope(tenant="t"))
"""

from d2l_store.errors import (
    BlobIntegrityError,
    ConflictError,
    IncompatibleAdapterError,
    InvalidAdapterError,
    InvalidIdentifierError,
    RecordNotFound,
    StoreError,
)
from d2l_store.peft_format import VLLM_RANKS
from d2l_store.records import AdapterRecord
from d2l_store.scope import MemoryKind, Scope
from d2l_store.collect import GcReport
from d2l_store.store import AdapterStore

__all__ = [
    "AdapterRecord",
    "AdapterStore",
    "BlobIntegrityError",
    "ConflictError",
    "GcReport",
    "IncompatibleAdapterError",
    "InvalidAdapterError",
    "InvalidIdentifierError",
    "MemoryKind",
    "RecordNotFound",
    "Scope",
    "StoreError",
    "VLLM_RANKS",
]
__version__ = "0.1.0"
