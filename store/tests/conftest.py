"""Fixtures for the store tests. Backends: `sqlite` (local blobs), `memory` (SQLite index, fsspec
memory:// blobs) always run; `postgres` needs D2L_TEST_POSTGRES_URL and `s3` D2L_TEST_S3_ENDPOINT
(see store/scripts/start_test_servers.sh)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.engine import make_url
from store_testing import POSTGRES_ENV, S3_BUCKET, S3_ENV, ensure_bucket, require_env, s3_options

from d2l_store import AdapterStore
from d2l_store.db import normalise_url


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    return str(normalise_url(require_env(POSTGRES_ENV, "PostgreSQL")).render_as_string(hide_password=False))


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"d2l_t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
        _drop_database(admin, name)
    finally:
        admin.dispose()


def _drop_database(admin: Engine, name: str) -> None:
    """DROP ... WITH (FORCE), retried: an autovacuum worker visiting the fresh database can make it
    fail for a role without pg_signal_backend (start_test_servers.sh grants it), and leaves soon."""
    for attempt in range(5):
        try:
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            return
        except DBAPIError:
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    endpoint = require_env(S3_ENV, "S3")
    ensure_bucket(endpoint)
    return endpoint


@pytest.fixture
def s3_root(s3_endpoint: str) -> tuple[str, dict]:
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex}", s3_options(s3_endpoint)


BACKENDS = [
    "sqlite",
    "memory",
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("s3", marks=pytest.mark.s3),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[AdapterStore]:
    """An empty store on SQLite and local blobs, for behaviour that does not depend on the backend."""
    s = AdapterStore.open(f"sqlite:///{tmp_path}/index.db", tmp_path / "blobs")
    yield s
    s.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh index shared by several processes: an SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/index.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AdapterStore]:
    """An empty store on each backend."""
    sqlite_url = f"sqlite:///{tmp_path}/index.db"
    if backend == "sqlite":
        s = AdapterStore.open(sqlite_url, tmp_path / "blobs")
    elif backend == "memory":
        s = AdapterStore.open(sqlite_url, f"memory://d2l-{uuid.uuid4().hex}")
    elif backend == "postgres":
        s = AdapterStore.open(request.getfixturevalue("pg_url"), tmp_path / "blobs")
    elif backend == "s3":
        root, opts = request.getfixturevalue("s3_root")
        s = AdapterStore.open(sqlite_url, root, opts)
    else:
        raise AssertionError(backend)
    yield s
    s.close()
