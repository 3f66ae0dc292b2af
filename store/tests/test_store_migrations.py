"""Schema migrations: an index written at the first revision opens and upgrades in place, the
migrations build exactly the ORM's schema, concurrent openers migrate once (also when SQLite refuses the switch to WAL mode outright), and an
index from a
newer d2l-store is refused with a clear error."""

from __future__ import annotations

import json
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from store_testing import BASE, HYPER, assert_same_tensors, make_adapter, put_simple

from d2l_store import AdapterStore, Scope, StoreError, blobformat, migrate
from d2l_store.blobs import digest_of, open_blob_store
from d2l_store.db import create_index_engine
from d2l_store.models import Base
from d2l_store.store import _blob_header


def _write_v1_record(index_url: str, blob_root: Path) -> tuple[str, dict]:
    """What d2l-store wrote at schema revision 0001 (no expiry column): a blob, its row, a tagged adapter."""
    engine = create_index_engine(index_url)
    migrate.upgrade(engine, "0001")
    tensors = make_adapter(n_chunks=2, r=4, seed=7)
    data = bytes(blobformat.encode(tensors, _blob_header(BASE, HYPER, 4, [(0, 5), (5, 9)])))
    digest = digest_of(data)
    open_blob_store(blob_root).write(digest, data)
    now = datetime(2025, 1, 2, 3, 4, 5)
    rid = "0" * 31 + "1"
    with engine.begin() as c:
        c.execute(text("INSERT INTO blobs VALUES (:d, :n, :t, :t)"), {"d": digest, "n": len(data), "t": now})
        c.execute(
            text(
                "INSERT INTO adapters (id, tenant, user_id, agent_id, session_id, kind, base_model, hypernet,"
                " rank_per_chunk, n_chunks, chunk_spans, dtype, n_modules, nbytes, blob_digest, source_hash,"
                " source_text, metadata, created_at, updated_at, version, supersedes) VALUES (:id, 'acme', 'ann',"
                " '', '', 'document', :base, :hyper, 4, 2, :spans, 'float32', 2, :n, :d, 'sha256:x', 'old text',"
                " :meta, :t, :t, 1, NULL)"
            ),
            {"id": rid, "base": BASE, "hyper": HYPER, "spans": json.dumps([[0, 5], [5, 9]]), "n": len(data),
             "d": digest, "meta": json.dumps({"from": "v1"}), "t": now},  # fmt: skip
        )
        c.execute(text("INSERT INTO adapter_tags VALUES (:id, 'old')"), {"id": rid})
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"
    engine.dispose()
    return rid, tensors


def test_index_from_first_revision_opens_and_upgrades(index_url: str, tmp_path: Path) -> None:
    rid, tensors = _write_v1_record(index_url, tmp_path / "blobs")
    with AdapterStore.open(index_url, tmp_path / "blobs") as store:
        with store.engine.connect() as c:
            assert migrate.current_revision(c) == migrate.head_revision()
        rec, loaded = store.get(rid, scope=Scope(tenant="acme"))
        assert_same_tensors(loaded, tensors)
        assert rec.expires_at is None and rec.tags == ("old",) and rec.metadata == {"from": "v1"}
        assert rec.created_at == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC) and rec.source_text == "old text"
        assert [r.id for r in store.list(Scope(tenant="acme"), tags=["old"])] == [rid]
        newer = put_simple(
            store, Scope(tenant="acme", user="ann"), supersedes=rid, expires_at=datetime(2999, 1, 1, tzinfo=UTC)
        )
        assert newer.version == 2 and store.get(newer.id)[0].expires_at == datetime(2999, 1, 1, tzinfo=UTC)
    with AdapterStore.open(index_url, tmp_path / "blobs") as again:  # opening a current index changes nothing
        assert again.get_record(newer.id).id == newer.id


def test_migrations_build_the_orm_schema(index_url: str, tmp_path: Path) -> None:
    with AdapterStore.open(index_url, tmp_path / "blobs") as store, store.engine.connect() as c:
        diffs = compare_metadata(MigrationContext.configure(c), Base.metadata)
    assert diffs == []


def test_concurrent_openers_migrate_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/index.db"

    def open_and_put(i: int) -> str:
        with AdapterStore.open(url, tmp_path / "blobs") as s:
            return put_simple(s, Scope(tenant="t"), seed=i).id

    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(open_and_put, range(4)))
    with AdapterStore.open(url, tmp_path / "blobs") as s:
        assert {r.id for r in s.list(Scope(tenant="t"))} == set(ids)


def test_wal_switch_refused_by_a_busy_writer_is_retried(tmp_path: Path) -> None:
    # A writer holding RESERVED on a rollback-journal file makes `PRAGMA journal_mode=WAL` fail at
    # once, busy timeout or not: the race concurrent first openers of a new index run into.
    path = tmp_path / "index.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (i INTEGER)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (1)")
    threading.Timer(0.3, writer.execute, ("COMMIT",)).start()
    engine = create_index_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()
        writer.close()


def test_index_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/index.db"
    AdapterStore.open(url, tmp_path / "blobs").close()
    engine = create_index_engine(url)
    with engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    engine.dispose()
    with pytest.raises(StoreError, match="newer version"):
        AdapterStore.open(url, tmp_path / "blobs")
