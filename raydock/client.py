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


class ApiFailure(Exception):
    def __init__(self, status: int, body: Any):
        error = body.get("error") if isinstance(body, dict) else body
        message = error.get("message") if isinstance(error, dict) else error
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.body = status, body


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

    def delete(self, path: str, **kw: Any) -> Any:
        return self._call("DELETE", path, **kw)

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
        chunks = max(1, math.ceil(size / chunk_bytes))
        session = self.post(
            "/files/session/start",
            json={"fileName": path.name, "totalSize": size, "totalChunks": chunks, **options},
        )
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

    # ---- deploy
    def deploy(self, model_id: str, body: dict[str, Any], model_type: str = "openSource") -> dict:
        return self.post(f"/models/{model_id}/deploy", params={"modelType": model_type}, json=body)

    def create_key(self, deployment_id: str, name: str = "default") -> str:
        return self.post(f"/deployments/{deployment_id}/api-keys", json={"name": name})["apiKey"]


def default_deploy_body(name: str, device: str = "cpu-small", **overrides: Any) -> dict[str, Any]:
    """A deploy body with the seed's sample values and a CPU profile."""
    body = {
        "name": name,
        "hyperParameters": {
            "temperature": 1,
            "maxTokens": 512,
            "topP": 1,
            "topK": 50,
            "stopSequence": [],
        },
        "scalingParameters": {
            "maxBatchSize": 8,
            "minReplicas": 1,
            "maxReplicas": 1,
            "scaleUpDelay": 30,
            "scaleDownDelay": 600,
        },
        "deviceType": device,
        "optimizationInfo": {"optimizationType": "", "quantizationType": ""},
        "isDeployedPreviously": False,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return body
