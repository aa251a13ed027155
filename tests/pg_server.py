"""A real PostgreSQL server for the tests, from Debian's `postgresql` package (`.ci/run`
installs it): `initdb` + `pg_ctl` in a temporary directory, on a free port of 127.0.0.1,
stopped and removed when the session ends. PostgreSQL refuses to run as root, so as root it
runs as the `postgres` system user the package creates (`runuser`), which owns its data
directory. One server per session; each test gets a database of its own (`new_database`).

    python -m tests.pg_server   # start one and print its URL until Ctrl-C (for a shell)
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

#: fast and throwaway: nothing here must survive a crash
SERVER_OPTIONS = (
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
    "-c max_connections=300 -c listen_addresses=127.0.0.1"
)


def find_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl (Debian keeps
    them off PATH), else a directory on PATH that has both."""
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for bin_dir in reversed(found):
        if (bin_dir / "pg_ctl").exists():
            return bin_dir
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="raydock-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self.user = "raydock"  # the database superuser initdb creates (trust auth, local only)
        self._as: list[str] = []
        if os.geteuid() == 0:  # postgres will not run as root
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no `postgres` user") from None
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *cmd: str, timeout: float = 60) -> None:
        subprocess.run(
            [*self._as, *cmd], check=True, capture_output=True, text=True, timeout=timeout
        )

    def start(self) -> PgServer:
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            f"-p {self.port} -k {self.root} {SERVER_OPTIONS}",
            "-w",
            "-t",
            "60",
            "start",
            timeout=90,
        )
        return self

    def url(self, database: str = "postgres") -> str:
        """The URL as README documents it (raydock reads `postgresql://` as psycopg 3)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres",
            autocommit=True,
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> PgServer:
    """A running server, or pytest.skip with why there cannot be one."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL's binaries are missing (no /usr/lib/postgresql/*/bin/initdb): "
            "apt-get install postgresql (.ci/run does)"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install -e .)")
    server = PgServer(bin_dir)
    try:
        return server.start()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError) as exc:
        log = server.log.read_text()[-2000:] if server.log.exists() else ""
        detail = getattr(exc, "stderr", "") or ""
        server.stop()
        raise RuntimeError(f"PostgreSQL did not start: {exc}\n{detail}\n{log}") from None


@pytest.fixture(scope="session")
def pg_server():
    server = start_server()
    yield server
    server.stop()


if __name__ == "__main__":
    s = PgServer(find_bin_dir() or Path("/nonexistent")).start()
    print(s.url(), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        s.stop()
