"""`POST /api/public/backup`: the platform's backup (platform/backup.py) as a download, for
admins, while the platform runs. `raydock backup FILE` calls it; restore needs the platform
stopped, so it is a CLI command only (`raydock restore FILE`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from raydock.errors import ApiError
from raydock.platform import backup
from raydock.platform.api_deps import admin_user, ctx

router = APIRouter(prefix="/public")

TAR = "application/x-tar"
CHUNK_BYTES = 1 << 20


@router.post(
    "/backup",
    tags=["platform"],
    responses={200: {"content": {TAR: {"schema": {"type": "string", "format": "binary"}}}}},
)
async def make_backup(_: Annotated[dict[str, Any], Depends(admin_user)]) -> StreamingResponse:
    """A tar of the database (one consistent snapshot), the platform key and a local artifact
    store's files. It holds secrets (sealed tokens and the key that opens them): keep it as
    you keep the data dir. Restore it with `raydock restore FILE` on a stopped platform."""
    fd, path = tempfile.mkstemp(prefix="raydock-backup-", suffix=".tar")
    # nameless from now on: the open file is all that holds its bytes, freed when the download
    # ends however it ends (a cancelled one left the whole archive, secrets too, in /tmp)
    os.unlink(path)
    staged = os.fdopen(fd, "w+b")
    try:
        manifest = await run_in_threadpool(backup.write_backup, ctx.settings, staged)
    except backup.BackupError as exc:
        staged.close()
        raise ApiError(409, str(exc)) from None
    except BaseException:
        staged.close()
        raise
    size = staged.tell()
    staged.seek(0)

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while chunk := await run_in_threadpool(staged.read, CHUNK_BYTES):
                yield chunk
        finally:
            staged.close()

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(
        chunks(),
        media_type=TAR,
        headers={
            "Content-Disposition": f'attachment; filename="raydock-backup-{stamp}.tar"',
            "Content-Length": str(size),
            "X-Raydock-Schema-Revision": manifest["database"]["revision"],
        },
    )
