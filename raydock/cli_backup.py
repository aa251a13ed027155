"""`raydock backup FILE` and `raydock restore FILE` (platform/backup.py holds the logic).

Backup asks the running platform (`POST /api/public/backup`, an admin key) and saves the
archive it streams, with a progress bar. Restore works on a stopped platform's data dir and
database (the settings `raydock up` uses), under the platform lease, with no Ray."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path


def cmd_backup(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from raydock.cli import _client
    from raydock.client import ApiFailure, response_body

    client = _client(args)
    dest = Path(args.file)
    if dest.is_dir():  # refused before the whole archive streams in
        raise SystemExit(f"raydock: {dest} is a folder; name the backup file in it")
    if not dest.parent.is_dir():  # else the error would name the .part file
        raise SystemExit(f"raydock: {dest.parent} is not a folder; the backup goes into one")
    part = dest.with_name(dest.name + ".part")
    # the archive holds the platform key and sealed secrets: owner-only from the start
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # the mode above applies to a new file only, not a leftover .part
    try:
        with (
            os.fdopen(fd, "wb") as out,
            client.http.stream("POST", "/backup", timeout=None) as r,
        ):
            if r.status_code >= 400:
                r.read()
                raise ApiFailure(r.status_code, response_body(r))
            size = int(r.headers.get("content-length", 0)) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"backup {dest.name}") as bar:
                for chunk in r.iter_bytes(2**20):
                    out.write(chunk)
                    bar.update(len(chunk))
            revision = r.headers.get("x-raydock-schema-revision")
        part.replace(dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    print(f"backup written to {dest} (schema revision {revision})")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from raydock.cli import _settings
    from raydock.platform import backup, db
    from raydock.platform.lease import Lease

    settings = _settings(args)
    archive = Path(args.file)
    if not archive.is_file():
        raise FileNotFoundError(f"no backup at {archive}")
    made_home = not settings.home_path.exists()
    if db.normalize_url(settings.db_url).startswith("sqlite"):
        settings.home_path.mkdir(parents=True, exist_ok=True)  # for the lease's file
    done = None
    try:
        with Lease(settings.db_url, "raydock restore") as lease:
            lease.acquire(wait_s=5, any_holder=False)  # never under a running platform's feet
            try:
                done = backup.restore(settings, archive, force=args.force, progress=_say)
            except backup.BackupError as exc:
                print(f"raydock: {exc}", file=sys.stderr)
                return 1
    finally:
        if done is None and made_home:  # a failed restore leaves no data dir it made
            (settings.home_path / backup.LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # not empty: left as it is
                settings.home_path.rmdir()
    moved = f", migrated up to {done.head}" if done.head != done.revision else ""
    print(
        f"restored {sum(done.rows.values())} rows and {done.artifacts} artifact files into "
        f"{settings.home_path} (database {db.safe_url(settings.db_url)}, schema "
        f"{done.revision}{moved})"
    )
    if done.missing:
        print(
            f"warning: the artifact store lacks the files of {len(done.missing)} model(s): "
            f"{', '.join(done.missing)} (restore the bucket, or import them again)",
            file=sys.stderr,
        )
    print("start it with `raydock up`: deployments that were DEPLOYED deploy again")
    return 0


def _say(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `backup` and `restore` through cli.py's `add(name, func, help)`."""
    p = add("backup", cmd_backup, "write the running platform's backup to FILE (admin key)")
    p.add_argument("file", help="the archive to write (a tar)")
    p.add_argument("--url", help="platform URL (default from settings / RAYDOCK_URL)")
    p.add_argument("--key", help="admin management key (default RAYDOCK_API_KEY)")
    p = add("restore", cmd_restore, "restore a backup into a fresh data dir (platform stopped)")
    p.add_argument("file", help="an archive `raydock backup` wrote")
    p.add_argument(
        "--force", action="store_true", help="replace a data dir / database that holds data"
    )
