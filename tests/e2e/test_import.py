"""Importing model archives through the real API: both upload paths and every bad archive."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from raydock.modelgen import build_model_zip

from .conftest import import_ready


@pytest.mark.core
def test_multipart_import_moves_to_ready_named_after_zip(platform, tiny_zip):
    states = []
    ref = platform.client.import_zip(tiny_zip, description="first", tags=["a", "b"])
    assert ref["action"] == "IMPORT" and ref["jobType"] == "MODELS"
    job = platform.client.wait_job(
        ref["dockStatusId"], progress=lambda j: states.append(j["percentageComplete"])
    )
    assert job["status"] == "SUCCESS" and job["percentageComplete"] == 100
    assert states == sorted(states)  # progress only moves forward
    model = platform.client.get(f"/models/{ref['modelId']}")
    assert model["name"] == "tiny-chat"
    assert (model["source"], model["sourceLabel"]) == ("file", "File")
    assert (model["status"], model["statusLabel"]) == ("READY", "Ready to Deploy")
    assert model["tags"] == ["a", "b"] and model["description"] == "first"
    meta = model["metadata"]
    assert meta["architecture"] == "LlamaForCausalLM" and meta["has_chat_template"]
    assert meta["parameters"] > 0 and meta["context_length"] == 2048
    assert len(model["checksum"]) == 64


@pytest.mark.core
@pytest.mark.parametrize("chunk_kib", [256, 8192])  # many chunks; one written in pieces
def test_chunked_session_import(platform, tiny_zip, chunk_kib):
    chunks = []
    ref = platform.client.import_zip(
        tiny_zip, chunked=True, chunk_bytes=chunk_kib * 1024, progress=lambda s, t: chunks.append(s)
    )
    size = tiny_zip.stat().st_size
    assert len(chunks) == -(-size // (chunk_kib * 1024)) and chunks[-1] == size
    job = platform.client.wait_job(ref["dockStatusId"])
    assert job["status"] == "SUCCESS"
    assert platform.client.get(f"/models/{ref['modelId']}")["status"] == "READY"


def test_chunked_session_refuses_incomplete_upload(platform, tiny_zip):
    http = platform.http()
    start = http.post(
        "/api/public/files/session/start",
        json={"fileName": "x.zip", "totalSize": 10, "totalChunks": 2},
    ).json()
    sid = start["sessionId"]
    assert (
        http.put(f"/api/public/files/session/{sid}/chunks/1", content=b"12345").status_code == 200
    )
    r = http.put(f"/api/public/files/session/{sid}/chunks/3", content=b"x")
    assert r.status_code == 400 and "between 1 and 2" in r.json()["error"]["message"]
    r = http.post(f"/api/public/files/session/{sid}/complete")
    assert r.status_code == 400 and "chunks missing: [2]" in r.json()["error"]["message"]
    r = http.post(
        "/api/public/files/session/start",
        json={"fileName": "x.tar", "totalSize": 10, "totalChunks": 1},
    )
    assert r.status_code == 422 and r.json()["error"]["param"] == "fileName"


def test_a_chunked_upload_can_be_cancelled_and_one_too_large_is_refused_before_it_starts(
    platform,
):
    http = platform.http()
    uploads = platform.settings.uploads_path
    sid = http.post(
        "/api/public/files/session/start",
        json={"fileName": "cancel-me.zip", "totalSize": 10, "totalChunks": 2},
    ).json()["sessionId"]
    assert http.put(f"/api/public/files/session/{sid}/chunks/1", content=b"12345").is_success
    assert (uploads / sid / "000001.part").read_bytes() == b"12345"

    r = http.delete(f"/api/public/files/session/{sid}")
    assert r.status_code == 200 and r.json() == {"deleted": True, "sessionId": sid}, r.text
    assert not (uploads / sid).exists()  # the chunks are gone from the disk
    for r in (
        http.get(f"/api/public/files/session/{sid}"),
        http.put(f"/api/public/files/session/{sid}/chunks/2", content=b"67890"),
        http.post(f"/api/public/files/session/{sid}/complete"),
        http.delete(f"/api/public/files/session/{sid}"),
    ):
        assert r.status_code == 404, r.text

    # over the platform's archive limit: refused before a byte is sent, nothing created
    before = sorted(uploads.iterdir())
    too_big = platform.settings.max_archive_bytes + 2**30
    r = http.post(
        "/api/public/files/session/start",
        json={"fileName": "huge.zip", "totalSize": too_big, "totalChunks": 100},
    )
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("totalSize", "archive_too_large")
    assert f"max_archive_bytes {platform.settings.max_archive_bytes}" in error["message"]
    assert sorted(uploads.iterdir()) == before


def _rezip(src: Path, dst: Path, drop=(), add: dict | None = None, mutate=None) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if item.filename in drop:
                continue
            data = zin.read(item)
            if mutate:
                data = mutate(item.filename, data)
            zout.writestr(item, data)
        for name, data in (add or {}).items():
            zout.writestr(name, data)
    return dst


def _symlink_zip(src: Path, dst: Path) -> Path:
    _rezip(src, dst)
    with zipfile.ZipFile(dst, "a") as z:
        info = zipfile.ZipInfo("evil-link")
        info.external_attr = 0o120777 << 16
        z.writestr(info, "/etc/passwd")
    return dst


def _config(mutation):
    def mutate(name, data):
        if name == "config.json":
            cfg = json.loads(data)
            mutation(cfg)
            return json.dumps(cfg).encode()
        return data

    return mutate


# renders system and user turns, raises on an assistant turn: every multi-turn chat would 500
BROKEN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ raise_exception('no assistant turns') }}{% endif %}{{ m['content'] }}{% endfor %}"
)


def _template(template: str):
    """Both places a chat template lives (chat_template.jinja and tokenizer_config.json)."""

    def mutate(name, data):
        if name == "chat_template.jinja":
            return template.encode()
        if name == "tokenizer_config.json":
            return json.dumps({**json.loads(data), "chat_template": template}).encode()
        return data

    return mutate


BAD_ARCHIVES = {
    "missing-config": (lambda s, d: _rezip(s, d, drop={"config.json"}), "config.json is missing"),
    "no-weights": (lambda s, d: _rezip(s, d, drop={"model.safetensors"}), "no model weights"),
    "unknown-arch": (
        lambda s, d: _rezip(
            s,
            d,
            mutate=_config(
                lambda c: c.update(architectures=["FooBarForCausalLM"], model_type="foobar")
            ),
        ),
        "cannot be loaded by the installed transformers",
    ),
    "corrupt-safetensors": (
        lambda s, d: _rezip(
            s, d, mutate=lambda n, b: b[: len(b) // 2] if n == "model.safetensors" else b
        ),
        "model.safetensors is corrupted",
    ),
    "dotdot": (lambda s, d: _rezip(s, d, add={"../escape.txt": b"x"}), "'..' path component"),
    "absolute": (lambda s, d: _rezip(s, d, add={"/etc/cron.d/x": b"x"}), "absolute path"),
    "symlink": (_symlink_zip, "symbolic link"),
    "zip-bomb": (
        lambda s, d: _rezip(s, d, add={"padding.bin": b"\0" * (8 * 2**20)}),
        "compression ratio",
    ),
    "pickle-only": (
        lambda s, d: _rezip(
            s, d, drop={"model.safetensors"}, add={"pytorch_model.bin": b"\x80\x04pickle"}
        ),
        "pickle",
    ),
    "broken-chat-template": (
        lambda s, d: _rezip(s, d, mutate=_template(BROKEN_TEMPLATE)),
        "chat template cannot render a user/assistant/user conversation: the model's chat "
        "template failed: no assistant turns",
    ),
    # the tiny model's MLP is 256 wide: config.json now implies 320
    "weights-config-mismatch": (
        lambda s, d: _rezip(s, d, mutate=_config(lambda c: c.update(intermediate_size=320))),
        "the weights do not match config.json: model.layers.0.mlp.down_proj.weight has shape "
        "[128, 256] but config.json implies [128, 320]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ARCHIVES))
def test_bad_archive_fails_with_reason_and_leaves_nothing(platform, tiny_zip, tmp_path, case):
    make, reason = BAD_ARCHIVES[case]
    path = make(tiny_zip, tmp_path / f"bad-{case}.zip")
    before = platform.stored("models")
    ref = platform.client.import_zip(path)
    job = platform.client.wait_job(ref["dockStatusId"])
    model = platform.client.get(f"/models/{ref['modelId']}")
    assert job["status"] == "FAILED"
    assert model["status"] == "IMPORT_FAILED" and model["statusLabel"] == "Import Failed"
    assert reason in model["error"], model["error"]
    assert reason in job["message"]
    assert platform.stored("models") == before  # nothing half-written in the artifact store
    assert not platform.stored("uploads")  # nor a spent upload
    assert not any(p.name.endswith(".zip") for p in platform.settings.uploads_path.iterdir())


def test_archive_over_size_limit_is_refused(platform, tiny_zip, tmp_path):
    limit = platform.settings.max_archive_bytes  # the test platform runs with a 20 MiB limit
    big = _rezip(tiny_zip, tmp_path / "big.zip", add={"extra.bin": os.urandom(limit)})
    before = platform.stored("models")
    ref = platform.client.import_zip(big)
    assert platform.client.wait_job(ref["dockStatusId"])["status"] == "FAILED"
    model = platform.client.get(f"/models/{ref['modelId']}")
    assert "over the 20.0 MiB limit" in model["error"], model["error"]
    assert platform.stored("models") == before


def test_upload_must_be_a_zip(platform, tmp_path):
    f = tmp_path / "model.tar"
    f.write_bytes(b"x")
    with f.open("rb") as fh:
        r = platform.http().post("/api/public/models/import", files={"file": (f.name, fh)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"


@pytest.mark.core
def test_list_edit_and_delete_model(platform, zips):
    model = import_ready(platform, build_model_zip(zips / "to-delete.zip", size="tiny", seed=3))
    http = platform.http()
    listed = http.get("/api/public/models").json()["models"]
    row = next(m for m in listed if m["modelId"] == model["modelId"])
    assert {"name", "activeDeployments", "deploymentFailed", "readyToDeploy", "source"} <= set(row)
    r = http.patch(
        f"/api/public/models/{model['modelId']}", json={"description": "edited", "tags": ["x"]}
    )
    assert (
        r.status_code == 200 and r.json()["description"] == "edited" and r.json()["tags"] == ["x"]
    )
    r = http.patch(f"/api/public/models/{model['modelId']}", json={"name": "renamed"})
    assert r.status_code == 422 and "not editable" in r.json()["error"]["message"]
    assert model["modelId"] in platform.stored("models")
    assert http.delete(f"/api/public/models/{model['modelId']}").status_code == 200
    assert http.get(f"/api/public/models/{model['modelId']}").status_code == 404
    assert model["modelId"] not in platform.stored("models")
    assert model["modelId"] not in platform.stored("exports")


@pytest.mark.core
def test_management_api_needs_a_valid_key(platform):
    import httpx

    r = httpx.get(f"{platform.url}/api/public/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(f"{platform.url}/api/public/models", headers={"X-api-key": "rdm-nope"})
    assert r.status_code == 401
