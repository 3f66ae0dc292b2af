"""Server-backed tests skip on a developer's machine without the server, but fail on CI."""

from __future__ import annotations

import pytest
from store_testing import POSTGRES_ENV, require_env


def test_missing_server_skips_locally_and_fails_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POSTGRES_ENV, raising=False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_env(POSTGRES_ENV, "PostgreSQL")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_env(POSTGRES_ENV, "PostgreSQL")
    monkeypatch.setenv(POSTGRES_ENV, "postgresql://u@127.0.0.1/db")
    assert require_env(POSTGRES_ENV, "PostgreSQL") == "postgresql://u@127.0.0.1/db"
