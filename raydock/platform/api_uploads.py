"""Model uploads: one multipart request, or a chunked session (start, chunks, complete, or
cancel). Both land in the data dir's `uploads/` folder until the import takes the zip: a
multipart body's file is written there as it arrives (SPOOL_SUFFIX) and renamed to the
import's zip, never copied.

A session's chunks stay on disk until it completes, is cancelled (DELETE), or lies idle for
`upload_session_ttl_s` (default a day): the API replica sweeps such sessions, and folders
no session names, every UPLOAD_SWEEP_INTERVAL_S. An upload the disk cannot hold beside what
the open sessions still need is refused before it starts (and a chunk the disk could not
take, when it comes): 413, nothing kept. What each session has written is kept in memory as
its chunks come (UploadBytes), read from its folder the first time: a chunk costs the same
however many came before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

from fastapi import APIRouter, File, Form, HTTPException, Request, Response, UploadFile
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, Headers
from starlette.formparsers import MultiPartException, MultiPartParser

from raydock.errors import ApiError, limited_receive
from raydock.jsontypes import NUL
from raydock.platform import schemas
from raydock.platform.api_deps import User, ctx, current_user, job_ref

log = logging.getLogger("raydock.api")

router = APIRouter(prefix="/public")

UPLOAD_SWEEP_INTERVAL_S = 600.0
#: headers and directory of a zip beyond its entries' bytes: a zip this much larger than
#: max_archive_bytes cannot hold an acceptable model (weights barely compress)
ZIP_OVERHEAD_BYTES = 64 * 2**20
#: a multipart import's body beyond its zip: the part headers and the other form fields
FORM_OVERHEAD_BYTES = 2**20
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: a chunk reaches the disk in writes this large, each in a worker thread: a slow disk
#: never stalls the API event loop that every other management call shares
WRITE_BYTES = 2**20
#: one start at a time measures the free disk and claims its share: two starts in the same
#: instant would each see the other's space as free (the API runs as one replica)
_STARTING = asyncio.Lock()
#: sessions whose chunks are being assembled: a second complete would import them twice
_COMPLETING: set[str] = set()
#: a multipart body's file while it arrives, in the uploads folder (then renamed to a .zip)
SPOOL_SUFFIX = ".receiving"


def zip_name(file_name: str) -> str:
    name = Path(file_name or "").name
    if NUL in name:  # PostgreSQL's text cannot hold it (jsontypes.NUL)
        raise ApiError(422, "file: its name must not contain a NUL character", param="file")
    if not name.lower().endswith(".zip") or len(name) <= 4:
        raise ApiError(400, f"file must be a .zip archive (got {name!r})", param="file")
    return name[:-4]


def size_refusal(total_size: int, max_archive_bytes: int, chunked: bool = True) -> ApiError | None:
    """An upload over the archive limit (413), whatever the disk or its chunking."""
    limit = max_archive_bytes + ZIP_OVERHEAD_BYTES
    if total_size <= limit:
        return None
    param, what = ("totalSize", "totalSize") if chunked else ("file", "the file of")
    return ApiError(
        413,
        f"{what} {total_size} bytes is over the platform's archive limit of {limit} "
        f"bytes (max_archive_bytes {max_archive_bytes} plus zip overhead)",
        param,
        "archive_too_large",
    )


def storage_refusal(
    total_size: int,
    max_archive_bytes: int,
    free_bytes: int,
    promised_bytes: int = 0,
    chunked: bool = True,
) -> ApiError | None:
    """Why an upload of `total_size` bytes cannot succeed here: over the archive limit, or
    more than the disk can hold besides what the open uploads still need (`promised_bytes`)."""
    if too_large := size_refusal(total_size, max_archive_bytes, chunked):
        return too_large
    return disk_refusal(total_size, free_bytes, promised_bytes, chunked)


def disk_refusal(
    total_size: int, free_bytes: int, promised_bytes: int = 0, chunked: bool = True
) -> ApiError | None:
    """An upload the disk cannot hold beside what the open uploads still need (413). A
    chunked upload needs twice its size (the chunks, then the zip assembled from them); a
    multipart import once (its body, written straight into the uploads folder and renamed)."""
    needed = 2 * total_size if chunked else total_size
    if needed <= free_bytes - promised_bytes:
        return None
    param, what = ("totalSize", "totalSize") if chunked else ("file", "the upload of")
    promised = f", {promised_bytes} of them promised to open uploads" if promised_bytes else ""
    copies = "the chunks and the zip assembled from them" if chunked else "its body, written once"
    return ApiError(
        413,
        f"{what} {total_size} bytes needs {needed} bytes free on the server "
        f"({copies}); {free_bytes} are free{promised}",
        param,
        "insufficient_storage",
    )


async def _disk_room(root: Path) -> tuple[int, int]:
    """The bytes free where uploads are kept, and those the open sessions still need (with
    _STARTING held, so that no other upload claims the same space meanwhile)."""
    open_sessions = await ctx.registry.list_upload_sessions.remote()
    promised = await asyncio.to_thread(promised_bytes, open_sessions, root)
    return shutil.disk_usage(root).free, promised


def chunking_problem(total_size: int, total_chunks: int, max_chunk_bytes: int) -> str | None:
    """Why `total_size` bytes cannot arrive in `total_chunks` chunks (None: they can)."""
    if total_chunks > total_size:
        return (
            f"totalChunks {total_chunks} is more than totalSize {total_size}: every chunk "
            "holds a byte at least"
        )
    if total_size > total_chunks * max_chunk_bytes:
        least = -(-total_size // max_chunk_bytes)
        return (
            f"totalSize {total_size} in {total_chunks} chunks needs chunks over the "
            f"{max_chunk_bytes} byte limit: send at least {least} chunks"
        )
    return None


def stored_chunks(folder: Path) -> dict[int, int] | None:
    """The bytes of each chunk kept in an upload's folder, by chunk number (its .part files:
    a .tmp that a request which died left goes with the folder).
    None: there is no folder (the session was cancelled, swept, or is being made)."""
    try:
        with os.scandir(folder) as entries:
            return {
                int(entry.name.removesuffix(".part")): entry.stat().st_size
                for entry in entries
                if entry.name.endswith(".part")
            }
    except FileNotFoundError:  # removed meanwhile, with all its chunks
        return None


class UploadBytes:
    """What one upload session has on its disk: each chunk kept, and those being written.
    Kept up to date as chunks arrive, so that a chunk's limit and a start's promised space
    cost the same however many chunks came before (a scan of the folder per chunk made an
    upload's bookkeeping grow with the square of its chunks)."""

    def __init__(self, stored: dict[int, int]):
        self.stored = stored  # chunk number -> bytes of its .part file
        self.writing: dict[int, int] = {}  # chunk number -> bytes of its .tmp so far
        self.total = sum(stored.values())

    def besides(self, chunk: int) -> int:
        """Bytes in the other chunks (a chunk sent again replaces its own)."""
        return self.total - self.stored.get(chunk, 0) - self.writing.get(chunk, 0)

    def wrote(self, chunk: int, size: int) -> None:
        """`size` more bytes of `chunk` reached its .tmp file."""
        self.writing[chunk] = self.writing.get(chunk, 0) + size
        self.total += size

    def finished(self, chunk: int, size: int, kept: bool) -> None:
        """A request wrote `size` bytes of `chunk`: kept (its .tmp replaced the .part), or
        not (the .tmp removed)."""
        left = self.writing.pop(chunk, 0) - size
        if left > 0:  # another request for the same chunk is writing too
            self.writing[chunk] = left
        self.total -= size
        if kept:
            self.total += size - self.stored.get(chunk, 0)
            self.stored[chunk] = size


#: each upload folder's UploadBytes, read from disk the first time this process needs it:
#: after a restart the folders are the truth
_UPLOAD_BYTES: dict[Path, UploadBytes] = {}
#: one reading of a folder at a time: a chunk written meanwhile would be counted by a
#: reading that then lost to another, or by neither
_READING = threading.Lock()


def upload_bytes(folder: Path) -> UploadBytes | None:
    """An upload folder's UploadBytes (None: no such folder). Blocking, the first time a
    folder is asked for: call it in a thread."""
    with _READING:
        known = _UPLOAD_BYTES.get(folder)
        if known is None:
            stored = stored_chunks(folder)
            if stored is None:
                return None
            known = _UPLOAD_BYTES[folder] = UploadBytes(stored)
        return known


def forget_upload_bytes(folder: Path) -> None:
    """After the folder was removed (with the _READING lock: a reading of it finishes first)."""
    with _READING:
        _UPLOAD_BYTES.pop(folder, None)


def promised_bytes(sessions: Iterable[dict[str, Any]], root: Path) -> int:
    """Disk space the open upload sessions still need: twice each one's size (its chunks, then
    the zip assembled from them) less what it has already written to its folder."""
    promised = 0
    for s in sessions:
        written = upload_bytes(root / s["sessionId"])
        promised += max(0, 2 * s["totalSize"] - (written.total if written else 0))
    return promised


@contextlib.contextmanager
def _storing(partial: Path, what: str, session_id: str | None = None) -> Iterator[None]:
    """Writing `partial` (`what`, for messages): whatever fails, the partial file goes; a
    full disk is a 413, and a session folder removed meanwhile (cancelled or swept) a 404."""
    try:
        yield
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if session_id and isinstance(exc, FileNotFoundError):
            raise _gone(session_id) from None
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            raise _disk_full(what) from None
        raise


def _disk_full(what: str) -> ApiError:
    return ApiError(
        413, f"the server's disk is full: {what} was not stored", None, "insufficient_storage"
    )


def _gone(session_id: str) -> ApiError:
    return ApiError(404, f"upload session {session_id} was cancelled or expired", "sessionId")


def idle_spools(root: Path, now: float, ttl_s: float) -> list[Path]:
    """Multipart bodies being received (SPOOL_SUFFIX) untouched over `ttl_s`: left by a
    request that died with its process (a live one's file moves with each write); and zips
    as old, which their import never took (the lifecycle died before it staged them, within
    seconds, and removed them)."""
    idle = []
    with contextlib.suppress(FileNotFoundError), os.scandir(root) as entries:
        for entry in entries:
            if entry.name.endswith((SPOOL_SUFFIX, ".zip")) and entry.is_file():
                with contextlib.suppress(FileNotFoundError):  # its request ended meanwhile
                    if now - entry.stat().st_mtime > ttl_s:
                        idle.append(Path(entry.path))
    return sorted(idle)


def idle_uploads(
    sessions: Iterable[dict[str, Any]], root: Path, now: float, ttl_s: float
) -> list[str]:
    """Ids of the sessions, and of folders in `root` no session names, idle over `ttl_s`:
    last active at their start or their newest chunk (a folder's mtime moves with each)."""
    started = {s["sessionId"]: s["startedAt"] for s in sessions}
    folders = (
        {p.name: p.stat().st_mtime for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}
    )
    idle = []
    for sid in started.keys() | folders.keys():
        last = max(started.get(sid, 0.0), folders.get(sid, 0.0))
        if now - last > ttl_s:
            idle.append(sid)
    return sorted(idle)


async def _start_import(
    zip_path: Path,
    file_name: str,
    user: dict,
    kind: str,
    base_model_id: str | None,
    description: str,
    tags: list[str],
) -> dict[str, Any]:
    if problem := schemas.import_kind_problem(kind, base_model_id):
        zip_path.unlink(missing_ok=True)
        raise ApiError(400, problem, param="baseModelId")
    try:
        begun = await ctx.registry.begin_import.remote(
            zip_name(file_name), "file", user["userId"], kind, base_model_id, description, tags
        )
    except Exception:
        zip_path.unlink(missing_ok=True)
        raise
    model, job = begun["model"], begun["job"]
    try:
        await ctx.lifecycle.submit_import.remote(
            model["modelId"], job["dockStatusId"], str(zip_path), kind
        )
    except Exception:  # the lifecycle is restarting: reconciliation fails the job it never got
        zip_path.unlink(missing_ok=True)
        raise
    return {**job_ref(job), "model": model}


class _SpoolingParser(MultiPartParser):
    """Starlette's multipart parser, but a file part is written straight into a named file
    in the uploads folder, which the import then takes by renaming it: Starlette's own spool
    (a temporary file elsewhere) had to be copied there, twice the writes and the disk."""

    def __init__(
        self,
        headers: Headers,
        stream: AsyncGenerator[bytes, None],
        folder: Path,
        spools: list[tuple[Path, BinaryIO]],
    ):
        super().__init__(headers, stream)
        self.folder, self.spools = folder, spools

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        upload = self._current_part.file  # an UploadFile when the part has a filename
        if upload is not None:
            path = self.folder / f"{uuid.uuid4()}{SPOOL_SUFFIX}"
            upload.file.close()  # the empty in-memory spool Starlette opened for it
            upload.file = path.open("w+b")
            self.spools.append((path, upload.file))


class _ImportRequest(Request):
    """The multipart import's request: its form parsed by _SpoolingParser. The files it
    wrote and the route did not take are removed by discard_spools, whatever happened."""

    def __init__(self, scope, receive, folder: Path):
        super().__init__(scope, receive)
        self.folder = folder
        self.spools: list[tuple[Path, BinaryIO]] = []

    async def form(self, **limits: Any) -> FormData:  # FastAPI's `await request.form()`
        content_type, _ = parse_options_header(self.headers.get("Content-Type"))
        if content_type != b"multipart/form-data":
            return await super().form(**limits)  # then no file: FastAPI's 422 names it
        parser = _SpoolingParser(self.headers, self.stream(), self.folder, self.spools)
        try:
            return await parser.parse()
        except MultiPartException as exc:  # as Starlette's own parsing answers it
            raise HTTPException(400, exc.message) from None
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise _disk_full("the upload") from None
            raise

    def discard_spools(self) -> None:
        for path, file in self.spools:
            file.close()
            path.unlink(missing_ok=True)  # gone already when the route took it


class _ImportRoute(APIRoute):
    """The multipart import's route. Its body is read before the route runs, and the request
    guard leaves it to this route (it may exceed max_request_bytes). Before a byte is read:
    the caller is authenticated (no one else has the server write an upload), and the body
    is held to the archive limit and to the free disk from its Content-Length (without one,
    refused as soon as it outgrows the limit, and the route checks the disk after)."""

    def get_route_handler(self):
        handle = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            headers = request.headers
            await current_user(request, headers.get("x-api-key"), headers.get("authorization"))
            archive = ctx.settings.max_archive_bytes
            limit = archive + ZIP_OVERHEAD_BYTES + FORM_OVERHEAD_BYTES
            refusal = ApiError(
                413,
                f"the upload exceeds the {limit} byte limit of an import (max_archive_bytes "
                f"{archive} plus zip and form overhead)",
                "file",
                "archive_too_large",
            )
            receive = limited_receive(request.scope, request.receive, limit, lambda: refusal)
            root = ctx.settings.uploads_path
            root.mkdir(parents=True, exist_ok=True)
            declared = headers.get("content-length", "")
            if declared.isdigit():
                async with _STARTING:  # once a chunked upload starting now has claimed its share
                    free, promised = await _disk_room(root)
                if too_full := disk_refusal(int(declared), free, promised, chunked=False):
                    raise too_full
            spooling = _ImportRequest(request.scope, receive, root)
            try:
                return await handle(spooling)
            finally:
                spooling.discard_spools()

        return bounded


def _spooled(file: UploadFile) -> Path:
    """Where _SpoolingParser wrote a multipart import's file."""
    path = Path(getattr(file.file, "name", ""))
    if path.suffix != SPOOL_SUFFIX:
        raise RuntimeError("the multipart import's file was not written by _SpoolingParser")
    return path


async def import_model(
    user: User,
    file: Annotated[UploadFile, File(description="A .zip in Hugging Face layout")],
    kind: Annotated[Literal["base", "adapter"], Form()] = "base",
    baseModelId: Annotated[str | None, Form()] = None,
    description: Annotated[str, Form(max_length=2000)] = "",
    tags: Annotated[str, Form(description="Comma-separated")] = "",
) -> dict[str, Any]:
    """Import a model `.zip` in one multipart request (see files/session for large files)."""
    zip_name(file.filename or "")
    schemas.refuse_nul(baseModelId=baseModelId, description=description, tags=tags)
    tag_list = schemas.parse_tags(tags)
    spooled, size = _spooled(file), file.size or 0
    async with _STARTING:  # once a chunked upload starting now has claimed its share
        free, promised = await _disk_room(spooled.parent)
    # its bytes are on the uploads disk already: the room it had is what is free now and its
    # own size (checked from the Content-Length too, before they came, when it had one)
    if refusal := storage_refusal(
        size, ctx.settings.max_archive_bytes, free + size, promised, chunked=False
    ):
        raise refusal
    await file.close()  # flushed: the import reads it by name
    dest = spooled.with_suffix(".zip")
    await asyncio.to_thread(spooled.rename, dest)  # the import takes the file: no copy
    return await _start_import(
        dest, file.filename or "", user, kind, baseModelId, description, tag_list
    )


router.add_api_route(
    "/models/import",
    import_model,
    methods=["POST"],
    tags=["models"],
    status_code=202,
    route_class_override=_ImportRoute,
)


# ------------------------------------------------------------------ chunked upload session


def _session_dir(session_id: str) -> Path:
    return ctx.settings.uploads_path / session_id


@router.post("/files/session/start", tags=["files"], status_code=201)
async def upload_start(body: schemas.UploadSessionStart, user: User) -> dict[str, Any]:
    """Open a chunked upload: send chunks 1..totalChunks, then complete (or DELETE it)."""
    if too_large := size_refusal(body.totalSize, ctx.settings.max_archive_bytes):
        raise too_large  # first: no chunking would make it fit
    if problem := chunking_problem(
        body.totalSize, body.totalChunks, ctx.settings.upload_chunk_max_bytes
    ):
        raise ApiError(400, problem, "totalChunks", "invalid_chunking")
    if body.kind == "adapter":  # refused now, not after the last chunk
        await ctx.registry.check_base_model.remote(body.baseModelId)
    root = ctx.settings.uploads_path
    root.mkdir(parents=True, exist_ok=True)
    async with _STARTING:
        free, promised = await _disk_room(root)
        refusal = storage_refusal(body.totalSize, ctx.settings.max_archive_bytes, free, promised)
        if refusal:
            raise refusal
        session = await ctx.registry.create_upload_session.remote(body.model_dump(), user["userId"])
    _session_dir(session["sessionId"]).mkdir(parents=True, exist_ok=True)
    return {
        **session,
        "maxChunkBytes": ctx.settings.upload_chunk_max_bytes,
        "expiresAfterIdleSeconds": ctx.settings.upload_session_ttl_s,
    }


@router.put("/files/session/{sessionId}/chunks/{chunkNumber}", tags=["files"])
@router.post("/files/session/{sessionId}/chunks/{chunkNumber}", tags=["files"])
async def upload_chunk(
    sessionId: str, chunkNumber: int, request: Request, _: User
) -> dict[str, Any]:
    """Send one chunk as the raw request body (application/octet-stream)."""
    session = await ctx.registry.get_upload_session.remote(sessionId)
    if not 1 <= chunkNumber <= session["totalChunks"]:
        raise ApiError(
            400, f"chunkNumber must be between 1 and {session['totalChunks']}", "chunkNumber"
        )
    folder = _session_dir(sessionId)
    written = await asyncio.to_thread(upload_bytes, folder)
    if written is None:
        raise _gone(sessionId)
    part = folder / f"{chunkNumber:06d}.part"
    # a file of this request's own: a retry of the chunk while this one still arrives
    # truncated it, and its rename left this request writing into the .part
    tmp = folder / f"{chunkNumber:06d}.{uuid.uuid4().hex}.tmp"
    # the upload may not outgrow the totalSize its disk space was checked for
    others = written.besides(chunkNumber)
    left = session["totalSize"] - others
    limit = min(ctx.settings.upload_chunk_max_bytes, left)
    size, in_tmp = 0, 0  # bytes received, and those of them written to tmp
    pending = bytearray()  # written in WRITE_BYTES pieces, off the event loop

    async def write(out: BinaryIO) -> None:
        nonlocal pending, in_tmp
        await asyncio.to_thread(out.write, pending)
        written.wrote(chunkNumber, len(pending))
        in_tmp += len(pending)
        pending = bytearray()

    try:
        with _storing(tmp, f"chunk {chunkNumber}", sessionId):
            with await asyncio.to_thread(tmp.open, "wb") as out:
                async for piece in request.stream():
                    size += len(piece)
                    if size > limit:
                        message = _chunk_too_large(limit, left, others, session)
                        raise ApiError(413, message, "chunk")
                    pending += piece
                    if len(pending) >= WRITE_BYTES:
                        await write(out)
                await write(out)
            await asyncio.to_thread(tmp.replace, part)  # a re-sent chunk replaces its copy
    except BaseException:
        written.finished(chunkNumber, in_tmp, kept=False)
        raise
    written.finished(chunkNumber, in_tmp, kept=True)
    return await ctx.registry.add_upload_chunk.remote(sessionId, chunkNumber)


@router.get("/files/session", tags=["files"])
async def upload_sessions(_: User) -> dict[str, Any]:
    """Open upload sessions, oldest first: an upload broken off, to resume or cancel."""
    sessions = await ctx.registry.list_upload_sessions.remote()
    return {"sessions": sessions, "total": len(sessions)}


@router.get("/files/session/{sessionId}", tags=["files"])
async def upload_status(sessionId: str, _: User) -> dict[str, Any]:
    return await ctx.registry.get_upload_session.remote(sessionId)


@router.delete("/files/session/{sessionId}", tags=["files"])
async def upload_cancel(sessionId: str, _: User) -> dict[str, Any]:
    """Cancel an upload: its chunks are deleted and the session ends (not while it is being
    completed: 409)."""
    await ctx.registry.get_upload_session.remote(sessionId)  # 404 if there is none
    if sessionId in _COMPLETING:  # its chunks are being assembled into the import's zip
        raise ApiError(409, f"upload session {sessionId} is being completed", "sessionId")
    await _drop(sessionId)
    return {"deleted": True, "sessionId": sessionId}


def _chunk_too_large(limit: int, left: int, others: int, session: dict[str, Any]) -> str:
    if limit < left:
        return f"chunk exceeds the {limit} byte limit"
    return (
        f"chunk would take the upload past its totalSize of {session['totalSize']} bytes "
        f"({others} received in its other chunks, so {max(left, 0)} left)"
    )


async def _drop(session_id: str) -> None:
    folder = _session_dir(session_id)
    await asyncio.to_thread(shutil.rmtree, folder, True)
    await asyncio.to_thread(forget_upload_bytes, folder)
    await ctx.registry.delete_upload_session.remote(session_id)


@router.post("/files/session/{sessionId}/complete", tags=["files"], status_code=202)
async def upload_complete(sessionId: str, user: User) -> dict[str, Any]:
    """Assemble the chunks and start the import. A refusal keeps the session and its chunks:
    re-send a chunk and complete again, or cancel."""
    if sessionId in _COMPLETING:
        raise ApiError(409, f"upload session {sessionId} is already completing", "sessionId")
    _COMPLETING.add(sessionId)
    try:
        return await _complete(sessionId, user)
    finally:
        _COMPLETING.discard(sessionId)


async def _complete(sessionId: str, user: dict[str, Any]) -> dict[str, Any]:
    session = await ctx.registry.get_upload_session.remote(sessionId)
    missing = sorted(set(range(1, session["totalChunks"] + 1)) - set(session["receivedChunks"]))
    if missing:
        raise ApiError(400, f"chunks missing: {missing[:20]}", "chunks", "incomplete_upload")
    folder = _session_dir(sessionId)
    # read from the disk, once: the zip is assembled from what is there
    stored = await asyncio.to_thread(stored_chunks, folder)
    if stored is None:
        raise _gone(sessionId)
    received = sum(stored.values())
    if received != session["totalSize"]:
        raise ApiError(
            400,
            f"received {received} bytes but totalSize was {session['totalSize']}: re-send the "
            "chunks that differ, then complete again",
            "totalSize",
            "incomplete_upload",
        )
    dest = ctx.settings.uploads_path / f"{sessionId}.zip"

    def assemble() -> None:
        with dest.open("wb") as out:
            for n in range(1, session["totalChunks"] + 1):
                with (folder / f"{n:06d}.part").open("rb") as part:
                    shutil.copyfileobj(part, out, 4 * 2**20)

    with _storing(dest, "the assembled zip", sessionId):
        await asyncio.to_thread(assemble)
    opts = session["options"]
    # the model is the uploader's (its notifications go to them), whoever sent `complete`
    uploader = {**user, "userId": session["createdBy"] or user["userId"]}
    started = await _start_import(  # a refusal (the base model gone) removes only the zip
        dest,
        session["fileName"],
        uploader,
        opts.get("kind") or "base",
        opts.get("baseModelId"),
        opts.get("description") or "",
        opts.get("tags") or [],
    )
    await _drop(sessionId)
    return started


async def sweep_idle_uploads() -> None:
    """Runs in the API replica: ends sessions idle over upload_session_ttl_s, with their
    chunks (and chunk folders whose session is gone, and multipart bodies whose request
    died)."""
    ttl_s = ctx.settings.upload_session_ttl_s
    while True:
        try:
            sessions = await ctx.registry.list_upload_sessions.remote()
            root = ctx.settings.uploads_path
            for sid in await asyncio.to_thread(idle_uploads, sessions, root, time.time(), ttl_s):
                log.info("upload session %s was idle over %s s: removed", sid, ttl_s)
                await _drop(sid)
            for spool in await asyncio.to_thread(idle_spools, root, time.time(), ttl_s):
                log.info("upload file %s was idle over %s s: removed", spool.name, ttl_s)
                spool.unlink(missing_ok=True)
        except Exception as exc:  # the registry restarting: next round
            log.warning("sweeping idle uploads failed: %r", exc)
        await asyncio.sleep(UPLOAD_SWEEP_INTERVAL_S)
