"""The schema's versions (Alembic) and the platform lease, on a real SQLite file and a real
PostgreSQL server (tests/pg_server.py), without Ray: `raydock up` checks both before Ray
starts, and the registry applies migrations and holds the lease for its life."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from cryptography.fernet import Fernet
from sqlalchemy import inspect, text

from raydock import cli
from raydock.config import load_settings
from raydock.platform import db, migrations, notify, security
from raydock.platform.lease import Lease, LeaseHeld
from raydock.platform.registry import Registry
from raydock.platform.secrets import SecretBox
from tests.notify_sinks import WebhookSink
from tests.unit.registry_handle import RegistryHandle

ROOT = Path(__file__).resolve().parents[2]


def schema_differences(url: str) -> list:
    """What Alembic's autogenerate finds between the database and db.py's metadata."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(ctx, db.Base.metadata)
    finally:
        engine.dispose()


def revision_of(url: str) -> str | None:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def sql(url: str, *statements: str) -> list:
    """Run statements in one transaction; the last one's rows (if it returns any)."""
    engine = db.make_engine(url)
    try:
        with engine.begin() as conn:
            for st in statements:
                result = conn.execute(text(st))
            return list(result) if result.returns_rows else []
    finally:
        engine.dispose()


def inspect_tables(url: str) -> set[str]:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def upgrade(url: str):
    engine = db.make_engine(url)
    try:
        return migrations.upgrade(engine)
    finally:
        engine.dispose()


@pytest.fixture
def registries():
    """Registries a test opens, closed at its end (their lease and connections)."""
    made: list[Registry] = []

    def open_(url: str, **kw) -> Registry:
        made.append(Registry(url, **kw))
        return made[-1]

    yield open_
    for r in made:
        r.close()


# ---------------------------------------------------------------- schema versions


def test_alembic_upgrade_head_on_an_empty_database_makes_exactly_db_pys_schema(db_url):
    engine = db.make_engine(db_url)
    started = time.perf_counter()
    with engine.begin() as conn:  # Alembic's own command, on the package's configuration
        command.upgrade(migrations.config(conn), "head")
    took = time.perf_counter() - started
    engine.dispose()
    print(f"alembic upgrade head on an empty database: {took:.3f} s")
    assert revision_of(db_url) == migrations.head()
    assert schema_differences(db_url) == []
    # and the path the registry takes finds nothing left to do
    before, now = upgrade(db_url)
    assert (before.revision, before.pending, now) == (migrations.head(), [], migrations.head())


def test_an_empty_sqlite_migrates_in_well_under_a_second(tmp_path):
    migrations.baseline_columns()  # warm: imports and the scripts' parse, once per process
    started = time.perf_counter()
    db.make_sessionmaker(f"sqlite:///{tmp_path / 'fresh.db'}", create=True)
    assert time.perf_counter() - started < 0.5


# an older raydock's tables: no usage (older still than the baseline), nor the tables later
# revisions made
MADE_AFTER_BASELINE = {"upload_chunks"}
OLDER_TABLES = [
    t
    for name, t in db.Base.metadata.tables.items()
    if name != "usage" and name not in MADE_AFTER_BASELINE
]
# columns later revisions added to OLDER_TABLES: an older raydock's tables lack them
ADDED_AFTER_BASELINE = [
    ("deployments", "applied_from"),
    ("user_webhooks", "url_sealed"),
    ("user_webhooks", "url_hint"),
    ("notification_deliveries", "user_id"),
]
# columns later revisions removed (table, column, SQL type): an older raydock's tables have them
REMOVED_AFTER_BASELINE = [("upload_sessions", "received", "JSON")]


def create_older_tables(db_url: str) -> None:
    engine = db.make_engine(db_url)
    db.Base.metadata.create_all(engine, tables=OLDER_TABLES)
    engine.dispose()
    for table, column in ADDED_AFTER_BASELINE:
        for index in db.Base.metadata.tables[table].indexes:  # SQLite drops no indexed column
            if column in index.columns:
                sql(db_url, f"DROP INDEX {index.name}")
        sql(db_url, f"ALTER TABLE {table} DROP COLUMN {column}")
    for table, column, type_ in REMOVED_AFTER_BASELINE:
        sql(db_url, f"ALTER TABLE {table} ADD COLUMN {column} {type_}")


def test_a_database_made_before_migrations_is_adopted_and_keeps_its_rows(db_url, registries):
    # what an older raydock left: create_all of its tables (no usage table yet, no
    # alembic_version), with a user, a key and a model in it
    create_older_tables(db_url)
    sessions = db.make_sessionmaker(db_url)  # no migrations: rows as that raydock wrote them
    admin_key = security.new_key(security.MANAGEMENT_PREFIX)
    with sessions.begin() as s:
        s.add(db.User(id="u-old", name="admin", is_admin=True))
        s.flush()
        s.add(Registry._key_row(admin_key, "admin", "management", None, "u-old", "u-old"))
        s.add(db.Model(id="cm-old", name="kept", source="file", status="READY", tags=["a"]))
    sessions.kw["bind"].dispose()
    assert revision_of(db_url) is None and "usage" not in inspect_tables(db_url)

    reg = registries(db_url)  # what `raydock up` starts: adopts, then upgrades

    assert revision_of(db_url) == migrations.head()
    assert schema_differences(db_url) == []
    assert reg.authenticate_management(admin_key)["userId"] == "u-old"
    assert reg.get_model("cm-old")["tags"] == ["a"]
    assert reg.ensure_admin() is None  # the old admin is still the admin
    reg.record_usage([(1_800_000_000, "dp-1", "", "key-1", 1, 2, 3)])  # the table it lacked
    assert reg.tokens_since(db.utcnow().replace(year=2020)) == {"key-1": 5}


def test_0003_masks_and_the_registry_seals_webhook_urls_an_older_raydock_kept_in_clear(
    db_url, registries
):
    """A database at 0002 holding a user's webhook URL in clear, and deliveries that recorded
    it (one still pending). The upgrade masks the deliveries' targets and adds what the API
    shows; a registry with the platform key seals the URL when it starts (one without
    leaves it); the pending delivery then goes on to the whole URL."""
    engine = db.make_engine(db_url)
    with engine.begin() as conn:
        migrations._run(conn, "0002")
    engine.dispose()
    key = Fernet.generate_key()
    box = SecretBox(key)
    event = notify.new_event(notify.DEPLOYED, "u-1", {"deploymentId": "dp-1"})
    with WebhookSink() as hooks:
        path = "/services/T0/B0/SeCrEtToKeN9"
        url = hooks.url(path)
        hooks.secrets[path] = "rdwh-old"
        at = "'2026-01-01 00:00:00'"
        sql(
            db_url,
            "INSERT INTO users (id, name, is_admin, created_at) VALUES "
            f"('u-1', 'ana', false, {at})",
            "INSERT INTO user_webhooks (user_id, url, secret_sealed, created_at) VALUES "
            f"('u-1', '{url}', '{box.seal('rdwh-old')}', {at})",
            *(
                "INSERT INTO notification_deliveries (id, kind, event, channel, target, "
                f"status, attempts, created_at, updated_at) VALUES ('{i}', '{event['kind']}', "
                f"'{json.dumps(event)}', '{channel}', '{target}', '{status}', 1, {at}, {at})"
                for i, channel, target, status in (
                    ("nd-sent", "webhook", url, "delivered"),
                    ("nd-left", "webhook", url, "pending"),
                    ("nd-mail", "email", "ana@example.test", "delivered"),
                )
            ),
        )
        shown = notify.display_target(url)

        registries(db_url).close()  # no platform key (a bare upgrade): masked, not sealed
        assert revision_of(db_url) == migrations.head()
        assert schema_differences(db_url) == []
        assert sql(db_url, "SELECT url, url_sealed, url_hint FROM user_webhooks") == [
            (url, None, shown)
        ]
        assert sorted(sql(db_url, "SELECT id, target FROM notification_deliveries")) == [
            ("nd-left", shown),
            ("nd-mail", "ana@example.test"),
            ("nd-sent", shown),
        ]

        reg = registries(db_url, secret_key=key)  # what `raydock up` starts: seals
        (row,) = sql(db_url, "SELECT url, url_sealed, url_hint FROM user_webhooks")
        clear, sealed, hint = row
        assert clear is None and box.open(sealed) == url and "SeCrEt" not in sealed
        assert hint == shown and reg.get_user_webhook("u-1")["url"] == shown
        assert reg.notification_targets("u-1")["webhook"] == {"url": url, "secret": "rdwh-old"}

        settings = load_settings(webhook_allowed_networks="127.0.0.1/32").to_dict()
        notifier = notify.Notifier(settings, registry=RegistryHandle(reg))

        async def resume() -> int:
            resumed = await notifier.recover()
            while await notifier.pending():
                await asyncio.sleep(0.02)
            return resumed

        assert asyncio.run(resume()) == 1
    (got,) = hooks.received
    assert got["path"] == path and got["verified"]
    assert got["headers"]["X-Raydock-Delivery"] == "nd-left"
    left = [d for d in reg.list_deliveries() if d["deliveryId"] == "nd-left"]
    assert [(d["status"], d["target"]) for d in left] == [("delivered", shown)]


def run_migrations(db_url: str, target: str, down: bool = False) -> None:
    engine = db.make_engine(db_url)
    with engine.begin() as conn:
        if down:
            command.downgrade(migrations.config(conn), target)
        else:
            migrations._run(conn, target)
    engine.dispose()


def stored_lists(db_url: str) -> dict[str, list[str]]:
    """upload_sessions.received as revision 0003 keeps it (SQLite answers JSON as text)."""
    rows = sql(db_url, "SELECT id, received FROM upload_sessions")
    return {sid: json.loads(r) if isinstance(r, str) else r for sid, r in rows}


def test_0004_moves_upload_chunks_into_rows_and_deliveries_user_ids_into_a_column_and_back(
    db_url, registries
):
    """A database at 0003 with uploads under way (their chunks a JSON list of numbers as
    text) and deliveries of two users' events and of no user's: after the upgrade each upload
    answers the chunks it had and takes more, each user lists their own deliveries; a
    downgrade puts the lists back as 0003 kept them, and the next upgrade takes them again."""
    run_migrations(db_url, "0003")
    at = "'2026-01-01 00:00:00'"
    deliveries = [
        ("nd-ana", "u-ana", "ana@example.test"),
        ("nd-bo", "u-bo", "bo@example.test"),
        ("nd-ops", None, "ops@example.test"),
    ]
    sql(
        db_url,
        *(
            f"INSERT INTO users (id, name, email, is_admin, created_at) VALUES "
            f"('u-{name}', '{name}', '{name}@example.test', false, {at})"
            for name in ("ana", "bo")
        ),
        *(
            "INSERT INTO upload_sessions (id, file_name, total_size, total_chunks, received, "
            f"options, created_at) VALUES ('{sid}', 'm.zip', 120, 12, '{received}', '{{}}', {at})"
            for sid, received in (("up-a", '["1", "2", "10"]'), ("up-b", "[]"))
        ),
        *(
            "INSERT INTO notification_deliveries (id, kind, event, channel, target, status, "
            f"attempts, created_at, updated_at) VALUES ('{i}', 'deployment.deployed', "
            f"'{json.dumps(notify.new_event(notify.DEPLOYED, user, {}))}', 'email', '{target}', "
            f"'delivered', 1, {at}, {at})"
            for i, user, target in deliveries
        ),
    )

    reg = registries(db_url)  # what `raydock up` starts: upgrades
    assert revision_of(db_url) == migrations.head()
    assert schema_differences(db_url) == []
    assert reg.get_upload_session("up-a")["receivedChunks"] == [1, 2, 10]
    counts = {u["sessionId"]: u["chunksReceived"] for u in reg.list_upload_sessions()}
    assert counts == {"up-a": 3, "up-b": 0}
    assert reg.add_upload_chunk("up-a", 2)["receivedChunks"] == [1, 2, 10]  # had it already
    assert reg.add_upload_chunk("up-b", 4)["receivedChunks"] == [4]
    for i, user, target in deliveries[:2]:
        found = reg.deliveries_page(own=(user, [target, "ops@example.test"]))
        assert ([d["deliveryId"] for d in found["deliveries"]], found["total"]) == ([i], 1)
    reg.close()

    run_migrations(db_url, "0003", down=True)
    assert revision_of(db_url) == "0003"
    assert stored_lists(db_url) == {"up-a": ["1", "2", "10"], "up-b": ["4"]}
    assert "upload_chunks" not in inspect_tables(db_url)
    engine = db.make_engine(db_url)
    with engine.connect() as conn:
        columns = {c["name"]: c for c in inspect(conn).get_columns("upload_sessions")}
        kept = {c["name"] for c in inspect(conn).get_columns("notification_deliveries")}
    engine.dispose()
    assert columns["received"]["nullable"] is False and "user_id" not in kept

    again = registries(db_url)
    assert again.get_upload_session("up-b")["receivedChunks"] == [4]
    assert again.deliveries_page(own=("u-ana", ["ana@example.test"]))["total"] == 1


def test_a_pre_migration_database_that_does_not_match_is_refused_naming_what_differs(db_url):
    create_older_tables(db_url)
    sql(db_url, "ALTER TABLE models DROP COLUMN checksum")
    with pytest.raises(db.DatabaseRefused, match="table models lacks checksum"):
        Registry(db_url, lease_wait_s=0)
    assert revision_of(db_url) is None  # nothing written


def test_a_database_newer_than_this_raydock_is_refused_naming_its_revision(db_url, registries):
    registries(db_url).close()
    sql(db_url, "UPDATE alembic_version SET version_num = '0042_from_the_future'")
    with pytest.raises(db.DatabaseRefused, match="revision '0042_from_the_future'.*newer"):
        Registry(db_url, lease_wait_s=0)
    assert revision_of(db_url) == "0042_from_the_future"  # left as it was
    # the lease went back with the refusal: the next start is refused for the same reason
    with pytest.raises(db.DatabaseRefused, match="0042_from_the_future"):
        Registry(db_url, lease_wait_s=0)


def home_with(tmp_path: Path, monkeypatch, db_url: str) -> Path:
    """A data dir whose database is `db_url` (SQLite: moved into the dir, as `raydock up`
    would have it)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("RAYDOCK_HOME", str(home))
    monkeypatch.setenv("RAYDOCK_DATABASE_URL", db_url)
    return home


def no_ray(monkeypatch) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("Ray must not start for a database that cannot be used")

    monkeypatch.setattr("raydock.platform.bootstrap.connect", refuse)


def test_raydock_up_refuses_a_newer_database_in_one_line_before_ray_starts(
    db_url, registries, tmp_path, monkeypatch, capsys
):
    registries(db_url).close()
    sql(db_url, "UPDATE alembic_version SET version_num = '0042_from_the_future'")
    home_with(tmp_path, monkeypatch, db_url)
    no_ray(monkeypatch)
    assert cli.main(["up"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("raydock: the database is at schema")
    assert "'0042_from_the_future'" in err
    assert cli.main(["db", "current"]) == 1
    assert "0042_from_the_future" in capsys.readouterr().err


def test_db_commands_report_adopt_and_upgrade(db_url, tmp_path, monkeypatch, capsys):
    home_with(tmp_path, monkeypatch, db_url)
    create_older_tables(db_url)
    head = migrations.head()

    assert cli.main(["db", "history"]) == 0
    out = capsys.readouterr().out  # newest first, down to the baseline
    assert out.startswith(f"{head} (head)  ") and "\n0001  Initial schema" in out
    assert cli.main(["db", "current"]) == 0
    out = capsys.readouterr().out
    every = ", ".join(r.revision for r in reversed(migrations.history()))  # 0001, ..., head
    assert "revision: none (made before migrations" in out and f"pending: {every}\n" in out
    assert "lease: free" in out

    with Lease(db_url, "a running platform") as held:  # never under a platform's feet
        held.acquire()
        assert cli.main(["db", "upgrade"]) == 1
        err = capsys.readouterr().err
        assert f"pid {os.getpid()} on host" in err and "a running platform" in err
        assert cli.main(["db", "current"]) == 0
        assert f"lease: held by pid {os.getpid()}" in capsys.readouterr().out
    assert revision_of(db_url) is None

    assert cli.main(["db", "upgrade"]) == 0
    assert f"adopted (made before migrations), then upgraded from nothing to {head}" in (
        capsys.readouterr().out
    )
    assert schema_differences(db_url) == []
    assert cli.main(["db", "upgrade"]) == 0
    assert f"is at {head} (head)" in capsys.readouterr().out
    assert cli.main(["db", "current"]) == 0
    assert f"revision: {head} (head)" in capsys.readouterr().out


def test_a_plain_postgresql_url_means_psycopg_3():
    assert db.normalize_url("postgresql://u:p@h/d") == "postgresql+psycopg://u:p@h/d"
    assert db.normalize_url("postgres://h/d") == "postgresql+psycopg://h/d"
    assert db.safe_url("postgresql://u:secret@h/d") == "postgresql+psycopg://u:***@h/d"


# ---------------------------------------------------------------- the lease


def test_a_second_registry_is_refused_naming_the_holder_and_takes_over_once_it_lets_go(db_url):
    first = Registry(db_url)
    key = first.ensure_admin()
    started = time.monotonic()
    with pytest.raises(LeaseHeld, match=f"in use by another raydock platform \\(pid {os.getpid()}"):
        Registry(db_url, lease_wait_s=0)
    assert time.monotonic() - started < 2  # refused at once, not after a wait
    first.close()
    second = Registry(db_url, lease_wait_s=0)
    try:
        assert second.authenticate_management(key)["name"] == "admin"
    finally:
        second.close()


def test_a_restarted_registry_waits_for_its_predecessor_instead_of_failing(db_url):
    """The supervisor may create the next registry while the dead one's process is still
    going away: the new one waits for the lease rather than refusing or hanging."""
    first = Registry(db_url)
    threading.Timer(0.6, first.close).start()
    started = time.monotonic()
    second = Registry(db_url, lease_wait_s=10)
    took = time.monotonic() - started
    second.close()
    assert 0.5 < took < 5, took


HOLDER = """
import sys, time
from raydock.platform.lease import Lease
lease = Lease(sys.argv[1], "a platform that will be killed")
lease.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_holder_releases_the_lease_to_the_next_platform(db_url):
    """The OS (flock) or the server (advisory lock) releases a dead process's lease: a crashed
    platform never blocks the next start."""
    upgrade(db_url)  # the holder's row goes into platform_lease (PostgreSQL)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, db_url], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid} on host .*will be killed"):
            Lease(db_url).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lease = Lease(db_url, "next")
    lease.acquire(wait_s=5, any_holder=False)  # the dead holder is going away: a moment
    assert lease.held
    lease.release()


def test_raydock_up_refuses_a_held_database_in_one_line_before_ray_starts(
    db_url, tmp_path, monkeypatch, capsys
):
    home_with(tmp_path, monkeypatch, db_url)
    no_ray(monkeypatch)
    upgrade(db_url)  # as a running platform has it
    with Lease(db_url, "Ray session session_other") as held:
        held.acquire()
        started = time.monotonic()
        assert cli.main(["up"]) == 1
        assert time.monotonic() - started < 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("raydock: the database ") and "in use by another raydock platform" in err
    assert f"pid {os.getpid()} on host" in err and "session_other" in err


def test_postgresql_lease_survives_a_cut_connection_unless_another_took_it(pg_server):
    url = pg_server.new_database()
    reg = Registry(url)
    try:
        lease_pid = reg._lease._conn.execute(text("SELECT pg_backend_pid()")).scalar()
        reg._lease._conn.commit()
        cut = f"SELECT pg_terminate_backend({lease_pid})"
        sql(url, cut)
        assert reg._lease.check()  # nobody took it meanwhile: taken again
        assert reg.ensure_admin()
        # cut again, and another platform takes it before this one notices
        lease_pid = reg._lease._conn.execute(text("SELECT pg_backend_pid()")).scalar()
        reg._lease._conn.commit()
        sql(url, f"SELECT pg_terminate_backend({lease_pid})")
        other = Lease(url, "the other platform")
        other.acquire()
        assert not reg._lease.check()
        reg._lease.lost = "lost to the other platform"  # what the watch thread sets
        with pytest.raises(db.DatabaseRefused, match="lost to the other platform"):
            reg.ensure_admin()
        other.release()
    finally:
        reg.close()


def test_postgresql_lease_is_kept_through_an_outage_longer_than_one_check(pg_server):
    """The server refuses connections for several checks (a restart, a failover): each
    check keeps the lease (nobody can take it meanwhile), and it is taken again after."""
    url = pg_server.new_database()
    name = url.rsplit("/", 1)[-1]
    reg = Registry(url)
    try:
        lease_pid = reg._lease._conn.execute(text("SELECT pg_backend_pid()")).scalar()
        reg._lease._conn.commit()
        sql(pg_server.url(), f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        sql(pg_server.url(), f"SELECT pg_terminate_backend({lease_pid})")
        assert reg._lease.check() and reg._lease.check() and reg._lease.check()
        sql(pg_server.url(), f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        assert reg._lease.check() and reg._lease._conn is not None
        assert reg.ensure_admin() is not None
    finally:
        reg.close()


def test_an_in_memory_sqlite_needs_no_lease_file():
    reg = Registry("sqlite://")
    try:
        assert reg.ensure_admin()
    finally:
        reg.close()


def test_the_lease_file_sits_beside_the_sqlite_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    reg = Registry(url)
    try:
        assert (tmp_path / "x.db.lock").exists()
        (row,) = sql(url, "SELECT host, pid, platform FROM platform_lease")
        assert row.pid == os.getpid()
    finally:
        reg.close()
