"""Backups of a platform's state, and restores into a fresh data dir.

A backup is one tar file:

- `raydock-backup.json` (last: written once the counts are known): format, the schema
  revision, row counts, what the artifact store is and whether its files are in the archive;
- `database/<table>.jsonl`: every row, read in one consistent snapshot (SQLite: a copy made
  with its online backup API; PostgreSQL: one REPEATABLE READ transaction). Rows, not a
  backend's dump, so a SQLite backup restores into PostgreSQL and back;
- `secret.key`: the platform key that seals Hugging Face tokens, webhook URLs and secrets (absent
  when the operator sets RAYDOCK_SECRET_KEY: they keep that key themselves). The archive is
  therefore as secret as the data dir: it is written mode 0600;
- `artifacts/<key>`: a local artifact store's files (models, optimized and merged weights):
  deleting the data dir deletes them. An S3 store is not copied (the bucket outlives the data
  dir and is backed up as a bucket); restore checks that the models' manifests are there.

Not in a backup: uploads in progress and their chunks, export zips, the platform lease.
Restore creates the schema at the archive's revision, loads the rows, then runs the
migrations up to this raydock's head; a backup from a newer raydock is refused. Deployments
that were DEPLOYED come back on the next `raydock up` (lifecycle's restart recovery).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from alembic.runtime.migration import MigrationContext
from sqlalchemy import DateTime, MetaData, Table, func, inspect, select, text
from sqlalchemy.engine import Connection, Engine, make_url

from raydock.artifacts import ArtifactError, LocalStore
from raydock.artifacts.store import check_key
from raydock.config import Settings
from raydock.platform import db, migrations
from raydock.platform.secrets import KEY_FILE

log = logging.getLogger("raydock.backup")

FORMAT = 1
MANIFEST = "raydock-backup.json"
#: the suffix of the archive's key file while a restore runs
RESTORING = ".restoring"
# a process's; and an upload's, whose chunks are files of the data dir (skipped too)
SKIPPED_TABLES = {"platform_lease", "upload_sessions", "upload_chunks"}
SKIPPED_AREAS = ("uploads/", "exports/")  # store areas that are transient
INSERT_BATCH = 500
LOCK_FILE = "raydock.db.lock"  # the SQLite lease's file (lease.py), held by the restore itself

Progress = Callable[[str], None]  # one line of what is happening


class BackupError(Exception):
    """A backup cannot be written or restored; the message says why and what to do."""


def _quiet(_line: str) -> None:
    pass


# ------------------------------------------------------------------ reading the database


def _encode(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


@contextmanager
def _snapshot(db_url: str) -> Iterator[Connection]:
    """A connection that sees one consistent state of the whole database."""
    url = db.normalize_url(db_url)
    if url.startswith("sqlite"):
        # the online backup API copies a consistent image while the registry writes on
        source = make_url(url).database
        with tempfile.TemporaryDirectory(prefix="raydock-backup-") as tmp:
            copy = Path(tmp) / "snapshot.db"
            src, dst = sqlite3.connect(source, timeout=30), sqlite3.connect(copy)
            try:
                src.backup(dst)
            finally:
                src.close()
                dst.close()
            engine = db.make_engine(f"sqlite:///{copy}")
            try:
                with engine.connect() as conn:
                    yield conn
            finally:
                engine.dispose()
        return
    engine = db.make_engine(url)
    try:
        snapshot = engine.connect().execution_options(isolation_level="REPEATABLE READ")
        with snapshot as conn, conn.begin():
            yield conn
    finally:
        engine.dispose()


def _dump_database(conn: Connection, tar: tarfile.TarFile, progress: Progress) -> dict:
    st = migrations.state(conn)
    if st.revision is None or st.pending:
        raise BackupError(
            f"the database is at revision {st.revision or 'none'}, not this raydock's "
            f"{st.head}: start the platform (or `raydock db upgrade`) first"
        )
    counts = {}
    for table in db.Base.metadata.sorted_tables:
        if table.name in SKIPPED_TABLES:
            continue
        counts[table.name] = _dump_table(conn, table, tar)
        progress(f"database: {table.name} ({counts[table.name]} rows)")
    return {"revision": st.revision, "backend": conn.dialect.name, "tables": counts}


#: a table's text held in memory before it goes to a temporary file
SPOOL_BYTES = 8 * 2**20


def _dump_table(conn: Connection, table: Table, tar: tarfile.TarFile) -> int:
    """A table's rows as JSON lines into the archive, read in batches and spooled to disk
    past SPOOL_BYTES (a year of usage rows, held whole three times over, took gigabytes of the API
    replica's memory); the number of rows."""
    rows = conn.execution_options(yield_per=1000).execute(select(table))
    count = 0
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
        for row in rows:
            if count:
                spool.write(b"\n")
            line = {k: _encode(v) for k, v in row._mapping.items()}
            spool.write(json.dumps(line, separators=(",", ":")).encode())
            count += 1
        size = spool.tell()
        spool.seek(0)
        _add_file(tar, f"database/{table.name}.jsonl", spool, size)
    return count


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o600) -> None:
    _add_file(tar, name, io.BytesIO(data), len(data), mode)


def _add_file(
    tar: tarfile.TarFile, name: str, data: IO[bytes], size: int, mode: int = 0o600
) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, mode, int(datetime.now(UTC).timestamp())
    tar.addfile(info, data)


# ------------------------------------------------------------------ writing a backup


def write_backup(settings: Settings, out: IO[bytes], progress: Progress = _quiet) -> dict:
    """Write the platform's backup to `out` (a binary file); returns its manifest. Safe while
    the platform runs: the database is read in one snapshot, store files are never changed in
    place (a write renames a new file over the old), and files are copied after the snapshot,
    so everything the snapshot records was stored before it was taken."""
    with tarfile.open(fileobj=out, mode="w") as tar:
        with _snapshot(settings.db_url) as conn:
            database = _dump_database(conn, tar, progress)
        manifest = {
            "format": FORMAT,
            "createdAt": datetime.now(UTC).isoformat(),
            "database": database,
            "secretKey": _add_secret(settings, tar),
            "secretKeyCheck": _key_check(os.environ.get("RAYDOCK_SECRET_KEY", "")),
            "artifacts": _add_artifacts(settings, tar, progress),
        }
        # last, once the counts are known (restore looks it up by name before anything else)
        _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest


def _key_check(key: str) -> str | None:
    """What tells, without the key, whether a restore runs with the configured key the
    backup's platform had (an HMAC of a constant under it); None when none is configured."""
    key = key.strip()
    if not key:
        return None
    return hmac.new(key.encode(), b"raydock backup: the secret key", hashlib.sha256).hexdigest()


def _add_secret(settings: Settings, tar: tarfile.TarFile) -> str:
    if os.environ.get("RAYDOCK_SECRET_KEY"):
        return "configured"  # the operator keeps it; never written into an archive
    path = settings.home_path / KEY_FILE
    if not path.exists():
        return "none"
    _add_bytes(tar, KEY_FILE, path.read_bytes())
    return "file"


def _add_artifacts(settings: Settings, tar: tarfile.TarFile, progress: Progress) -> dict:
    store = settings.store()
    keys = [k for k in store.list("") if not k.startswith(SKIPPED_AREAS)]
    if not isinstance(store, LocalStore):  # S3: the bucket keeps them
        return {"store": store.uri, "copied": False, "files": len(keys), "bytes": 0}
    copied = size = 0
    for key in keys:
        path = store.local_path(key)
        try:
            with path.open("rb") as f:  # open first: a file deleted since list() is skipped
                info = tar.gettarinfo(fileobj=f, arcname=f"artifacts/{key}")
                info.mode = 0o600
                tar.addfile(info, f)
        except FileNotFoundError:
            continue
        copied, size = copied + 1, size + info.size
        if copied % 20 == 0:
            progress(f"artifacts: {copied}/{len(keys)} files, {size / 2**20:.1f} MiB")
    progress(f"artifacts: {copied} files, {size / 2**20:.1f} MiB")
    return {"store": store.uri, "copied": True, "files": copied, "bytes": size}


# ------------------------------------------------------------------ restoring


@dataclass
class Restored:
    revision: str  # the archive's
    head: str  # the database's now
    rows: dict[str, int] = field(default_factory=dict)
    artifacts: int = 0
    missing: list[str] = field(default_factory=list)  # models whose files are not in the store


def read_manifest(tar: tarfile.TarFile, name: str) -> dict:
    try:
        member = tar.getmember(MANIFEST)
    except KeyError:
        raise BackupError(f"{name} is not a raydock backup (it has no {MANIFEST})") from None
    manifest = json.loads(tar.extractfile(member).read())
    if manifest.get("format") != FORMAT:
        raise BackupError(
            f"{name} is a backup in format {manifest.get('format')!r}; "
            f"this raydock reads format {FORMAT}"
        )
    return manifest


def check_revision(revision: str) -> None:
    """Refuse a backup whose schema this raydock does not know (a newer raydock wrote it)."""
    if not migrations._known(revision):
        raise BackupError(
            f"the backup's schema is at revision {revision!r}, which this raydock does not know "
            f"(its newest is {migrations.head()!r}): restore it with the raydock that wrote it, "
            "or a newer one"
        )


def _check_target_revision(settings: Settings) -> None:
    """Refuse a target database a newer raydock upgraded: the wipe drops only the tables this
    raydock knows, and would leave that one's (an upgrade to it later fails on them)."""
    engine = db.make_engine(settings.db_url)
    try:
        with engine.connect() as conn:
            revision = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    if revision is not None and not migrations._known(revision):
        raise BackupError(
            f"the database {db.safe_url(settings.db_url)} is at schema revision {revision!r}, "
            f"which this raydock does not know (its newest is {migrations.head()!r}): a newer "
            "raydock upgraded it; restore with that raydock, or into an empty database"
        )


def _raydock_tables(conn: Connection) -> set[str]:
    ours = set(db.Base.metadata.tables) | {"alembic_version"}
    return set(inspect(conn).get_table_names()) & ours


def _local_root(settings: Settings) -> Path | None:
    """A local artifact store's directory (None: S3)."""
    store = settings.store()
    return store.root if isinstance(store, LocalStore) else None


def _not_empty(settings: Settings) -> str | None:
    """Why the target is not a fresh data dir, or None. Looks at the data dir and the store
    before opening the database (opening a SQLite file creates it)."""
    home = settings.home_path
    if home.exists():
        left = sorted(p.name for p in home.iterdir() if p.name != LOCK_FILE)
        if left:
            return f"the data dir {home} is not empty ({', '.join(left[:5])})"
    root = _local_root(settings)
    if root is not None and root.exists() and any(root.iterdir()):
        return f"the artifact store {root} is not empty"
    engine = db.make_engine(settings.db_url)
    try:
        with engine.connect() as conn:
            for name in sorted(_raydock_tables(conn) - {"alembic_version", "platform_lease"}):
                table = Table(name, MetaData())
                if conn.execute(select(func.count()).select_from(table)).scalar():
                    return f"the database {db.safe_url(settings.db_url)} holds data ({name})"
    finally:
        engine.dispose()
    return None


def restore(
    settings: Settings, archive: Path, force: bool = False, progress: Progress = _quiet
) -> Restored:
    """Bring the data dir and database of `settings` to the archive's state, then migrate it
    up to this raydock's head. Refuses, having written nothing, an archive from a newer
    raydock and a target that is not fresh (unless `force`: its tables are dropped and a
    local store emptied first); a restore that fails part way is undone. The caller holds
    the platform lease."""
    try:
        with tarfile.open(archive) as tar:
            manifest = read_manifest(tar, str(archive))
            revision = manifest["database"]["revision"]
            member = tar.extractfile(KEY_FILE) if KEY_FILE in tar.getnames() else None
            archived_key = member.read().strip() if member else None
    except (tarfile.TarError, ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{archive} is not a raydock backup ({exc})") from None
    check_revision(revision)
    _check_secret_key(manifest.get("secretKey"), archived_key, manifest.get("secretKeyCheck"))
    settings.home_path.mkdir(parents=True, exist_ok=True)
    db_file = db.sqlite_file(settings.db_url)
    made_db_file = db_file is not None and not db_file.exists()

    def forget_db_file() -> None:  # a retry into this data dir must find it fresh
        if made_db_file:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db_file}{suffix}").unlink(missing_ok=True)

    try:
        why = _not_empty(settings)
        _check_target_revision(settings)  # --force or not: its tables are not all raydock's
        if why and not force:
            raise BackupError(f"{why}: restore needs a fresh one, or --force to replace it")
        old_store = _set_store_aside(settings)
    except BaseException:
        forget_db_file()
        raise
    result = Restored(revision=revision, head=migrations.head())
    # the archive's key goes beside the target's until the rows are in: a crash meanwhile
    # (the transaction rolled back) leaves the key that opens the old rows' secrets
    new_key = settings.home_path / (KEY_FILE + RESTORING)
    engine = db.make_engine(settings.db_url)
    try:
        # one transaction (DDL included: SQLite's too, db.make_engine): what was there stays
        # if any of it fails, a forced restore's old data included
        with tarfile.open(archive) as tar, engine.begin() as conn:
            _drop_raydock_tables(conn)  # a fresh target may still hold empty tables
            migrations._run(conn, revision)
            tables = MetaData()
            tables.reflect(conn)
            for member in tar:
                _restore_member(settings, conn, tables, tar, member, result, progress)
            _fix_sequences(conn, tables)
            migrations._run(conn, "head")
    except BaseException:
        engine.dispose()
        new_key.unlink(missing_ok=True)
        forget_db_file()
        _put_store_back(settings, old_store)
        raise
    if new_key.exists():
        new_key.replace(settings.home_path / KEY_FILE)
    if old_store is not None:
        shutil.rmtree(old_store, ignore_errors=True)
    try:
        result.missing = _missing_models(settings, engine)
    finally:
        engine.dispose()
    return result


def _set_store_aside(settings: Settings) -> Path | None:
    """Move a local artifact store that holds files aside (kept until the restore succeeds,
    put back if it fails); where it went."""
    root = _local_root(settings)
    if root is None or not root.exists() or not any(root.iterdir()):
        return None
    aside = root.with_name(f"{root.name}.before-restore-{os.getpid()}-{int(time.time())}")
    try:
        root.rename(aside)
    except OSError as exc:  # a mount point, say
        raise BackupError(
            f"the artifact store {root} cannot be set aside for the restore ({exc}); a "
            "forced restore needs it renamed while it runs"
        ) from None
    return aside


def _put_store_back(settings: Settings, aside: Path | None) -> None:
    """After a failed restore: its files go, and the store set aside comes back (or, when
    that fails, the log says where it is)."""
    root = _local_root(settings)
    try:
        if root is not None and root.exists():
            shutil.rmtree(root)  # what the failed restore wrote
        if aside is not None and root is not None:
            aside.rename(root)
    except OSError as exc:
        log.error(
            "the artifact store was not put back after the failed restore: %r; its files are in %s",
            exc,
            aside,
        )


def _check_secret_key(kind: str | None, archived: bytes | None, check: str | None) -> None:
    """Refuse, before anything is written, a restore whose sealed secrets (Hugging Face
    tokens, webhook URLs and secrets) the restored platform could not open: its key would
    differ."""
    configured = os.environ.get("RAYDOCK_SECRET_KEY", "").strip().encode()
    if kind == "configured" and not configured:
        raise BackupError(
            "this backup's secrets are sealed with the RAYDOCK_SECRET_KEY its platform was "
            "given, and this environment has none: set it (here and for raydock up), then "
            "restore again"
        )
    if kind == "configured" and check and check != _key_check(configured.decode()):
        raise BackupError(
            "this backup's secrets are sealed with the RAYDOCK_SECRET_KEY its platform was "
            "given, and RAYDOCK_SECRET_KEY here is another key: set that one (here and for "
            "raydock up), then restore again"
        )
    if kind == "file" and configured and archived and configured != archived:
        raise BackupError(
            "this backup carries its platform key, but RAYDOCK_SECRET_KEY here is another "
            "key and would be used instead, leaving the restored secrets unreadable: unset it "
            "(or set it to the archived key), then restore again"
        )


def _restore_member(
    settings: Settings,
    conn: Connection,
    tables: MetaData,
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    result: Restored,
    progress: Progress,
) -> None:
    if member.name.startswith("database/"):
        name = member.name.removeprefix("database/").removesuffix(".jsonl")
        if name not in tables.tables:
            raise BackupError(f"the backup has a table {name!r} that its revision lacks")
        result.rows[name] = _load_rows(conn, tables.tables[name], tar.extractfile(member))
        progress(f"database: {name} ({result.rows[name]} rows)")
    elif member.name == KEY_FILE:
        _write_secret(settings.home_path, tar.extractfile(member).read(), KEY_FILE + RESTORING)
    elif member.name.startswith("artifacts/") and member.isfile():
        _write_artifact(settings, member, tar)
        result.artifacts += 1
        if result.artifacts % 20 == 0:
            progress(f"artifacts: {result.artifacts} files")


def _drop_raydock_tables(conn: Connection) -> None:
    tables = MetaData()
    tables.reflect(conn, only=sorted(_raydock_tables(conn)))
    tables.drop_all(conn)


def _load_rows(conn: Connection, table: Table, lines: IO[bytes]) -> int:
    dates = {c.name for c in table.columns if isinstance(c.type, DateTime)}
    batch, count = [], 0
    for raw in lines:
        if not raw.strip():
            continue
        row = json.loads(raw)
        for name in dates & row.keys():
            if row[name] is not None:
                row[name] = datetime.fromisoformat(row[name])
        unknown = row.keys() - set(table.columns.keys())
        if unknown:
            raise BackupError(f"table {table.name} has no column {sorted(unknown)[0]!r}")
        batch.append(row)
        if len(batch) >= INSERT_BATCH:
            conn.execute(table.insert(), batch)
            count, batch = count + len(batch), []
    if batch:
        conn.execute(table.insert(), batch)
        count += len(batch)
    return count


def _fix_sequences(conn: Connection, tables: MetaData) -> None:
    """PostgreSQL: rows came with their ids, so serial sequences must move past them."""
    if conn.dialect.name != "postgresql":
        return
    for table in tables.tables.values():
        for col in table.primary_key.columns:
            seq = conn.execute(
                text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": table.name, "c": col.name}
            ).scalar()
            if seq:
                top = conn.execute(select(func.max(col))).scalar()
                conn.execute(text("SELECT setval(:s, :v, false)"), {"s": seq, "v": (top or 0) + 1})


def _write_secret(home: Path, key: bytes, name: str = KEY_FILE) -> None:
    home.mkdir(parents=True, exist_ok=True)
    path = home / name
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key)


def _write_artifact(settings: Settings, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
    try:
        key = check_key(member.name.removeprefix("artifacts/"))  # never outside the store root
    except ValueError as exc:
        raise BackupError(f"the backup holds a file outside the artifact store: {exc}") from None
    store = settings.store()
    dest = store.local_path(key)
    if dest is None:  # the backup copied a local store; this platform uses S3: upload it
        with tempfile.NamedTemporaryFile() as tmp:
            shutil.copyfileobj(tar.extractfile(member), tmp)
            tmp.flush()
            store.put_file(Path(tmp.name), key)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("wb") as out:
        shutil.copyfileobj(tar.extractfile(member), out)


def _missing_models(settings: Settings, engine: Engine) -> list[str]:
    """READY models whose stored files the store lacks (an S3 bucket not restored, say)."""
    store, missing = settings.store(), []
    with engine.connect() as conn:
        rows = conn.execute(
            select(db.Model.id, db.Model.artifact_uri).where(db.Model.status == "READY")
        )
        for model_id, prefix in rows:
            if not prefix:
                continue
            try:
                store.read_manifest(prefix)
            except ArtifactError:
                missing.append(model_id)
    return missing
