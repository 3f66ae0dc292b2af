"""Bring an index up to the schema this version of d2l-store expects (Alembic, env inside the package).

Several processes may open one store at the same moment, so the upgrade runs inside one write
transaction that first takes a lock (PostgreSQL advisory lock; SQLite's `BEGIN IMMEDIATE`): the
first opener migrates, the others wait, then find the schema current and do nothing.
"""

from __future__ import annotations

import logging

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, text

from d2l_store.db import WRITE_OPTION
from d2l_store.errors import StoreError

log = logging.getLogger(__name__)

_PG_LOCK_KEY = 0x6432_6C73  # "d2ls": any constant shared by all d2l-store processes


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "d2l_store:migrations")
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the index at `engine` to `revision` ("head" = this version's schema)."""
    target = head_revision() if revision == "head" else revision
    with engine.connect() as conn:
        if current_revision(conn) == target:
            return
    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            before = current_revision(conn)
            if before == target:
                return
            cfg = _config()
            cfg.attributes["connection"] = conn
            try:
                command.upgrade(cfg, revision)
            except CommandError as e:
                raise StoreError(
                    f"index schema revision {before!r} is unknown to this d2l-store (schema head {target!r}); "
                    f"was it written by a newer version? ({e})"
                ) from e
            log.info("index schema upgraded from %s to %s", before or "empty", target)
