"""`AdapterRecord`, the plain value callers get back (never a live ORM row), and record ids."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from d2l_store.scope import MemoryKind, Scope


def new_record_id() -> str:
    """32 hex digits: 48 bits of milliseconds since the epoch, then 80 random bits.

    Ids sort by creation time (to the millisecond; ties break randomly but consistently), so
    "newest first" and cursor pagination are plain comparisons on the primary key.
    """
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    """Everything the index knows about one stored memory (one version of it)."""

    id: str
    scope: Scope
    kind: MemoryKind
    base_model: str
    """Fingerprint of the base model the adapter was made for."""
    hypernet: str
    """Hash of the hypernetwork that made it."""
    rank_per_chunk: int
    chunk_spans: tuple[tuple[int, int], ...]
    """Token span (start, end) of each chunk, in rank order: chunk i owns ranks [i*r, (i+1)*r)."""
    dtype: str
    n_modules: int
    nbytes: int
    """Size of the safetensors blob."""
    blob_digest: str
    source_hash: str | None
    source_text: str | None
    """None in `list()` results unless asked for (texts can be large); set by `get()`."""
    tags: tuple[str, ...]
    metadata: dict[str, Any] = field(hash=False)
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    version: int
    supersedes: str | None

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_spans)

    @property
    def rank(self) -> int:
        """Total LoRA rank R = n_chunks * rank_per_chunk."""
        return self.n_chunks * self.rank_per_chunk
