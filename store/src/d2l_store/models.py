"""The index schema as typed SQLAlchemy 2.0 ORM models (the shape at the newest migration).

Three tables:
- `blobs`: one row per content-addressed blob. A writer *leases* the row (sets `leased_at`) before
  it writes the file, so the garbage collector never removes a blob that a put is about to
  reference; adapters point at it with a foreign key, so no adapter row can outlive its blob row.
- `adapters`: one row per visible memory (a new version replaces its predecessor's row).
- `adapter_tags`: (adapter, tag) pairs, so tag filters are indexed joins on any SQL backend.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, MetaData, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every backend.

    Stored as naive UTC: SQLite has no time-zone type, and one representation everywhere keeps
    comparisons (expiry, gc leases) identical on SQLite and PostgreSQL.
    """

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware datetime (e.g. datetime.now(UTC))")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class BlobRow(Base):
    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    """sha256 hex of the blob's bytes: its name in the blob store."""
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    leased_at: Mapped[datetime] = mapped_column(UTCDateTime)
    """Last time a writer claimed this blob; gc spares blobs leased within its grace period."""


class AdapterRow(Base):
    __tablename__ = "adapters"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    """32 hex digits, time-ordered (see `records.new_record_id`), so ordering by id is ordering by age."""
    tenant: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str] = mapped_column(String(128))
    agent_id: Mapped[str] = mapped_column(String(128))
    session_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    base_model: Mapped[str] = mapped_column(String(256))
    hypernet: Mapped[str] = mapped_column(String(256))
    rank_per_chunk: Mapped[int] = mapped_column(Integer)
    n_chunks: Mapped[int] = mapped_column(Integer)
    chunk_spans: Mapped[list[list[int]]] = mapped_column(JSON)
    """[[start, end], ...] token span of each chunk, in rank order."""
    dtype: Mapped[str] = mapped_column(String(16))
    n_modules: Mapped[int] = mapped_column(Integer)
    nbytes: Mapped[int] = mapped_column(BigInteger)
    """Size of the safetensors blob in bytes."""
    blob_digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest", ondelete="RESTRICT"))
    source_hash: Mapped[str | None] = mapped_column(String(128))
    source_text: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    """When the first version of this memory was stored (kept across versions)."""
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    """When this version was stored."""
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """Added in schema revision 0002; NULL means never."""
    version: Mapped[int] = mapped_column(Integer)
    supersedes: Mapped[str | None] = mapped_column(String(32))
    """Id of the version this one replaced (that row is gone; kept for lineage)."""

    tags: Mapped[list[TagRow]] = relationship(
        back_populates="adapter", lazy="raise", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (
        Index("ix_adapters_scope", "tenant", "user_id", "agent_id", "session_id", "id"),
        Index("ix_adapters_tenant_source_hash", "tenant", "source_hash"),
        Index("ix_adapters_blob_digest", "blob_digest"),
        Index("ix_adapters_expires_at", "expires_at"),
    )


class TagRow(Base):
    __tablename__ = "adapter_tags"

    adapter_id: Mapped[str] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)

    adapter: Mapped[AdapterRow] = relationship(back_populates="tags", lazy="raise")

    __table_args__ = (Index("ix_adapter_tags_tag", "tag", "adapter_id"),)
