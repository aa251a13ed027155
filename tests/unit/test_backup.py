"""Backup and restore (platform/backup.py) without Ray, and a migration that changes the
schema under data: on a real SQLite file and a real PostgreSQL server (tests/pg_server.py).

The upgrade tests add a test-only revision 9001 on top of this raydock's head in a temporary
script location (`ship_next_revision`): a column added with its rows
back-filled, the kind of change an upgrade of raydock makes. The same code path as `raydock
up` applies it (the registry's `make_sessionmaker(create=True)` → `migrations.upgrade`).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import sqlalchemy
from cryptography.fernet import Fernet

from raydock.config import load_settings
from raydock.platform import backup, db, migrations, security
from raydock.platform.registry import Registry
from raydock.platform.secrets import KEY_FILE, platform_key
from tests.s3_server import drop_bucket, s3_server
from tests.unit.test_migrations import inspect_tables, revision_of, sql

TEST_REVISION = '''"""Test only: deployments get an owner_note, back-filled from their name.

Revision ID: 9001
Revises: {down}
"""

import sqlalchemy as sa
from alembic import op

revision = "9001"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("owner_note", sa.String(250), nullable=False, server_default=""))
    op.execute("UPDATE deployments SET owner_note = 'was ' || name")


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("owner_note")
'''


def ship_next_revision(tmp_path: Path, monkeypatch, breaks_off: bool = False) -> str:
    """From now on this raydock's revisions are its own plus 9001 (above) on top of its head,
    as the next raydock would ship them; returns 9001. `breaks_off`: its upgrade fails after
    the column is added (a crash, a Ctrl-C)."""
    down = migrations.head()
    location = tmp_path / "migrations"
    shutil.copytree(
        migrations.SCRIPT_LOCATION, location, ignore=shutil.ignore_patterns("__pycache__")
    )
    text = TEST_REVISION.format(down=down)
    if breaks_off:
        broken = '    raise RuntimeError("broke off")\n    op.execute('
        text = text.replace("    op.execute(", broken)
    (location / "versions" / "9001_owner_note.py").write_text(text)
    monkeypatch.setattr(migrations, "SCRIPT_LOCATION", location)
    migrations.scripts.cache_clear()
    return "9001"


@pytest.fixture(autouse=True)
def _forget_shipped_revisions():
    yield
    migrations.scripts.cache_clear()  # monkeypatch put SCRIPT_LOCATION back


def populated(home: Path, **settings_: str) -> dict:
    """A platform's data dir with a user, keys, a READY model whose files are in the artifact
    store (local unless `settings_` say otherwise), a deployment with history, and its
    platform key; what a test checks afterwards."""
    settings = load_settings(home=str(home), **settings_)
    reg = Registry(settings.db_url, secret_key=platform_key(home))
    try:
        admin_key = reg.ensure_admin()
        admin = reg.authenticate_management(admin_key)
        model = reg.create_model("tiny", "file", admin["userId"])
    finally:
        reg.close()
    weights = home / "staging"
    weights.mkdir()
    (weights / "config.json").write_text('{"hidden_size": 8}')
    (weights / "model.safetensors").write_bytes(b"\x01" * 4096)
    prefix = f"models/{model['modelId']}"
    digest = settings.store().put_dir(weights, prefix).digest
    shutil.rmtree(weights)
    sql(
        settings.db_url,
        f"UPDATE models SET status='READY', artifact_uri='{prefix}', checksum='{digest}' "
        f"WHERE id='{model['modelId']}'",
        "INSERT INTO deployments (id, model_id, name, status, config, description, tags, "
        "timeout_s, added_on, updated_at) VALUES ('dep-1', "
        f"'{model['modelId']}', 'chat', 'DEPLOYED', '{{}}', '', '[]', 60, "
        "'2026-01-02 03:04:05', '2026-01-02 03:04:05')",
        "INSERT INTO deployment_versions (deployment_id, version, name, config, started_at, "
        "result) VALUES ('dep-1', 1, 'chat_v1', '{}', '2026-01-02 03:04:05', 'SUCCESS')",
    )
    return {
        "settings": settings,
        "admin_key": admin_key,
        "model": model["modelId"],
        "prefix": prefix,
        "secret": (home / KEY_FILE).read_bytes(),
    }


def take_backup(settings, path: Path) -> dict:
    with path.open("wb") as out:
        return backup.write_backup(settings, out)


def test_a_backup_restores_rows_keys_secret_and_artifacts_into_a_fresh_data_dir(tmp_path, db_url):
    src = populated(tmp_path / "src")
    archive = tmp_path / "raydock.tar"
    manifest = take_backup(src["settings"], archive)
    assert manifest["database"]["revision"] == migrations.head()
    assert manifest["database"]["tables"]["deployment_versions"] == 1
    assert manifest["artifacts"]["copied"] and manifest["artifacts"]["files"] == 3
    assert manifest["secretKey"] == "file"

    target = load_settings(home=str(tmp_path / "restored"), database_url=db_url)
    done = backup.restore(target, archive)
    assert done.head == migrations.head() and done.missing == []
    assert done.rows["models"] == 1 and done.artifacts == 3

    # the platform key came back (sealed secrets open), and with it the same files
    assert (target.home_path / KEY_FILE).read_bytes() == src["secret"]
    assert (target.home_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    store = target.store()
    assert (
        store.read_manifest(src["prefix"]).digest
        == sql(target.db_url, f"SELECT checksum FROM models WHERE id='{src['model']}'")[0][0]
    )
    # the admin's key (stored hashed) opens the restored platform; history is there
    reg = Registry(target.db_url, lease_wait_s=0)
    try:
        assert reg.authenticate_management(src["admin_key"])["isAdmin"]
    finally:
        reg.close()
    (row,) = sql(target.db_url, "SELECT name, result, started_at FROM deployment_versions")
    assert row[:2] == ("chat_v1", "SUCCESS") and str(row[2]).startswith("2026-01-02 03:04:05")
    # the serial id goes on after the restored ones (PostgreSQL's sequence was moved)
    sql(
        target.db_url,
        "INSERT INTO deployment_versions (deployment_id, version, name, config, started_at, "
        "result) VALUES ('dep-1', 2, 'chat_v2', '{}', '2026-01-02 03:04:05', 'SUCCESS')",
    )


def test_a_restore_whose_secrets_would_not_open_is_refused_before_writing(tmp_path, monkeypatch):
    """Sealed tokens open only with the key they were sealed with: a backup taken with
    RAYDOCK_SECRET_KEY needs it set again, and an archived key file must not be shadowed by
    another RAYDOCK_SECRET_KEY (both went unnoticed until a connection failed)."""
    monkeypatch.delenv("RAYDOCK_SECRET_KEY", raising=False)
    src = populated(tmp_path / "src")
    with_file = tmp_path / "file.tar"
    take_backup(src["settings"], with_file)
    target = load_settings(home=str(tmp_path / "t1"))
    monkeypatch.setenv("RAYDOCK_SECRET_KEY", Fernet.generate_key().decode())
    with pytest.raises(backup.BackupError, match="RAYDOCK_SECRET_KEY here is another key"):
        backup.restore(target, with_file)
    assert not (target.home_path / KEY_FILE).exists()
    monkeypatch.setenv("RAYDOCK_SECRET_KEY", src["secret"].decode())  # the same key: fine
    backup.restore(target, with_file)

    configured = tmp_path / "configured.tar"
    take_backup(src["settings"], configured)  # the key is the operator's: not archived
    monkeypatch.delenv("RAYDOCK_SECRET_KEY")
    other = load_settings(home=str(tmp_path / "t2"))
    with pytest.raises(backup.BackupError, match="this environment has none"):
        backup.restore(other, configured)
    # another configured key: the manifest's check of the key (never the key) tells
    monkeypatch.setenv("RAYDOCK_SECRET_KEY", Fernet.generate_key().decode())
    with pytest.raises(backup.BackupError, match="RAYDOCK_SECRET_KEY here is another key"):
        backup.restore(other, configured)
    assert src["secret"] not in configured.read_bytes()
    monkeypatch.setenv("RAYDOCK_SECRET_KEY", src["secret"].decode())
    backup.restore(other, configured)


def test_a_large_table_is_written_without_holding_it_in_memory(tmp_path, monkeypatch):
    """A table was built as a list of JSON lines, joined, then encoded: three copies of it
    in the API replica's memory (a year of usage rows took gigabytes)."""
    import tracemalloc
    from datetime import datetime, timedelta

    src = populated(tmp_path / "src")
    engine = db.make_engine(src["settings"].db_url)
    monkeypatch.setattr(backup, "SPOOL_BYTES", 2**20)  # the same, at a test's size
    start, rows = datetime(2026, 1, 1), 30_000
    with engine.begin() as conn:
        conn.execute(
            db.Usage.__table__.insert(),
            [
                {
                    "minute": start + timedelta(minutes=i),
                    "deployment_id": "dep-1",
                    "adapter_id": "",
                    "key_id": "k-1",
                    "requests": 1,
                    "prompt_tokens": 10,
                    "completion_tokens": 20,
                }
                for i in range(rows)
            ],
        )
    engine.dispose()
    tracemalloc.start()
    try:
        manifest = take_backup(src["settings"], tmp_path / "raydock.tar")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert manifest["database"]["tables"]["usage"] == rows
    with tarfile.open(tmp_path / "raydock.tar") as tar:
        size = tar.getmember("database/usage.jsonl").size
    assert peak < size / 2, (size, peak)  # the table's text is never held whole


def test_restore_refuses_a_data_dir_in_use_unless_forced(tmp_path):
    src = populated(tmp_path / "src")
    archive = tmp_path / "raydock.tar"
    take_backup(src["settings"], archive)
    other = populated(tmp_path / "other")
    with pytest.raises(backup.BackupError, match="is not empty.*--force"):
        backup.restore(other["settings"], archive)
    assert sql(other["settings"].db_url, "SELECT id FROM models") == [(other["model"],)]
    backup.restore(other["settings"], archive, force=True)
    assert sql(other["settings"].db_url, "SELECT id FROM models") == [(src["model"],)]
    assert not other["settings"].store().list(other["prefix"])  # the old store was emptied


def test_a_forced_restore_into_a_database_a_newer_raydock_upgraded_is_refused(tmp_path):
    """The wipe drops the tables this raydock knows: a newer raydock's table stayed, with
    the restored data under it, and an upgrade to that raydock later failed on it."""
    src = populated(tmp_path / "src")
    archive = tmp_path / "raydock.tar"
    take_backup(src["settings"], archive)
    newer = populated(tmp_path / "newer")
    url = newer["settings"].db_url
    sql(
        url,
        "CREATE TABLE future_things (id TEXT)",
        "UPDATE alembic_version SET version_num = '0099'",
    )
    with pytest.raises(backup.BackupError, match="revision '0099', which this raydock does not"):
        backup.restore(newer["settings"], archive, force=True)
    assert sql(url, "SELECT id FROM models") == [(newer["model"],)]  # nothing written


def test_a_backup_from_a_newer_raydock_is_refused_naming_both_revisions(tmp_path):
    archive = tmp_path / "future.tar"
    with tarfile.open(archive, "w") as tar:
        doc = json.dumps({"format": 1, "database": {"revision": "0099"}}).encode()
        info = tarfile.TarInfo(backup.MANIFEST)
        info.size = len(doc)
        tar.addfile(info, io.BytesIO(doc))
    home = tmp_path / "fresh"
    with pytest.raises(backup.BackupError) as refused:
        backup.restore(load_settings(home=str(home)), archive)
    assert "'0099'" in str(refused.value) and f"'{migrations.head()}'" in str(refused.value)
    assert not home.exists()  # nothing written

    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"")
    with pytest.raises(backup.BackupError, match="not a raydock backup"):
        backup.restore(load_settings(home=str(home)), junk)


def test_a_failed_raydock_restore_leaves_no_data_dir_behind(tmp_path, monkeypatch, capsys):
    """`raydock restore` makes the data dir to hold the lease's file; a restore that fails
    removes it again (it left `raydock.db.lock` in a new directory)."""
    from raydock import cli

    monkeypatch.delenv("RAYDOCK_DATABASE_URL", raising=False)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"")
    home = tmp_path / "new"
    assert cli.main(["restore", str(junk), "--home", str(home)]) == 1
    assert "not a raydock backup" in capsys.readouterr().err
    assert not home.exists()
    kept = tmp_path / "kept"  # a data dir that was there stays, as it was
    kept.mkdir()
    assert cli.main(["restore", str(junk), "--home", str(kept)]) == 1
    assert kept.is_dir()


def test_an_upgrade_that_changes_the_schema_keeps_the_data(db_url, tmp_path, monkeypatch):
    """A database made by the previous version (this raydock's head) with data in it, then
    opened by the next raydock (head 9001): `raydock up`'s path migrates it, and every row
    is intact."""
    previous = migrations.head()
    future_revision = ship_next_revision(tmp_path, monkeypatch)
    engine = db.make_engine(db_url)
    try:
        with engine.begin() as conn:
            migrations._run(conn, previous)  # what the previous raydock made
    finally:
        engine.dispose()
    key = security.new_key(security.MANAGEMENT_PREFIX)
    sql(
        db_url,
        "INSERT INTO users (id, name, is_admin, created_at) VALUES "
        "('u-1', 'ops', true, '2026-01-01 00:00:00')",
        "INSERT INTO api_keys (id, key_hash, prefix, name, scope, user_id, created_at) VALUES "
        f"('k-1', '{security.hash_key(key)}', 'x', 'ops', 'management', 'u-1', "
        "'2026-01-01 00:00:00')",
        "INSERT INTO models (id, name, source, kind, model_type, status, description, tags, "
        "meta, created_at) VALUES ('cm-1', 'tiny', 'file', 'base', 'openSource', 'READY', '', "
        "'[]', '{}', '2026-01-01 00:00:00')",
        "INSERT INTO deployments (id, model_id, name, status, config, description, tags, "
        "timeout_s, added_on, updated_at) VALUES ('dep-1', 'cm-1', 'chat', 'DEPLOYED', "
        "'{\"deviceType\": \"cpu-small\"}', '', '[]', 60, '2026-01-01 00:00:00', "
        "'2026-01-01 00:00:00')",
    )
    assert revision_of(db_url) == previous
    reg = Registry(db_url, lease_wait_s=0)  # raydock up starts the registry; it migrates
    try:
        assert reg.authenticate_management(key)["name"] == "ops"
    finally:
        reg.close()
    assert revision_of(db_url) == future_revision
    rows = sql(db_url, "SELECT id, name, status, config, owner_note FROM deployments")
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [("dep-1", "chat", "DEPLOYED", "was chat")]
    config = rows[0][3]
    assert (json.loads(config) if isinstance(config, str) else config) == {
        "deviceType": "cpu-small"
    }
    assert sql(db_url, "SELECT id, status FROM models") == [("cm-1", "READY")]


def deployment_columns(url: str) -> list[str]:
    engine = db.make_engine(url)
    try:
        return [c["name"] for c in sqlalchemy.inspect(engine).get_columns("deployments")]
    finally:
        engine.dispose()


def test_an_upgrade_that_breaks_off_changes_nothing_and_can_be_run_again(
    db_url, tmp_path, monkeypatch
):
    """On SQLite the column an upgrade added before it broke off stayed, under the old
    revision: every later `raydock up` failed on "duplicate column name"."""
    previous = migrations.head()
    engine = db.make_engine(db_url)
    try:
        migrations.upgrade(engine)
        columns = deployment_columns(db_url)
        ship_next_revision(tmp_path, monkeypatch, breaks_off=True)
        with pytest.raises(RuntimeError, match="broke off"):
            migrations.upgrade(engine)
        assert revision_of(db_url) == previous
        assert deployment_columns(db_url) == columns
        assert not [t for t in inspect_tables(db_url) if t.startswith("_alembic_tmp")]
        fixed = TEST_REVISION.format(down=previous)  # the same upgrade, mended, run again
        (tmp_path / "migrations" / "versions" / "9001_owner_note.py").write_text(fixed)
        migrations.scripts.cache_clear()
        assert migrations.upgrade(engine)[1] == "9001"
    finally:
        engine.dispose()
    assert deployment_columns(db_url) == [*columns, "owner_note"]


def test_a_backup_of_the_previous_version_restores_and_is_migrated_up(
    tmp_path, db_url, monkeypatch
):
    src = populated(tmp_path / "src")  # at this raydock's head
    previous = migrations.head()
    archive = tmp_path / "raydock.tar"
    take_backup(src["settings"], archive)
    ship_next_revision(tmp_path, monkeypatch)  # the next raydock restores it
    target = load_settings(home=str(tmp_path / "restored"), database_url=db_url)
    done = backup.restore(target, archive)
    assert (done.revision, done.head) == (previous, "9001")
    assert sql(db_url, "SELECT name, owner_note FROM deployments") == [("chat", "was chat")]
    assert revision_of(db_url) == "9001"
    assert sql(db_url, "SELECT count(*) FROM api_keys")[0][0] == 1


def add_escaping_file(archive: Path) -> None:
    """A file whose path leads out of the artifact store: its restore fails, after the rows."""
    with tarfile.open(archive, "a") as tar:
        info = tarfile.TarInfo("artifacts/../../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))


def test_an_archive_with_a_path_out_of_the_store_is_refused_and_nothing_stays(tmp_path):
    src = populated(tmp_path / "src")
    archive = tmp_path / "raydock.tar"
    take_backup(src["settings"], archive)
    add_escaping_file(archive)
    target = load_settings(home=str(tmp_path / "restored"))
    with pytest.raises(backup.BackupError, match="outside the artifact store"):
        backup.restore(target, archive)
    assert not (tmp_path / "escaped").exists()
    # undone: no rows, no key, no artifacts
    assert not (target.home_path / KEY_FILE).exists()
    assert not target.store().list("")
    assert sql(target.db_url, "SELECT name FROM sqlite_master WHERE type='table'") == []


def test_a_forced_restore_that_fails_leaves_the_old_data_as_it_was(tmp_path, db_url):
    """The target was wiped (tables dropped, store deleted), then wiped again on the failure,
    key file included: neither the old data nor the new was left."""
    src = populated(tmp_path / "src")
    archive = tmp_path / "raydock.tar"
    take_backup(src["settings"], archive)
    add_escaping_file(archive)  # fails after the rows, as the files come
    other = populated(tmp_path / "other", database_url=db_url)
    settings = other["settings"]
    files = sorted(settings.store().list(""))
    key = (settings.home_path / KEY_FILE).read_bytes()
    with pytest.raises(backup.BackupError, match="outside the artifact store"):
        backup.restore(settings, archive, force=True)
    assert sql(settings.db_url, "SELECT id FROM models") == [(other["model"],)]
    assert sorted(settings.store().list("")) == files and files
    assert (settings.home_path / KEY_FILE).read_bytes() == key
    assert not (settings.home_path / (KEY_FILE + backup.RESTORING)).exists()


def test_a_restore_that_failed_in_a_fresh_data_dir_can_run_again(tmp_path):
    """It left an empty raydock.db behind: the next restore called the data dir not empty."""
    src = populated(tmp_path / "src")
    good = tmp_path / "raydock.tar"
    take_backup(src["settings"], good)
    bad = tmp_path / "bad.tar"
    shutil.copy(good, bad)
    add_escaping_file(bad)
    target = load_settings(home=str(tmp_path / "restored"))
    with pytest.raises(backup.BackupError, match="outside the artifact store"):
        backup.restore(target, bad)
    backup.restore(target, good)  # not refused as "not empty"
    assert sql(target.db_url, "SELECT id FROM models") == [(src["model"],)]


def test_an_s3_store_is_not_copied_and_restore_names_models_whose_files_are_missing(tmp_path):
    with s3_server() as s3:
        on_s3 = {"artifact_root": s3.uri, "s3_endpoint_url": s3.endpoint_url}
        src = populated(tmp_path / "src", **on_s3)
        archive = tmp_path / "raydock.tar"
        manifest = take_backup(src["settings"], archive)
        assert not manifest["artifacts"]["copied"] and manifest["artifacts"]["store"] == s3.uri
        # the same bucket: nothing missing
        same = load_settings(home=str(tmp_path / "same"), **on_s3)
        assert backup.restore(same, archive).missing == []
        # an empty bucket: the model whose files it lacks is named
        s3.client().create_bucket(Bucket="empty-bucket")
        empty = load_settings(
            home=str(tmp_path / "empty"),
            artifact_root="s3://empty-bucket",
            s3_endpoint_url=s3.endpoint_url,
        )
        assert backup.restore(empty, archive).missing == [src["model"]]
        drop_bucket(s3.client(), "empty-bucket")
