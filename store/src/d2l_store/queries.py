"""SQL building blocks shared by the store's operations: scope and visibility filters, blob leases,
and the ORM row -> `AdapterRecord` conversion. Every query on `adapters` that serves a caller goes
through `scope_filter`, which always pins the tenant: that is the tenant-isolation guarantee."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from d2l_store.models import AdapterRow, BlobRow
from d2l_store.records import AdapterRecord
from d2l_store.scope import MemoryKind, Scope
from d2l_store.spec import RecordSpec


def scope_filter(scope: Scope, *, exact: bool = False) -> list[ColumnElement[bool]]:
    """Tenant always matches exactly; user/agent/session match when non-empty (or always if exact)."""
    conds = [AdapterRow.tenant == scope.tenant]
    optional = (
        (AdapterRow.user_id, scope.user),
        (AdapterRow.agent_id, scope.agent),
        (AdapterRow.session_id, scope.session),
    )
    for col, value in optional:
        if exact or value:
            conds.append(col == value)
    return conds


def visible(now: datetime) -> ColumnElement[bool]:
    """Not expired. Expired rows stay hidden until `expire()` deletes them."""
    return or_(AdapterRow.expires_at.is_(None), AdapterRow.expires_at > now)


def lease_blob(s: Session, digest: str, size: int, now: datetime, *, refresh: bool = True) -> None:
    """Create the blob's row, or (if `refresh`) renew its lease so gc keeps its hands off it."""
    values = {"digest": digest, "size": size, "created_at": now, "leased_at": now}
    dialect = s.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        ins = (pg_insert if dialect == "postgresql" else sqlite_insert)(BlobRow).values(**values)
        stmt = (
            ins.on_conflict_do_update(index_elements=[BlobRow.digest], set_={"leased_at": now})
            if refresh
            else ins.on_conflict_do_nothing(index_elements=[BlobRow.digest])
        )
        s.execute(stmt)
        return
    # Other backends: fine inside the store's write transactions, which serialise on the row.
    exists = s.scalar(select(BlobRow.digest).where(BlobRow.digest == digest).with_for_update())
    if exists is None:
        s.add(BlobRow(**values))
    elif refresh:
        s.execute(update(BlobRow).where(BlobRow.digest == digest).values(leased_at=now))


def new_row(id: str, spec: RecordSpec, *, blob_digest: str, nbytes: int, n_modules: int, dtype: str,
            created_at: datetime, updated_at: datetime, version: int, supersedes: str | None) -> AdapterRow:
    return AdapterRow(
        id=id,
        tenant=spec.scope.tenant,
        user_id=spec.scope.user,
        agent_id=spec.scope.agent,
        session_id=spec.scope.session,
        kind=spec.kind.value,
        base_model=spec.base_model,
        hypernet=spec.hypernet,
        rank_per_chunk=spec.rank_per_chunk,
        n_chunks=spec.n_chunks,
        chunk_spans=[list(s) for s in spec.chunk_spans],
        dtype=dtype,
        n_modules=n_modules,
        nbytes=nbytes,
        blob_digest=blob_digest,
        source_hash=spec.source_hash,
        source_text=spec.source_text,
        metadata_=spec.metadata,
        created_at=created_at,
        updated_at=updated_at,
        expires_at=spec.expires_at,
        version=version,
        supersedes=supersedes,
    )


def to_record(row: AdapterRow, tags: tuple[str, ...], *, with_text: bool) -> AdapterRecord:
    return AdapterRecord(
        id=row.id,
        scope=Scope(tenant=row.tenant, user=row.user_id, agent=row.agent_id, session=row.session_id),
        kind=MemoryKind(row.kind),
        base_model=row.base_model,
        hypernet=row.hypernet,
        rank_per_chunk=row.rank_per_chunk,
        chunk_spans=tuple((int(a), int(b)) for a, b in row.chunk_spans),
        dtype=row.dtype,
        n_modules=row.n_modules,
        nbytes=row.nbytes,
        blob_digest=row.blob_digest,
        source_hash=row.source_hash,
        source_text=row.source_text if with_text else None,
        tags=tuple(sorted(tags)),
        metadata=dict(row.metadata_),
        created_at=row.created_at,
        updated_at=row.updated_at,
        expires_at=row.expires_at,
        version=row.version,
        supersedes=row.supersedes,
    )
