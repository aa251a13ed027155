"""A small HTTP client for the management API, used by the CLI, the demo and the tests."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

CHUNK_BYTES = 8 * 2**20
PAGE_SIZE = 1000  # rows per request when reading a whole list: the API's largest page


class ApiFailure(Exception):
    def __init__(self, status: int, body: Any):
        super().__init__(f"HTTP {status}: {failure_message(body)}")
        self.status, self.body = status, body


def failure_message(body: Any) -> str:
    """What an error response says: raydock's error message; another JSON server's `detail`
    (a wrong --url); the first line of a text body (a proxy's HTML page), cut short."""
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else error or body.get("detail")
        return str(message if message is not None else body)[:300]
    lines = [line.strip() for line in str(body).splitlines() if line.strip()]
    first = lines[0] if lines else "(no body)"
    return first if len(first) <= 200 else first[:200] + "…"


def response_body(r: httpx.Response) -> Any:
    """JSON when the server says it sent JSON, else the text (a proxy's HTML error page)."""
    if r.headers.get("content-type", "").startswith("application/json"):
        try:
            return r.json()
        except ValueError:
            pass
    return r.text


class Client:
    def __init__(self, base_url: str, api_key: str, timeout: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.base_url + "/api/public", headers={"X-api-key": api_key}, timeout=timeout
        )

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        body = response_body(r)
        if r.status_code >= 400:
            raise ApiFailure(r.status_code, body)
        return body

    def get(self, path: str, **kw: Any) -> Any:
        return self._call("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self._call("POST", path, **kw)

    def patch(self, path: str, **kw: Any) -> Any:
        return self._call("PATCH", path, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self._call("DELETE", path, **kw)

    def every(self, path: str, rows: str, id_field: str) -> list[dict[str, Any]]:
        """Every row of a list route that answers pages (`rows`, `nextOffset`), page after
        page. A row that moved on to the next page while paging (one added meanwhile pushes
        the rest down) is kept once, by its `id_field`."""
        found: dict[Any, dict[str, Any]] = {}
        offset: int | None = 0
        while offset is not None:
            page = self.get(path, params={"limit": PAGE_SIZE, "offset": offset})
            for row in page[rows]:
                found.setdefault(row[id_field], row)
            offset = page.get("nextOffset")  # absent from an older server's one answer
        return list(found.values())

    # ---- import
    def import_zip(
        self,
        path: str | Path,
        chunked: bool = False,
        progress: Callable[[int, int], None] | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        **options: Any,
    ) -> dict[str, Any]:
        """Upload a model zip (multipart, or a chunked session); returns the job reference."""
        path = Path(path)
        size = path.stat().st_size
        if not chunked:
            with path.open("rb") as f:
                data = {k: v for k, v in options.items() if v is not None}
                if isinstance(data.get("tags"), list):
                    data["tags"] = ",".join(data["tags"])
                out = self.post("/models/import", files={"file": (path.name, f)}, data=data)
            if progress:
                progress(size, size)
            return out
        session, chunk_bytes = self._start_upload(path.name, size, chunk_bytes, options)
        chunks = session["totalChunks"]
        sid = session["sessionId"]
        sent = 0
        try:
            with path.open("rb") as f:
                for n in range(1, chunks + 1):
                    piece = f.read(chunk_bytes)
                    self._call(
                        "PUT",
                        f"/files/session/{sid}/chunks/{n}",
                        content=piece,
                        headers={"Content-Type": "application/octet-stream"},
                    )
                    sent += len(piece)
                    if progress:
                        progress(sent, size)
        except BaseException:  # Ctrl-C, a refusal: the server would keep the chunks a day
            with contextlib.suppress(Exception):
                self._call("DELETE", f"/files/session/{sid}")
            raise
        # every chunk is there: the server assembles the zip however long it takes
        return self._call("POST", f"/files/session/{sid}/complete", timeout=None)

    def _start_upload(
        self, name: str, size: int, chunk_bytes: int, options: dict[str, Any]
    ) -> tuple[dict[str, Any], int]:
        """Open a chunked upload session, and the chunk size it takes: a server whose chunk
        limit is below `chunk_bytes` (one behind a proxy's body limit) refuses the chunking
        before a byte is sent; halving finds a size under any limit from 1 KiB up."""
        while True:
            chunks = max(1, math.ceil(size / chunk_bytes))
            body = {"fileName": name, "totalSize": size, "totalChunks": chunks, **options}
            try:
                return self.post("/files/session/start", json=body), chunk_bytes
            except ApiFailure as exc:
                error = exc.body.get("error") if isinstance(exc.body, dict) else None
                code = error.get("code") if isinstance(error, dict) else None
                if code != "invalid_chunking" or chunk_bytes <= 1024:
                    raise
                chunk_bytes //= 2

    # ---- jobs
    def wait_job(
        self,
        job_id: str,
        timeout: float = 600,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(f"/dock-status/{job_id}")
            if progress:
                progress(job)
            if job["status"] != "IN_PROGRESS":
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still IN_PROGRESS after {timeout} s")
            time.sleep(0.3)

    # ---- export
    def download_export(self, dock_status_id: str, dest: str | Path) -> Path:
        """Save a finished export's zip to `dest`. The API serves it, or redirects to the
        object store's presigned URL, fetched without the management key (which goes to
        raydock only)."""
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        url = f"/exports/{dock_status_id}/download"
        with self.http.stream("GET", url, timeout=None) as r:
            if r.is_redirect:
                return _save(httpx.stream("GET", r.headers["location"], timeout=None), dest, part)
            return _save(contextlib.nullcontext(r), dest, part)

    # ---- deploy
    def deploy(self, model_id: str, body: dict[str, Any], model_type: str = "openSource") -> dict:
        return self.post(f"/models/{model_id}/deploy", params={"modelType": model_type}, json=body)

    def create_key(self, deployment_id: str, name: str = "default") -> str:
        return self.post(f"/deployments/{deployment_id}/api-keys", json={"name": name})["apiKey"]


def _save(stream: Any, dest: Path, part: Path) -> Path:
    """Write a streamed response to `dest` through `part`: a broken transfer leaves no
    partial file under the name asked for."""
    with stream as r:
        if r.status_code >= 400:
            r.read()
            raise ApiFailure(r.status_code, response_body(r))
        try:
            with part.open("wb") as f:
                for piece in r.iter_bytes(2**20):
                    f.write(piece)
            part.replace(dest)
        finally:
            part.unlink(missing_ok=True)
    return dest


def deploy_body(name: str, device: str = "cpu-small", **overrides: Any) -> dict[str, Any]:
    """What a user's deploy sends: the name, the deviceType and the fields given (`overrides`,
    merged into their groups). Every other parameter is left out, so the platform fills it
    from its one definition (platform/schemas.py, params.py), as for `raydock apply` and the
    web deploy form."""
    body: dict[str, Any] = {"name": name, "hyperParameters": {}, "deviceType": device}
    return _merged(body, overrides)


#: the tests' and benchmarks' footprint, smaller than the platform's defaults: one replica and
#: a batch of 8 are what the 2-core CI machine holds
TEST_SCALING = {"maxBatchSize": 8, "maxReplicas": 1}


def default_deploy_body(name: str, device: str = "cpu-small", **overrides: Any) -> dict[str, Any]:
    """The tests' and benchmarks' deploy body: every field spelled out, at the platform's
    defaults but for TEST_SCALING. Not for users' deploys: those send `deploy_body`."""
    from raydock.platform import schemas  # the one definition of each default

    body = deploy_body(name, device)
    body["hyperParameters"] = schemas.HyperParameters().model_dump()
    body["scalingParameters"] = schemas.ScalingParameters().model_dump() | TEST_SCALING
    body["optimizationInfo"] = schemas.OptimizationInfo().model_dump()
    body["isDeployedPreviously"] = False
    return _merged(body, overrides)


def _merged(body: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`body` with `overrides`: a group (a dict) merged into the body's, anything else set."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return body
