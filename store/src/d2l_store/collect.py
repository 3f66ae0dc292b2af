"""Garbage collection: remove blobs that no record references, without racing concurrent puts.

A put leases its blob's row before writing the file and references it in a later transaction (see
`d2l_store.store`). The collector therefore only takes blobs whose lease is older than a grace
period, and deletes each one while holding its row lock (PostgreSQL `FOR UPDATE`; on SQLite the
`BEGIN IMMEDIATE` write transaction), re-checking lease and references under that lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, sessionmaker

from d2l_store import queries
from d2l_store.blobs import BlobStore
from d2l_store.models import AdapterRow, BlobRow

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GcReport:
    blobs_deleted: int
    bytes_freed: int
    temp_files_removed: int


def collect_garbage(
    read: sessionmaker[Session], write: sessionmaker[Session], blobs: BlobStore, grace_s: float
) -> GcReport:
    """Remove unreferenced blobs leased more than `grace_s` seconds ago, and older temp files.
    `write` must make write transactions (see `d2l_store.db.WRITE_OPTION`)."""
    temp = blobs.clean_temp(grace_s)
    _adopt_strays(read, write, blobs)
    cutoff = datetime.now(UTC) - timedelta(seconds=grace_s)
    unreferenced = ~exists().where(AdapterRow.blob_digest == BlobRow.digest)
    with read() as s:
        candidates = s.scalars(select(BlobRow.digest).where(BlobRow.leased_at <= cutoff, unreferenced)).all()
    deleted = freed = 0
    for digest in candidates:
        size = _collect_one(write, blobs, digest, cutoff)
        if size is not None:
            deleted, freed = deleted + 1, freed + size
    if deleted or temp:
        log.info("gc removed %d blobs (%d bytes) and %d temp files", deleted, freed, temp)
    return GcReport(blobs_deleted=deleted, bytes_freed=freed, temp_files_removed=temp)


def _collect_one(write: sessionmaker[Session], blobs: BlobStore, digest: str, cutoff: datetime) -> int | None:
    """Delete one blob while holding its row lock, so no put can lease or reference it meanwhile."""
    with write() as s, s.begin():
        row = s.scalars(
            select(BlobRow).where(BlobRow.digest == digest, BlobRow.leased_at <= cutoff).with_for_update()
        ).one_or_none()
        if row is None or s.scalar(select(AdapterRow.id).where(AdapterRow.blob_digest == digest).limit(1)):
            return None  # re-leased or referenced since the candidate scan
        blobs.delete(digest)
        s.delete(row)
        return row.size


def _adopt_strays(read: sessionmaker[Session], write: sessionmaker[Session], blobs: BlobStore) -> None:
    """Give blob files that have no row (left by writers killed mid-retry, or restored by hand) a
    fresh lease, so the normal path collects them once the grace period has passed."""
    with read() as s:
        known = set(s.scalars(select(BlobRow.digest)).all())
    strays = [d for d in blobs.digests() if d not in known]
    for digest in strays:
        with write() as s, s.begin():
            queries.lease_blob(s, digest, blobs.size(digest), datetime.now(UTC), refresh=False)
    if strays:
        log.info("adopted %d blob files without index rows", len(strays))
