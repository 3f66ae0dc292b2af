"""d2l-store: LoRA adapters as content-addressed safetensors blobs, indexed in SQL.

    from d2l_store import AdapterStore, Scope, MemoryKind
    store = AdapterStore.open("sqlite:////abs/index.db", "/abs/blobs")
    rec = store.put(tensors, scope=Scope(tenant="t", user="u"), kind=MemoryKind.DOCUMENT, ...)
    rec, tensors = store.get(rec.id, scope=Scope(tenant="t"))

Names load on first use (PEP 562), so `from d2l_store import Scope` or an error class does not pull
in torch and SQLAlchemy's ORM; only the store itself does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from d2l_store.lazy import lazy_exports

if TYPE_CHECKING:
    from d2l_store.collect import GcReport as GcReport
    from d2l_store.errors import (
        BlobIntegrityError as BlobIntegrityError,
        ConflictError as ConflictError,
        IncompatibleAdapterError as IncompatibleAdapterError,
        InvalidAdapterError as InvalidAdapterError,
        InvalidIdentifierError as InvalidIdentifierError,
        RecordNotFound as RecordNotFound,
        StoreError as StoreError,
    )
    from d2l_store.peft_format import VLLM_RANKS as VLLM_RANKS
    from d2l_store.records import AdapterRecord as AdapterRecord
    from d2l_store.scope import MemoryKind as MemoryKind, Scope as Scope
    from d2l_store.store import AdapterStore as AdapterStore

# Public name -> the module that defines it. The repository's tests/test_lazy_packages.py checks
# that this table, the TYPE_CHECKING imports above and what the modules define agree.
_EXPORTS: dict[str, str] = {
    "AdapterRecord": "d2l_store.records",
    "AdapterStore": "d2l_store.store",
    "BlobIntegrityError": "d2l_store.errors",
    "ConflictError": "d2l_store.errors",
    "GcReport": "d2l_store.collect",
    "IncompatibleAdapterError": "d2l_store.errors",
    "InvalidAdapterError": "d2l_store.errors",
    "InvalidIdentifierError": "d2l_store.errors",
    "MemoryKind": "d2l_store.scope",
    "RecordNotFound": "d2l_store.errors",
    "Scope": "d2l_store.scope",
    "StoreError": "d2l_store.errors",
    "VLLM_RANKS": "d2l_store.peft_format",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
