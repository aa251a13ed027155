"""Fixtures shared by unit tests: `db_url`, one test on SQLite and once more on PostgreSQL."""

from __future__ import annotations

import pytest

from raydock.config import load_settings
from raydock.platform import api_deps
from raydock.platform.registry import Registry
from tests.pg_server import pg_server  # noqa: F401 (a session fixture: one server, when asked)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty database: a SQLite file, or a database of its own on the session's
    PostgreSQL server (tests/pg_server.py; skipped where PostgreSQL is not installed)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'raydock.db'}"
    return request.getfixturevalue("pg_server").new_database()


@pytest.fixture
def api(tmp_path, monkeypatch) -> tuple[Registry, str]:
    """The API app's routes (raydock.platform.api.app, over HTTP in process) on a real
    registry and data dir, no Ray: the registry and the admin key."""
    from tests.unit.registry_handle import RegistryHandle

    reg = Registry(f"sqlite:///{tmp_path / 'raydock.db'}")
    admin_key = reg.ensure_admin()
    monkeypatch.setattr(api_deps.ctx, "settings", load_settings(home=str(tmp_path)), raising=False)
    monkeypatch.setattr(api_deps.ctx, "registry", RegistryHandle(reg), raising=False)
    yield reg, admin_key
    reg.close()
