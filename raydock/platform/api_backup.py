"""`POST /api/public/backup`: the platform's backup (platform/backup.py) as a download, for
admins, while the platform runs. `raydock backup FILE` calls it; restore needs the platform
stopped, so it is a CLI command only (`raydock restore FILE`)."""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from raydock.errors import ApiError
from raydock.platform import backup
from raydock.platform.api_deps import admin_user, ctx

router = APIRouter(prefix="/public")

TAR = "application/x-tar"


@router.post(
    "/backup",
    tags=["platform"],
    responses={200: {"content": {TAR: {"schema": {"type": "string", "format": "binary"}}}}},
)
async def make_backup(_: Annotated[dict[str, Any], Depends(admin_user)]) -> FileResponse:
    """A tar of the database (one consistent snapshot), the platform key and a local artifact
    store's files. It holds secrets (sealed tokens and the key that opens them): keep it as
    you keep the data dir. Restore it with `raydock restore FILE` on a stopped platform."""
    fd, path = tempfile.mkstemp(prefix="raydock-backup-", suffix=".tar")
    try:
        with os.fdopen(fd, "wb") as out:
            manifest = await run_in_threadpool(backup.write_backup, ctx.settings, out)
    except backup.BackupError as exc:
        os.unlink(path)
        raise ApiError(409, str(exc)) from None
    except BaseException:
        os.unlink(path)
        raise
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return FileResponse(
        path,
        media_type=TAR,
        filename=f"raydock-backup-{stamp}.tar",
        headers={"X-Raydock-Schema-Revision": manifest["database"]["revision"]},
        background=BackgroundTask(os.unlink, path),
    )
