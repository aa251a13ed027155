"""The upload rules (platform/api_uploads.py): what is refused before a byte is sent, and
which sessions the idle sweep removes; both shown end to end in tests/e2e/test_import.py and
test_restart.py. And what an upload costs the server: a multipart import's bytes written
once, a chunk's bookkeeping the same however many chunks came before it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient

from raydock.platform import api_deps, api_uploads
from raydock.platform.api import app
from raydock.platform.api_uploads import (
    ZIP_OVERHEAD_BYTES,
    chunking_problem,
    idle_spools,
    idle_uploads,
    promised_bytes,
    storage_refusal,
)
from tests.unit.registry_handle import RegistryHandle

GIB = 2**30


def test_an_upload_over_the_archive_limit_or_the_free_disk_is_refused_up_front():
    assert storage_refusal(GIB, max_archive_bytes=20 * GIB, free_bytes=100 * GIB) is None
    at_limit = 20 * GIB + ZIP_OVERHEAD_BYTES
    assert storage_refusal(at_limit, max_archive_bytes=20 * GIB, free_bytes=100 * GIB) is None
    over = storage_refusal(at_limit + 1, max_archive_bytes=20 * GIB, free_bytes=100 * GIB)
    assert (over.status, over.param, over.code) == (413, "totalSize", "archive_too_large")
    assert "max_archive_bytes 21474836480" in over.message
    # the chunks and the zip assembled from them: twice the size must be free
    assert storage_refusal(10 * GIB, max_archive_bytes=20 * GIB, free_bytes=20 * GIB) is None
    full = storage_refusal(10 * GIB, max_archive_bytes=20 * GIB, free_bytes=20 * GIB - 1)
    assert (full.status, full.param, full.code) == (413, "totalSize", "insufficient_storage")
    assert f"{20 * GIB - 1} are free" in full.message


def test_sessions_and_stray_folders_idle_past_the_ttl_are_swept(tmp_path):
    now = 1_000_000.0
    day = 86_400

    def folder(name: str, age_s: float) -> None:
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (now - age_s, now - age_s))

    folder("up-fresh-chunks", 60)  # started long ago, a chunk a minute ago
    folder("up-stale", 2 * day)
    folder("up-orphan-old", 2 * day)  # no session names it
    folder("up-orphan-new", 60)  # a session being created right now
    (tmp_path / "up-x.zip").write_bytes(b"")  # an assembled zip is the import's, not swept
    sessions = [
        {"sessionId": "up-fresh-chunks", "startedAt": now - 3 * day},
        {"sessionId": "up-stale", "startedAt": now - 3 * day},
        {"sessionId": "up-no-folder", "startedAt": now - 2 * day},
        {"sessionId": "up-just-started", "startedAt": now - 5},
    ]
    idle = idle_uploads(sessions, tmp_path, now, ttl_s=day)
    assert idle == ["up-no-folder", "up-orphan-old", "up-stale"]
    # multipart bodies being received: one a crash left a day ago goes, one arriving stays;
    # so does a zip no import took (its lifecycle died before staging it, within seconds)
    for name, age_s in (("dead.receiving", 2 * day), ("live.receiving", 1), ("lost.zip", 2 * day)):
        (tmp_path / name).write_bytes(b"PK")
        os.utime(tmp_path / name, (now - age_s, now - age_s))
    assert idle_spools(tmp_path, now, ttl_s=day) == [
        tmp_path / "dead.receiving",
        tmp_path / "lost.zip",
    ]
    assert idle_uploads(sessions, tmp_path / "missing", now, ttl_s=day) == [
        "up-fresh-chunks",
        "up-no-folder",
        "up-stale",
    ]


def test_a_new_upload_leaves_the_open_ones_the_space_they_still_need(tmp_path):
    (tmp_path / "up-half").mkdir()
    (tmp_path / "up-half" / "000001.part").write_bytes(b"x" * 300)  # one chunk written
    sessions = [
        {"sessionId": "up-half", "totalSize": 600},  # 1200 in all, 300 written
        {"sessionId": "up-new", "totalSize": 100},  # no folder yet
        {"sessionId": "up-full", "totalSize": 50},  # below: more written than it needs
    ]
    assert promised_bytes(sessions[:2], tmp_path) == 900 + 200
    (tmp_path / "up-full").mkdir()
    (tmp_path / "up-full" / "000001.part").write_bytes(b"x" * 150)  # needs nothing more, never less
    assert promised_bytes(sessions, tmp_path) == 900 + 200
    # so with 3000 bytes free an upload of 1000 fits alone but not beside them
    assert storage_refusal(1000, max_archive_bytes=GIB, free_bytes=3000) is None
    refused = storage_refusal(1000, max_archive_bytes=GIB, free_bytes=3000, promised_bytes=1100)
    assert refused.code == "insufficient_storage"
    assert "3000 are free, 1100 of them promised to open uploads" in refused.message


def test_uploads_started_together_cannot_both_claim_the_same_free_space(api, monkeypatch):
    """The disk has room for one upload's chunks and zip, not two; of two starts sent at
    once, one is refused."""
    reg, admin_key = api
    size = 10 * 2**20
    disk_usage = shutil.disk_usage
    # a full disk is the world's to arrange: this one has 3 x size free, each start needs 2 x
    monkeypatch.setattr(shutil, "disk_usage", lambda p: disk_usage(p)._replace(free=3 * size))
    body = {"fileName": "m.zip", "totalSize": size, "totalChunks": 1}

    async def start_two() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://raydock.test",
            headers={"X-api-key": admin_key},
        ) as http:
            starts = (http.post("/public/files/session/start", json=body) for _ in range(2))
            return await asyncio.gather(*starts)

    replies = asyncio.run(start_two())
    assert sorted(r.status_code for r in replies) == [201, 413], [r.text for r in replies]
    refused = next(r for r in replies if r.status_code == 413).json()["error"]
    assert refused["code"] == "insufficient_storage"
    assert f"{3 * size} are free, {2 * size} of them promised to open uploads" in refused["message"]
    assert len(reg.list_upload_sessions()) == 1


def test_chunks_must_be_able_to_carry_the_upload():
    assert chunking_problem(100, 1, max_chunk_bytes=100) is None
    assert "every chunk holds a byte" in chunking_problem(10, 20, max_chunk_bytes=100)
    assert "send at least 3 chunks" in chunking_problem(201, 2, max_chunk_bytes=100)


def test_a_chunked_upload_is_held_to_its_kind_base_and_size_and_survives_a_bad_complete(api):
    """What the upload routes refuse before the last chunk, and a complete that finds the
    bytes short keeps the session, so the client can re-send a chunk."""
    reg, admin_key = api
    start = "/public/files/session/start"
    with TestClient(app, base_url="http://raydock.test", headers={"X-api-key": admin_key}) as http:
        # a base model names no base (it would be listed, and refused, as an adapter of it)
        r = http.post(
            start,
            json={
                "fileName": "b.zip",
                "totalSize": 9,
                "totalChunks": 1,
                "kind": "base",
                "baseModelId": "cm-1",
            },
        )
        assert r.status_code == 422 and r.json()["error"]["param"] == "baseModelId", r.text
        files = {"file": ("b.zip", b"PK", "application/zip")}
        r = http.post("/public/models/import", files=files, data={"baseModelId": "cm-1"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "baseModelId", r.text
        # an adapter whose base does not exist: refused before its first chunk
        r = http.post(
            start,
            json={
                "fileName": "a.zip",
                "totalSize": 9,
                "totalChunks": 1,
                "kind": "adapter",
                "baseModelId": "cm-none",
            },
        )
        assert r.status_code == 409 and "cm-none" in r.json()["error"]["message"], r.text
        # chunks that cannot carry the size
        r = http.post(start, json={"fileName": "c.zip", "totalSize": 10, "totalChunks": 20})
        assert r.status_code == 400, r.text
        assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (
            "totalChunks",
            "invalid_chunking",
        )
        assert reg.list_upload_sessions() == []

        session = http.post(start, json={"fileName": "m.zip", "totalSize": 100, "totalChunks": 2})
        chunk = f"/public/files/session/{session.json()['sessionId']}/chunks"
        assert http.put(f"{chunk}/1", content=b"x" * 60).status_code == 200
        # more than the declared size: its disk space was checked for 100 bytes, not more
        r = http.put(f"{chunk}/2", content=b"y" * 41)
        assert r.status_code == 413 and "40 left" in r.json()["error"]["message"], r.text
        assert http.put(f"{chunk}/2", content=b"y" * 30).status_code == 200
        # short by 10: refused, and nothing is lost
        complete = chunk.replace("/chunks", "/complete")
        r = http.post(complete)
        assert r.status_code == 400 and "received 90 bytes" in r.json()["error"]["message"]
        status = http.get(chunk.removesuffix("/chunks")).json()
        assert status["receivedChunks"] == [1, 2]
        assert http.put(f"{chunk}/2", content=b"y" * 40).status_code == 200  # re-sent whole


MIB = 2**20


@pytest.fixture
def small_limits(api, monkeypatch):
    """The API app with max_archive_bytes and max_request_bytes at 1 MiB, zips 64 KiB over
    it still accepted, and imports submitted to a lifecycle that only records them."""
    reg, admin_key = api
    settings = dataclasses.replace(
        api_deps.ctx.settings, max_archive_bytes=MIB, max_request_bytes=MIB
    )
    monkeypatch.setattr(api_deps.ctx, "settings", settings)
    monkeypatch.setattr(api_uploads, "ZIP_OVERHEAD_BYTES", 64 * 2**10)
    submitted: list[tuple] = []
    lifecycle = RegistryHandle(SimpleNamespace(submit_import=lambda *a: submitted.append(a)))
    monkeypatch.setattr(api_deps.ctx, "lifecycle", lifecycle, raising=False)
    with TestClient(app, base_url="http://raydock.test", headers={"X-api-key": admin_key}) as c:
        c.reg, c.submitted = reg, submitted
        yield c


def _uploads() -> Path:
    return api_deps.ctx.settings.uploads_path


def _stored(http) -> list[str]:
    uploads = _uploads()
    return sorted(p.name for p in uploads.iterdir()) if uploads.exists() else []


def test_a_multipart_import_is_held_to_the_archive_limit(small_limits):
    """The one-request import: over max_request_bytes is fine (it is an upload), over
    max_archive_bytes (plus the zip's overhead) is a 413, and nothing is kept."""
    http = small_limits
    limit = MIB + 64 * 2**10 + api_uploads.FORM_OVERHEAD_BYTES
    # from the Content-Length, before the body is read
    files = {"file": ("big.zip", b"x" * 4 * MIB, "application/zip")}
    r = http.post("/public/models/import", files=files)
    assert r.status_code == 413, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("file", "archive_too_large")
    assert f"the {limit} byte limit" in r.json()["error"]["message"]
    assert "max_archive_bytes 1048576" in r.json()["error"]["message"]

    # without one (a chunked body): refused once that much has arrived
    body = httpx.Request("POST", "http://x", files=files)
    piece = 64 * 2**10
    sent = []

    async def pieces():
        for i in range(0, len(body.read()), piece):
            sent.append(i)
            yield body.content[i : i + piece]

    async def post_chunked() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://raydock.test") as c:
            headers = {"content-type": body.headers["content-type"], **http.headers}
            return await c.post("/public/models/import", content=pieces(), headers=headers)

    r = asyncio.run(post_chunked())
    assert r.status_code == 413 and r.json()["error"]["code"] == "archive_too_large", r.text
    assert len(sent) * piece <= limit + piece  # the rest was never read

    # a body within the limit whose zip is not: the zip's own limit, as a chunked upload's
    files = {"file": ("big.zip", b"x" * (MIB + 64 * 2**10 + 1), "application/zip")}
    r = http.post("/public/models/import", files=files)
    assert r.status_code == 413, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("file", "archive_too_large")
    assert _stored(http) == [] and http.reg.list_models() == [] and http.submitted == []

    # at the limit: accepted, though over max_request_bytes
    files = {"file": ("ok.zip", b"x" * (MIB + 64 * 2**10), "application/zip")}
    r = http.post("/public/models/import", files=files, data={"description": "d"})
    assert r.status_code == 202, r.text
    assert [m["name"] for m in http.reg.list_models()] == ["ok"] and len(http.submitted) == 1
    (stored,) = _stored(http)
    assert (api_deps.ctx.settings.uploads_path / stored).stat().st_size == MIB + 64 * 2**10


def _post_streamed(http, files: dict, headers: dict | None = None) -> tuple[httpx.Response, int]:
    """A multipart import whose body is sent in 64 KiB pieces as the server reads them (with
    its Content-Length): the answer, and how many bytes the server read before it."""
    body = httpx.Request("POST", "http://x", files=files)
    content, piece, sent = body.read(), 64 * 2**10, 0

    async def pieces():
        nonlocal sent
        for i in range(0, len(content), piece):
            sent = i + piece
            yield content[i : i + piece]

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://raydock.test") as c:
            sent_headers = {
                "content-type": body.headers["content-type"],
                "content-length": str(len(content)),
                **(http.headers if headers is None else headers),
            }
            return await c.post("/public/models/import", content=pieces(), headers=sent_headers)

    return asyncio.run(post()), sent


def test_a_multipart_import_the_disk_cannot_hold_is_refused(small_limits, monkeypatch):
    """As a chunked upload's start: the body (written once, into the uploads folder) must fit
    beside what the open upload sessions still need, refused from its Content-Length before
    a byte of it is read."""
    http = small_limits
    disk_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: disk_usage(p)._replace(free=3 * MIB))
    start = {"fileName": "s.zip", "totalSize": MIB, "totalChunks": 1}
    assert http.post("/public/files/session/start", json=start).status_code == 201
    r, read = _post_streamed(http, {"file": ("m.zip", b"x" * MIB, "application/zip")})
    assert r.status_code == 413, r.text
    assert read == 0  # refused from the Content-Length
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("file", "insufficient_storage")
    assert f"{3 * MIB} are free, {2 * MIB} of them promised to open uploads" in error["message"]
    assert "(its body, written once)" in error["message"]
    assert [p for p in _stored(http) if p.endswith(".zip")] == [] and http.submitted == []
    # fits: 3 - 2 MiB less the form's few hundred bytes
    files = {"file": ("m.zip", b"x" * (MIB - 2**10), "application/zip")}
    assert http.post("/public/models/import", files=files).status_code == 202


def _bytes_written_by_this_process() -> int:
    """What this process has passed to write() and the like, in all its threads (Linux)."""
    with open("/proc/self/io") as io:
        return int(next(line for line in io if line.startswith("wchar:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io")
def test_a_multipart_import_writes_its_zip_once(small_limits):
    """It was spooled to a temporary file, then copied into the uploads folder: a
    multi-GB zip written twice, and needing twice its size on disk. Now its bytes are
    written once, and the import reads them where they were written."""
    http = small_limits
    size = MIB + 64 * 2**10
    files = {"file": ("once.zip", os.urandom(size), "application/zip")}
    before = _bytes_written_by_this_process()
    r = http.post("/public/models/import", files=files)
    written = _bytes_written_by_this_process() - before
    assert r.status_code == 202, r.text
    assert size <= written < 1.5 * size, f"{written} bytes written for a {size} byte zip"
    (submitted,) = http.submitted
    zip_path = Path(submitted[2])  # (modelId, jobId, the zip's path, kind)
    assert zip_path.read_bytes() == files["file"][1] and zip_path.parent == _uploads()
    assert _stored(http) == [zip_path.name]  # nothing else kept


def test_a_multipart_import_the_server_cannot_write_is_its_500_not_the_clients_400(
    small_limits, caplog
):
    """FastAPI answers any error reading a body with 400 "error parsing the body": a spool
    file the server could not open blamed the client and left no trace in the log."""
    uploads = _uploads()
    uploads.mkdir(parents=True, exist_ok=True)
    # a folder in which no file can be made, even by root
    if subprocess.run(["chattr", "+i", str(uploads)], capture_output=True).returncode:
        pytest.skip("needs chattr +i (ext4 and the like)")
    try:
        files = {"file": ("m.zip", b"x" * 1000, "application/zip")}
        r = small_limits.post("/public/models/import", files=files)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error", r.text
        assert "request id" in r.json()["error"]["message"]
        assert ".receiving" in caplog.text  # the operator sees what failed
        assert small_limits.submitted == []
    finally:
        subprocess.run(["chattr", "-i", str(uploads)], check=True)


def test_a_multipart_import_from_no_one_is_refused_before_its_body_is_read(small_limits):
    """Without a valid key the server writes nothing: 401 before a byte is read."""
    files = {"file": ("m.zip", b"x" * MIB, "application/zip")}
    r, read = _post_streamed(small_limits, files, headers={"X-api-key": "rd-wrong"})
    assert r.status_code == 401 and read == 0, r.text
    r, read = _post_streamed(small_limits, files, headers={})
    assert r.status_code == 401 and read == 0, r.text
    assert _stored(small_limits) == [] and small_limits.submitted == []


def test_a_chunked_upload_over_the_archive_limit_is_a_413_however_chunked(small_limits):
    """It said "send at least 9536744 chunks", which totalChunks' own limit then refused."""
    body = {"fileName": "t.zip", "totalSize": 999_999_999_999_999, "totalChunks": 2}
    r = small_limits.post("/public/files/session/start", json=body)
    assert r.status_code == 413, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (
        "totalSize",
        "archive_too_large",
    )


def test_an_upload_being_completed_cannot_be_cancelled(small_limits):
    """A client whose complete timed out cancelled the upload mid-assembly (a 404 for an
    upload about to succeed): a cancel then is a 409."""
    body = {"fileName": "t.zip", "totalSize": 10, "totalChunks": 1}
    sid = small_limits.post("/public/files/session/start", json=body).json()["sessionId"]
    api_uploads._COMPLETING.add(sid)  # as while upload_complete assembles its zip
    try:
        r = small_limits.delete(f"/public/files/session/{sid}")
        assert r.status_code == 409 and "being completed" in r.text, r.text
    finally:
        api_uploads._COMPLETING.discard(sid)
    assert small_limits.delete(f"/public/files/session/{sid}").status_code == 200


#: directories listed (os.scandir, os.listdir: every folder scan goes through one) while a
#: test records them; None: not recording. Python's audit hooks see every such call.
_LISTED: list[str] | None = None


def _record_listings(event: str, args: tuple) -> None:
    if _LISTED is not None and event in ("os.scandir", "os.listdir"):
        listed = args[0]  # a path, or a directory's file descriptor
        _LISTED.append(os.fsdecode(listed) if isinstance(listed, str | bytes | os.PathLike) else "")


_HOOKED = False


def _listings_of(folder: Path, run) -> int:
    """How many times `folder` is listed while `run()` runs."""
    global _LISTED, _HOOKED
    if not _HOOKED:  # an audit hook stays for the process's life: one, idle when not asked
        sys.addaudithook(_record_listings)
        _HOOKED = True
    _LISTED = []
    try:
        run()
        return sum(Path(p) == folder for p in _LISTED)
    finally:
        _LISTED = None


def test_a_chunk_costs_the_same_however_many_came_before_it(small_limits):
    """Each chunk listed its session's folder and read the size of every chunk already there
    (the upload may not outgrow its totalSize): 2,500 chunks of a 20 GB upload, 3 million
    file sizes read. Now a folder is read once, the first time the API needs it; the chunks
    after it, and other uploads starting beside it, read none."""
    http = small_limits
    chunks, piece = 300, b"0123456789"
    body = {"fileName": "many.zip", "totalSize": chunks * len(piece), "totalChunks": chunks}
    sid = http.post("/public/files/session/start", json=body).json()["sessionId"]
    folder = _uploads() / sid

    def send(first: int, last: int) -> None:
        for n in range(first, last + 1):
            r = http.put(f"/public/files/session/{sid}/chunks/{n}", content=piece)
            assert r.status_code == 200, r.text

    assert _listings_of(folder, lambda: send(1, 10)) == 1  # read once
    assert _listings_of(folder, lambda: send(11, chunks)) == 0  # however many follow

    def start_another() -> None:
        other = {"fileName": "beside.zip", "totalSize": 10, "totalChunks": 1}
        assert http.post("/public/files/session/start", json=other).status_code == 201

    assert _listings_of(folder, start_another) == 0  # its written bytes were known
    # what that bookkeeping guards still holds: the size, re-sent chunks, the whole zip
    r = http.put(f"/public/files/session/{sid}/chunks/{chunks}", content=piece + b"!")
    assert r.status_code == 413 and "10 left" in r.json()["error"]["message"], r.text
    send(7, 7)  # sent again: replaces its copy
    assert http.post(f"/public/files/session/{sid}/complete").status_code == 202
    (submitted,) = http.submitted
    assert Path(submitted[2]).read_bytes() == piece * chunks


def test_an_upload_resumed_by_a_restarted_api_counts_the_chunks_on_its_disk(small_limits):
    """A chunk the API received before it restarted is in the session's folder, which the
    new API process has never read: it is held to the upload's totalSize all the same."""
    http = small_limits
    body = {"fileName": "r.zip", "totalSize": 100, "totalChunks": 2}
    sid = http.post("/public/files/session/start", json=body).json()["sessionId"]
    # chunk 1 as the API process before the restart stored it
    (_uploads() / sid / "000001.part").write_bytes(b"x" * 60)
    http.reg.add_upload_chunk(sid, 1)
    r = http.put(f"/public/files/session/{sid}/chunks/2", content=b"y" * 41)
    assert r.status_code == 413, r.text
    assert "60 received in its other chunks, so 40 left" in r.json()["error"]["message"]
    assert http.put(f"/public/files/session/{sid}/chunks/2", content=b"y" * 40).status_code == 200
    assert http.post(f"/public/files/session/{sid}/complete").status_code == 202
    (submitted,) = http.submitted
    assert Path(submitted[2]).read_bytes() == b"x" * 60 + b"y" * 40


def _as_sent(answer: dict) -> bytes:
    """An answer's bytes as the API sends them (FastAPI's JSONResponse)."""
    return json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()


def test_a_chunk_sent_twice_is_counted_once_in_every_answer(small_limits):
    """The chunk's answer, the status and the list of sessions: received chunks in numeric
    order, each once, in the same bytes as when the session held them in a list."""
    http = small_limits
    body = {"fileName": "twice.zip", "totalSize": 120, "totalChunks": 12}
    started = http.post("/public/files/session/start", json=body).json()
    sid = started["sessionId"]

    def session(received: list[int]) -> bytes:
        return _as_sent(
            {
                "sessionId": sid,
                "fileName": "twice.zip",
                "totalSize": 120,
                "totalChunks": 12,
                "receivedChunks": received,
                "options": {"kind": "base", "baseModelId": None, "description": "", "tags": []},
                "createdBy": started["createdBy"],
            }
        )

    chunk = f"/public/files/session/{sid}/chunks"
    answers = [http.put(f"{chunk}/{n}", content=b"x" * 10) for n in (10, 2, 10, 1)]
    assert [r.status_code for r in answers] == [200] * 4
    received = [[10], [2, 10], [2, 10], [1, 2, 10]]
    for answer, chunks in zip(answers, received, strict=True):
        assert answer.content == session(chunks)
    assert http.get(f"/public/files/session/{sid}").content == session([1, 2, 10])
    (listed,) = http.get("/public/files/session").json()["sessions"]
    assert (listed["sessionId"], listed["chunksReceived"]) == (sid, 3)


def test_a_chunk_sent_again_while_it_still_arrives_keeps_one_whole_copy(api):
    """Both requests wrote one .tmp: the retry truncated it, its rename turned the first
    request's file into the .part (which it then went on writing into: a corrupt chunk), and
    the first request's own rename failed: a false 404 'cancelled or expired'."""
    reg, admin_key = api

    async def scenario() -> tuple[httpx.Response, httpx.Response, bytes]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://raydock.test",
            headers={"X-api-key": admin_key},
        ) as http:
            body = {"fileName": "m.zip", "totalSize": 1000, "totalChunks": 1}
            sid = (await http.post("/public/files/session/start", json=body)).json()["sessionId"]
            chunk = f"/public/files/session/{sid}/chunks/1"
            resent = asyncio.Event()

            async def slow():  # half now, half after the retry was stored
                yield b"a" * 500
                await resent.wait()
                yield b"a" * 500

            first = asyncio.create_task(http.put(chunk, content=slow()))
            await asyncio.sleep(0.3)
            retry = await http.put(chunk, content=b"b" * 1000)
            resent.set()
            part = api_deps.ctx.settings.uploads_path / sid / "000001.part"
            return await first, retry, part.read_bytes()

    first, retry, stored = asyncio.run(scenario())
    assert (first.status_code, retry.status_code) == (200, 200), (first.text, retry.text)
    assert stored in (b"a" * 1000, b"b" * 1000)


def test_a_chunked_import_is_the_uploaders_whoever_completes_it(small_limits):
    """Any management key may complete an upload (all keys share everything): the model was
    credited to that caller, and its import's notifications went to them."""
    http = small_limits
    admin = http.reg.authenticate_management(http.headers["X-api-key"])
    ana = http.reg.create_user("ana", None, False, admin["userId"])
    as_ana = {"X-api-key": ana["apiKey"]}
    body = {"fileName": "m.zip", "totalSize": 10, "totalChunks": 1}
    sid = http.post("/public/files/session/start", json=body, headers=as_ana).json()["sessionId"]
    put = http.put(f"/public/files/session/{sid}/chunks/1", content=b"x" * 10, headers=as_ana)
    assert put.status_code == 200
    done = http.post(f"/public/files/session/{sid}/complete")  # by the admin
    assert done.status_code == 202, done.text
    [model] = http.reg.list_models()
    assert model["createdBy"] == ana["userId"]
