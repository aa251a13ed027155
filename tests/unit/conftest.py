"""Fixtures shared by unit tests: `db_url`, one test on SQLite and once more on PostgreSQL."""

from __future__ import annotations

import pytest

from tests.pg_server import pg_server  # noqa: F401 (a session fixture: one server, when asked)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty database: a SQLite file, or a database of its own on the session's
    PostgreSQL server (tests/pg_server.py; skipped where PostgreSQL is not installed)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'raydock.db'}"
    return request.getfixturevalue("pg_server").new_database()
