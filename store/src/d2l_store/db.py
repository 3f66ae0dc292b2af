"""Engines for the index: SQLite tuned for several processes, or any other SQLAlchemy URL.

SQLite notes (why the event hooks): WAL lets readers run while one writer commits; a busy
timeout makes writers queue instead of failing; and write transactions start with
`BEGIN IMMEDIATE`, because a deferred transaction that reads first and writes later fails at once
with SQLITE_BUSY when another process committed in between, whatever the timeout.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)

WRITE_OPTION = "d2l_write"  # execution option marking a connection whose transaction will write
SQLITE_BUSY_TIMEOUT_S = 60.0


def normalise_url(url: str | URL) -> URL:
    """Plain `postgresql://` / `postgres://` URLs use psycopg 3 (SQLAlchemy would pick psycopg2)."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def create_index_engine(url: str | URL, *, echo: bool = False) -> Engine:
    u = normalise_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(u, echo=echo, pool_pre_ping=True)
    kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    if u.database in (None, "", ":memory:"):
        # One shared in-memory database for the engine's life (tests, throwaway stores).
        kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(u, echo=echo, **kwargs)
    _tune_sqlite(engine, in_memory="poolclass" in kwargs)
    return engine


def _tune_sqlite(engine: Engine, *, in_memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see module docstring)
        cur = dbapi_conn.cursor()
        if not in_memory:
            _enable_wal(cur)
            # NORMAL in WAL mode is crash-safe for the application; a power cut may drop the last
            # commits (never corrupt), which leaves at worst an orphan blob for gc.
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        writes = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")


def _enable_wal(cur: sqlite3.Cursor) -> None:
    """Put the file in WAL mode (persistent, so usually already done), retrying a refused switch.

    SQLite reports a refused switch either as "database is locked" or by answering with the old
    mode; both are retried. After the busy timeout the error is raised, or for a mode answer the
    connection goes on in the old mode (still correct, only less concurrent) with a warning.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    delay = 0.005
    mode = "unknown"
    while True:
        try:
            (mode,) = cur.execute("PRAGMA journal_mode=WAL").fetchone()
            if str(mode).lower() == "wal":
                return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            log.warning("could not switch the SQLite index to WAL mode; staying in %s", mode)
            return
        log.debug("database busy while enabling WAL; retrying in %.3f s", delay)
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
