"""One platform owns a database at a time: the lease (README "Database").

The registry, the database's only writer, takes the lease before it migrates or writes
anything and holds it for its life; `raydock up` and `raydock db upgrade` check it before they
start. PostgreSQL: a session-level advisory lock held by a connection of the lease's own.
SQLite: an exclusive flock on `<database file>.lock`. The database server or the kernel
releases either when the holding process ends, however it ends, so a registry the platform's
supervisor creates again after a crash takes the lease over (it waits a few seconds for its
predecessor's process to be gone). Who holds it (host, pid, Ray session) is in the lock file
(SQLite) or the `platform_lease` row (PostgreSQL), so that a refusal can name the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import create_engine, delete, insert, select, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from raydock.platform import db

log = logging.getLogger("raydock.lease")

#: pg_try_advisory_lock(int4, int4): ('rydk', 1) is the platform lease in each database
PG_LOCK = (0x7279646B, 1)
#: how often a registry on PostgreSQL checks that its lock connection is still there
WATCH_INTERVAL_S = 5.0


class LeaseHeld(db.DatabaseRefused):
    def __init__(self, holder: Holder | None, url: str):
        self.holder = holder
        who = str(holder) if holder else "a process that has not said who it is yet"
        super().__init__(
            f"the database {db.safe_url(url)} is in use by another raydock platform ({who}); "
            "stop that one first, or give this one its own RAYDOCK_DATABASE_URL"
        )


@dataclass
class Holder:
    host: str
    pid: int
    platform: str = ""  # the holder's Ray session, or the command that holds it
    since: datetime | None = None  # UTC

    def __str__(self) -> str:
        out = f"pid {self.pid} on host {self.host}"
        if self.platform:
            out += f", {self.platform}"
        if self.since:
            out += f", since {self.since:%Y-%m-%d %H:%M:%S} UTC"
        return out

    def going_away(self) -> bool:
        """A holder on this host whose process has ended: its lock goes within moments."""
        return self.host == socket.gethostname() and not _alive(self.pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie holds nothing any more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def ray_session() -> str:
    """The Ray session this process belongs to ("" outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return f"Ray session {ray.get_runtime_context().get_session_name()}"
    except Exception:  # no Ray, or a Ray without sessions: say nothing
        pass
    return ""


class Lease:
    """The platform lease on one database URL. `acquire` takes it or raises LeaseHeld;
    `release` gives it back (so does the end of the process)."""

    def __init__(self, url: str, platform: str = ""):
        self.url = db.normalize_url(url)
        self.me = Holder(socket.gethostname(), os.getpid(), platform)
        u = make_url(self.url)
        self.kind = u.get_backend_name()
        self._file = None  # SQLite: the open lock file
        self._engine: Engine | None = None  # PostgreSQL: the lock connection's engine
        self._conn: Connection | None = None
        self._locked = False  # PostgreSQL: whether `_conn` holds the advisory lock
        self._guard = threading.RLock()
        self.lost: str | None = None  # why the lease was lost (PostgreSQL), once it was
        self._watch_stop = threading.Event()
        database = db.sqlite_file(self.url)
        self.path = Path(f"{database}.lock") if database is not None else None

    @property
    def held(self) -> bool:
        return self._file is not None or self._locked

    # ---------------------------------------------------------------- taking it

    def acquire(self, wait_s: float = 0.0, any_holder: bool = True) -> None:
        """Take the lease, waiting up to `wait_s` for the holder to let go: whoever it is
        (`any_holder`: a registry, whose predecessor may still be exiting), or only while the
        holder is going away (a process on this host that has ended) or has not said who it
        is yet. Raises LeaseHeld, naming the holder."""
        if self.held:
            return
        deadline = time.monotonic() + wait_s
        try:
            while not self._try():
                holder = self.holder()
                patient = any_holder or holder is None or holder.going_away()
                if not patient or time.monotonic() >= deadline:
                    raise LeaseHeld(holder, self.url)
                time.sleep(0.2)
        except BaseException:
            self.release()
            raise
        self.me.since = db.utcnow()
        self._write_holder()

    def _try(self) -> bool:
        if self.kind == "sqlite":
            if self.path is None:  # an in-memory database: nobody else can open it
                self._file = open(os.devnull, "rb")  # noqa: SIM115 (held until release)
                return True
            f = open(self.path, "a+")  # noqa: SIM115 (held until release)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                return False
            self._file = f
            return True
        if self.kind != "postgresql":
            raise db.DatabaseRefused(
                f"raydock supports SQLite and PostgreSQL databases, not {self.kind} "
                f"({db.safe_url(self.url)})"
            )
        if self._conn is None:
            self._engine = self._engine or create_engine(self.url, poolclass=NullPool)
            self._conn = self._engine.connect()
        got = self._conn.execute(text("SELECT pg_try_advisory_lock(:a, :b)"), _keys()).scalar()
        self._conn.commit()  # a session-level lock outlives the transaction
        self._locked = bool(got)
        return self._locked

    # ---------------------------------------------------------------- who holds it

    def _write_holder(self) -> None:
        if self._file is not None and self.path is not None:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(json.dumps(self._holder_dict()))
            self._file.flush()
        if self._locked:
            self.record()

    def _holder_dict(self) -> dict:
        return {
            "host": self.me.host,
            "pid": self.me.pid,
            "platform": self.me.platform,
            "since": self.me.since.isoformat() if self.me.since else None,
        }

    def record(self, engine: Engine | None = None) -> None:
        """Write the holder into `platform_lease` (nothing before the table exists: the
        first migration creates it, and the registry calls this again after migrating)."""
        row = {
            "id": 1,
            "host": self.me.host[:255],
            "pid": self.me.pid,
            "platform": self.me.platform[:200],
            "acquired_at": self.me.since or db.utcnow(),
        }
        table = db.PlatformLease.__table__
        try:
            if engine is None and self._locked and self._conn is not None:
                with self._guard, self._conn.begin():
                    self._conn.execute(delete(table))
                    self._conn.execute(insert(table).values(row))
            elif engine is not None:
                with engine.begin() as conn:
                    conn.execute(delete(table))
                    conn.execute(insert(table).values(row))
        except DBAPIError:  # no table yet (an empty or pre-migration database)
            if engine is not None:
                raise

    def holder(self) -> Holder | None:
        """Who holds the lease, as the holder wrote it (None: not known)."""
        try:
            if self.kind == "sqlite":
                if self.path is None or not self.path.exists():
                    return None
                raw = json.loads(self.path.read_text() or "null")
                if not raw:
                    return None
                since = datetime.fromisoformat(raw["since"]) if raw.get("since") else None
                return Holder(raw["host"], int(raw["pid"]), raw.get("platform", ""), since)
            self._engine = self._engine or create_engine(self.url, poolclass=NullPool)
            t = db.PlatformLease
            with self._engine.connect() as conn:
                row = conn.execute(
                    select(t.host, t.pid, t.platform, t.acquired_at).where(t.id == 1)
                ).first()
            return Holder(row.host, row.pid, row.platform, row.acquired_at) if row else None
        except Exception:  # no table, a half-written file: not known
            return None

    # ---------------------------------------------------------------- keeping it

    def check(self) -> bool:
        """Whether the lease is still this process's. On PostgreSQL a lost connection loses
        the lock: it is taken again on a new connection if nobody else took it meanwhile."""
        if self.kind != "postgresql" or not self.held:
            return self.held
        with self._guard:
            try:
                if self._conn is not None:  # None: lost at an earlier check, not back yet
                    held = self._conn.execute(
                        text(
                            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                            "AND classid = :a AND objid = :b AND objsubid = 2 "
                            "AND pid = pg_backend_pid() AND granted"
                        ),
                        _keys(),
                    ).scalar()
                    self._conn.commit()
                    return bool(held)
            except DBAPIError:  # the connection is gone, and the lock with it
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None
            try:
                if self._try():
                    log.warning("the database lease's connection was lost; took it again")
                    self.record()
                    return True
            except DBAPIError:  # the server is not back: nobody else can take it meanwhile
                self._conn, self._locked = None, True
                return True
            return False

    def watch(self, interval_s: float = WATCH_INTERVAL_S, on_lost=None) -> None:
        """PostgreSQL: check the lease every `interval_s` in a thread; once lost to another
        process, set `lost` and call `on_lost(reason)`."""
        if self.kind != "postgresql":
            return
        stop = self._watch_stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval_s):
                try:
                    if self.check():
                        continue
                except Exception:  # keep watching: a thread that ends watches nothing
                    log.exception("checking the database lease failed; checking again")
                    continue
                holder = self.holder()
                self.lost = (
                    f"this platform lost the database lease to {holder or 'another process'} "
                    "(its connection to the database was cut)"
                )
                log.error(self.lost)
                if on_lost is not None:
                    on_lost(self.lost)
                return

        threading.Thread(target=run, name="raydock-lease-watch", daemon=True).start()

    # ---------------------------------------------------------------- giving it back

    def release(self) -> None:
        self._watch_stop.set()
        with self._guard:
            if self._file is not None:
                with contextlib.suppress(OSError):
                    if self.path is not None:
                        self._file.truncate(0)
                    fcntl.flock(self._file, fcntl.LOCK_UN)
                self._file.close()
                self._file = None
            if self._conn is not None and self._locked:
                with contextlib.suppress(Exception):
                    self._conn.execute(text("SELECT pg_advisory_unlock(:a, :b)"), _keys())
                    self._conn.commit()
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None
            self._locked = False
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_exc) -> None:
        self.release()


def _keys() -> dict[str, int]:
    return {"a": PG_LOCK[0], "b": PG_LOCK[1]}
