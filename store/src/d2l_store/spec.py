"""`RecordSpec`: the non-tensor arguments of a put, validated once before anything is written.

Values that pass here store identically on SQLite and PostgreSQL: no NUL characters (PostgreSQL
text rejects them), no lone surrogates (not encodable as UTF-8), JSON-only metadata.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from d2l_store.errors import InvalidAdapterError, InvalidIdentifierError
from d2l_store.scope import MemoryKind, Scope, check_fingerprint, check_source_hash, check_tags
from d2l_store.tensors import check_spans

MAX_METADATA_BYTES = 64 * 1024
MAX_SOURCE_TEXT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RecordSpec:
    scope: Scope
    kind: MemoryKind
    base_model: str
    hypernet: str
    rank_per_chunk: int
    chunk_spans: tuple[tuple[int, int], ...]
    source_text: str | None
    source_hash: str | None
    tags: tuple[str, ...]
    metadata: dict[str, Any]
    expires_at: datetime | None

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_spans)


def build_spec(
    *,
    scope: Scope,
    kind: MemoryKind | str,
    base_model: str,
    hypernet: str,
    rank_per_chunk: int,
    chunk_spans: Sequence[Sequence[int]],
    source_text: str | None = None,
    source_hash: str | None = None,
    tags: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
    expires_at: datetime | None = None,
) -> RecordSpec:
    """Validate and normalise put arguments. A missing source_hash is derived from source_text."""
    if not isinstance(scope, Scope):
        raise InvalidIdentifierError(f"scope must be a Scope, got {type(scope).__name__}")
    if source_text is not None:
        check_text("source_text", source_text, MAX_SOURCE_TEXT_BYTES)
        if source_hash is None:
            source_hash = "sha256:" + hashlib.sha256(source_text.encode()).hexdigest()
    if isinstance(rank_per_chunk, bool) or not isinstance(rank_per_chunk, int) or not 1 <= rank_per_chunk <= 65536:
        raise InvalidAdapterError(f"rank_per_chunk must be an int in 1..65536, got {rank_per_chunk!r}")
    if expires_at is not None and (not isinstance(expires_at, datetime) or expires_at.tzinfo is None):
        raise InvalidAdapterError(f"expires_at must be an aware datetime (e.g. datetime.now(UTC)), got {expires_at!r}")
    return RecordSpec(
        scope=scope,
        kind=check_kind(kind),
        base_model=check_fingerprint("base_model", base_model),
        hypernet=check_fingerprint("hypernet", hypernet),
        rank_per_chunk=rank_per_chunk,
        chunk_spans=check_spans(chunk_spans),
        source_text=source_text,
        source_hash=None if source_hash is None else check_source_hash(source_hash),
        tags=check_tags(tags),
        metadata=check_metadata(metadata),
        expires_at=expires_at,
    )


def check_kind(kind: object) -> MemoryKind:
    try:
        return MemoryKind(kind)
    except ValueError:
        raise InvalidAdapterError(f"kind {kind!r} is not one of {[k.value for k in MemoryKind]}") from None


def check_text(name: str, value: object, max_bytes: int) -> str:
    if not isinstance(value, str):
        raise InvalidAdapterError(f"{name} must be a str, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidAdapterError(f"{name} contains a NUL character")
    try:
        n = len(value.encode())
    except UnicodeEncodeError as e:
        raise InvalidAdapterError(f"{name} is not encodable as UTF-8 ({e.reason})") from None
    if n > max_bytes:
        raise InvalidAdapterError(f"{name} is {n} bytes; the limit is {max_bytes}")
    return value


def check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """JSON-serialisable, at most 64 KiB. Returned as its JSON round trip (tuples become lists,
    int keys become strings), which is exactly what a later get() returns."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidAdapterError(f"metadata must be a mapping, got {type(metadata).__name__}")
    try:
        text = json.dumps(metadata, allow_nan=False, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise InvalidAdapterError(f"metadata is not JSON-serialisable: {e}") from None
    check_text("metadata (as JSON)", text, MAX_METADATA_BYTES)  # size, and no lone surrogates
    out = json.loads(text)
    if _has_nul(out):  # json escapes NUL as \u0000, so look at the parsed strings
        raise InvalidAdapterError("metadata contains a NUL character")
    assert isinstance(out, dict)
    return out


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False
