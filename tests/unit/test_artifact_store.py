"""The artifact store, both backends: a local directory and S3 (moto's server over HTTP)."""

from __future__ import annotations

import json
import os
import pickle
import threading
import urllib.request
import uuid
from pathlib import Path

import pytest

from raydock.artifacts import (
    MANIFEST_NAME,
    ArtifactCorrupt,
    ArtifactError,
    ArtifactMissing,
    ArtifactStore,
    LocalStore,
    Manifest,
    ManifestFile,
    S3Store,
    open_store,
)
from raydock.artifacts import store as store_mod
from tests.s3_server import drop_bucket, s3_server

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        yield LocalStore(tmp_path / "store")
        return
    s3 = request.getfixturevalue("s3")
    bucket = f"t-{uuid.uuid4().hex[:16]}"  # a bucket per test: "empty" means the whole bucket
    s3.client().create_bucket(Bucket=bucket)
    yield S3Store(bucket, "hub", s3.endpoint_url)  # a prefix, so key mapping is exercised
    drop_bucket(s3.client(), bucket)


class Recorder:
    """A progress callback that keeps every (done, total) it got."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            self.calls.append((done, total))


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"model_type": "llama"}',
        "weights/model-00001.safetensors": os.urandom(300_000),
        "weights/deep/er/tokenizer.json": b"{}" * 1000,
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def overwrite(store: ArtifactStore, key: str, data: bytes) -> None:
    """Change a stored file behind the store's back."""
    if isinstance(store, S3Store):
        store.client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}", Body=data)
    else:
        store.local_path(key).write_bytes(data)


def test_file_round_trip(store, tmp_path):
    src = tmp_path / "upload.zip"
    src.write_bytes(b"zip bytes" * 1000)
    store.put_file(src, "uploads/x.zip")
    assert store.exists("uploads/x.zip")
    assert not store.exists("uploads/y.zip")
    assert store.list() == ["uploads/x.zip"]
    assert store.list("uploads") == ["uploads/x.zip"]
    assert store.list("uploads/x.zip") == ["uploads/x.zip"]

    got = Recorder()
    store.get_file("uploads/x.zip", tmp_path / "out" / "x.zip", progress=got)
    assert (tmp_path / "out" / "x.zip").read_bytes() == src.read_bytes()
    assert got.calls[-1] == (9000, 9000)
    assert os.listdir(tmp_path / "out") == ["x.zip"]  # no temp left beside it


def test_dir_round_trip_keeps_nested_files(store, tmp_path):
    files = make_tree(tmp_path / "model")
    put = Recorder()
    manifest = store.put_dir(tmp_path / "model", "models/m1", progress=put)
    assert sorted(f.path for f in manifest.files) == sorted(files)
    assert manifest.total_bytes == sum(len(d) for d in files.values())
    assert put.calls[-1] == (manifest.total_bytes, manifest.total_bytes)
    assert store.read_manifest("models/m1") == manifest
    assert store.list("models/m1") == sorted(
        [f"models/m1/{p}" for p in files] + [f"models/m1/{MANIFEST_NAME}"]
    )

    got = Recorder()
    back = store.get_dir("models/m1", tmp_path / "copy", manifest.digest, progress=got)
    assert back == manifest
    assert read_tree(tmp_path / "copy") == files
    assert got.calls[-1] == (manifest.total_bytes, manifest.total_bytes)


def test_a_large_file_goes_up_in_parts(store, tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "MULTIPART_THRESHOLD", 5 * MiB)
    monkeypatch.setattr(store_mod, "MULTIPART_CHUNKSIZE", 5 * MiB)  # S3's smallest part
    big = tmp_path / "model" / "big.bin"
    big.parent.mkdir()
    big.write_bytes(os.urandom(12 * MiB))

    put = Recorder()
    manifest = store.put_dir(tmp_path / "model", "models/big", progress=put)
    assert put.calls[-1] == (12 * MiB, 12 * MiB)
    assert [done for done, _ in put.calls] == sorted(done for done, _ in put.calls)
    if isinstance(store, S3Store):
        head = store.client.head_object(Bucket=store.bucket, Key="hub/models/big/big.bin")
        assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2 MiB

    got = Recorder()
    store.get_dir("models/big", tmp_path / "copy", manifest.digest, progress=got)
    assert (tmp_path / "copy" / "big.bin").read_bytes() == big.read_bytes()
    assert got.calls[-1] == (12 * MiB, 12 * MiB)

    got = Recorder()
    store.get_file("models/big/big.bin", tmp_path / "one.bin", progress=got)
    assert got.calls[-1] == (12 * MiB, 12 * MiB)


def test_a_wrong_digest_is_corrupt(store, tmp_path):
    make_tree(tmp_path / "model")
    store.put_dir(tmp_path / "model", "models/m1")
    with pytest.raises(ArtifactCorrupt, match=r"models/m1.*recorded at import"):
        store.get_dir("models/m1", tmp_path / "copy", "0" * 64)


@pytest.mark.parametrize("same_size", [True, False], ids=["same-size", "other-size"])
def test_a_changed_file_is_corrupt_and_named(store, tmp_path, same_size):
    files = make_tree(tmp_path / "model")
    manifest = store.put_dir(tmp_path / "model", "models/m1")
    name = "weights/model-00001.safetensors"
    size = len(files[name]) if same_size else 10
    overwrite(store, f"models/m1/{name}", os.urandom(size))

    what = "sha256" if same_size else "bytes"
    with pytest.raises(ArtifactCorrupt, match=rf"file '{name}' (has {what}|is 10 {what})"):
        store.get_dir("models/m1", tmp_path / "copy", manifest.digest)
    # the bad file never got its final name, and no temp file is left
    assert not (tmp_path / "copy" / name).exists()
    assert os.listdir(tmp_path / "copy" / "weights") == ["deep"]


def test_missing_things_are_named(store, tmp_path):
    with pytest.raises(ArtifactMissing, match="uploads/none.zip"):
        store.get_file("uploads/none.zip", tmp_path / "none.zip")
    assert not (tmp_path / "none.zip").exists()
    assert not [p for p in tmp_path.iterdir() if p.is_file()]  # no temp file either

    with pytest.raises(ArtifactMissing, match=rf"'models/none'.*{MANIFEST_NAME}"):
        store.get_dir("models/none", tmp_path / "copy", "0" * 64)
    with pytest.raises(ArtifactMissing):
        store.read_manifest("models/none")

    make_tree(tmp_path / "model")
    manifest = store.put_dir(tmp_path / "model", "models/m1")
    store.delete("models/m1/config.json")
    with pytest.raises(ArtifactMissing, match="file 'config.json'"):
        store.get_dir("models/m1", tmp_path / "copy", manifest.digest)


def test_delete_a_prefix_and_everything(store, tmp_path):
    make_tree(tmp_path / "model")
    store.put_dir(tmp_path / "model", "models/a")
    store.put_dir(tmp_path / "model", "models/ab")  # "models/a" is a directory, not a string
    store.put_file(tmp_path / "model" / "config.json", "exports/j1/out.zip")

    store.delete("models/a")
    assert store.list("models/a") == []
    assert store.list("models/ab") != []
    assert store.exists("exports/j1/out.zip")

    store.delete("models/a")  # absent: no error
    store.delete("exports/j1/out.zip")  # one file
    store.delete("models")
    assert store.list("") == []
    if isinstance(store, S3Store):
        assert store.client.list_objects_v2(Bucket=store.bucket)["KeyCount"] == 0
    else:
        assert list(store.root.rglob("*")) == []  # emptied directories go too


class DroppingLocalStore(LocalStore):
    """A store whose storage goes away after `keys_left` more files are deleted."""

    keys_left: int | None = None

    def _delete_keys(self, keys: list[str]) -> None:
        for key in keys:
            if self.keys_left == 0:
                raise ArtifactError("the storage went away")
            if self.keys_left is not None:
                self.keys_left -= 1
            super()._delete_keys([key])


def test_a_delete_cut_short_leaves_an_artifact_that_reads_as_deleted(tmp_path):
    store = DroppingLocalStore(tmp_path / "store")
    make_tree(tmp_path / "model")
    manifest = store.put_dir(tmp_path / "model", "models/m1")
    store.keys_left = 1
    with pytest.raises(ArtifactError, match="went away"):
        store.delete("models/m1")
    assert store.list("models/m1")  # the files are still there...
    with pytest.raises(ArtifactMissing, match="no raydock-manifest.json"):  # ...but no artifact
        store.get_dir("models/m1", tmp_path / "copy", manifest.digest)


def test_download_url(store, tmp_path):
    (tmp_path / "e.zip").write_bytes(b"exported")
    store.put_file(tmp_path / "e.zip", "exports/j1/e.zip")
    url = store.download_url("exports/j1/e.zip", expires_s=60)
    if isinstance(store, S3Store):
        with urllib.request.urlopen(url) as r:  # no credentials: the URL is enough
            assert r.read() == b"exported"
        assert store.local_path("exports/j1/e.zip") is None
    else:
        assert url is None
        assert store.local_path("exports/j1/e.zip").read_bytes() == b"exported"


@pytest.mark.parametrize("key", ["../x", "/abs", "a/../../b", "a//b", "./a", ""])
def test_keys_cannot_leave_the_root(store, tmp_path, key):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    for call in (
        lambda: store.put_file(src, key),
        lambda: store.get_file(key, tmp_path / "g"),
        lambda: store.put_dir(tmp_path, key),
        lambda: store.get_dir(key, tmp_path / "g", "0" * 64),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.download_url(key),
    ):
        with pytest.raises(ValueError, match="artifact key"):
            call()
    if key:  # "" lists the whole store
        with pytest.raises(ValueError):
            store.list(key)


def test_the_manifest_goes_up_last(store, tmp_path):
    make_tree(tmp_path / "model")
    store.put_dir(tmp_path / "model", "models/m1")
    (tmp_path / "model" / "config.json").unlink()
    (tmp_path / "model" / "new.txt").write_bytes(b"new")

    # while files go up, no manifest is there: the old one went first, the new one comes last
    seen = []
    key = f"models/m1/{MANIFEST_NAME}"
    manifest = store.put_dir(
        tmp_path / "model", "models/m1", progress=lambda d, t: seen.append(store.exists(key))
    )
    assert seen and not any(seen)
    assert "models/m1/config.json" not in store.list("models/m1")  # a re-import replaces
    store.get_dir("models/m1", tmp_path / "copy", manifest.digest)
    assert read_tree(tmp_path / "copy") == read_tree(tmp_path / "model")


def test_errors_name_the_store_and_key(store, tmp_path):
    if isinstance(store, S3Store):
        gone = S3Store(f"no-such-{uuid.uuid4().hex[:8]}", "", store.endpoint_url)
    else:
        gone = LocalStore(tmp_path / "nothing")
    with pytest.raises(ArtifactError, match="uploads/x.zip"):
        gone.get_file("uploads/x.zip", tmp_path / "x.zip")


def test_a_store_pickles(store, tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    store.put_file(tmp_path / "f", "uploads/f")
    again = pickle.loads(pickle.dumps(store))
    assert again.uri == store.uri
    assert again.list() == ["uploads/f"]


def test_local_get_dir_hard_links(tmp_path):
    store = LocalStore(tmp_path / "store")
    make_tree(tmp_path / "model")
    manifest = store.put_dir(tmp_path / "model", "models/m1")
    store.get_dir("models/m1", tmp_path / "copy", manifest.digest)
    for f in manifest.files:
        stored = store.local_path(f"models/m1/{f.path}")
        assert (tmp_path / "copy" / f.path).stat().st_ino == stored.stat().st_ino


def test_local_get_dir_copies_when_it_cannot_link(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    files = make_tree(tmp_path / "model")
    manifest = store.put_dir(tmp_path / "model", "models/m1")

    def cross_device(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    store.get_dir("models/m1", tmp_path / "copy", manifest.digest)
    assert read_tree(tmp_path / "copy") == files
    stored = store.local_path("models/m1/config.json")
    assert (tmp_path / "copy" / "config.json").stat().st_ino != stored.stat().st_ino


def test_local_put_file_never_leaves_half_a_file(tmp_path):
    store = LocalStore(tmp_path / "store")
    (tmp_path / "big").write_bytes(os.urandom(3 * MiB))

    def crash(done, total):
        raise KeyboardInterrupt  # a crash after the first chunk

    with pytest.raises(KeyboardInterrupt):
        store.put_file(tmp_path / "big", "uploads/big", progress=crash)
    assert not store.exists("uploads/big")
    assert [p.name for p in store.root.rglob("*") if p.is_file()] == []


def test_manifest_bytes_are_canonical():
    a = ManifestFile("b.txt", 1, "a" * 64)
    b = ManifestFile("a/c.txt", 2, "b" * 64)
    m = Manifest((a, b))
    assert Manifest((b, a)).digest == m.digest  # order of files does not matter
    doc = json.loads(m.to_bytes())
    assert doc == {
        "version": 1,
        "files": [
            {"path": "a/c.txt", "size": 2, "sha256": "b" * 64},
            {"path": "b.txt", "size": 1, "sha256": "a" * 64},
        ],
    }
    assert b" " not in m.to_bytes()
    assert Manifest.from_bytes(m.to_bytes()).digest == m.digest
    assert m.total_bytes == 3


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"version": 2, "files": []}',
        b'{"version": 1}',
        b'{"version": 1, "files": [{"path": "a", "size": 1, "sha256": "xyz"}]}',
        b'{"version": 1, "files": [{"path": "a", "size": -1, "sha256": "' + b"a" * 64 + b'"}]}',
        b'{"version": 1, "files": [{"path": "../a", "size": 1, "sha256": "' + b"a" * 64 + b'"}]}',
        b'{"version": 1, "files": [{"path": "a/", "size": 1, "sha256": "' + b"a" * 64 + b'"}]}',
        b'{"version": 1, "files": ['
        + b'{"path": "a", "size": 1, "sha256": "'
        + b"a" * 64
        + b'"},'
        + b'{"path": "a", "size": 1, "sha256": "'
        + b"a" * 64
        + b'"}]}',
    ],
)
def test_a_bad_manifest_is_corrupt(raw):
    with pytest.raises(ArtifactCorrupt, match="manifest"):
        Manifest.from_bytes(raw)


def test_open_store(tmp_path):
    s3 = open_store("s3://bucket/some/prefix", endpoint_url="http://127.0.0.1:9000")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.endpoint_url) == (
        "bucket",
        "some/prefix",
        "http://127.0.0.1:9000",
    )
    assert s3.uri == "s3://bucket/some/prefix"
    assert open_store("s3://bucket").uri == "s3://bucket"
    local = open_store(str(tmp_path / "a"))
    assert isinstance(local, LocalStore) and local.root == tmp_path / "a"
    assert open_store(f"file://{tmp_path}/b").root == tmp_path / "b"


def test_a_presigned_url_is_signed_in_the_buckets_own_region(monkeypatch):
    """With no region configured the client was made for us-east-1: calls follow S3's
    redirects, but the export's presigned URL for an eu-west-1 bucket was refused by S3
    (AuthorizationQueryParametersError). AWS is stood in for by botocore's Stubber."""
    import boto3
    from botocore.stub import Stubber

    made: list[str] = []
    real_session = boto3.session.Session

    class RegionlessSession:
        region_name = None

        def client(self, service, region_name=None, **kwargs):
            made.append(region_name)
            client = real_session().client(
                service,
                region_name=region_name,
                aws_access_key_id="AKIDEXAMPLE",
                aws_secret_access_key="secret",
                **kwargs,
            )
            stub = Stubber(client)
            headers = {"x-amz-bucket-region": "eu-west-1"}
            stub.add_client_error(
                "head_bucket", "301", http_status_code=301, response_meta={"HTTPHeaders": headers}
            )
            stub.activate()
            return client

    monkeypatch.setattr(boto3.session, "Session", RegionlessSession)
    url = store_mod.S3Store("my-eu-bucket", "raydock").download_url("exports/m.zip")
    assert made == ["us-east-1", "eu-west-1"]  # asked once, then the client of its region
    assert "%2Feu-west-1%2Fs3%2F" in url or "/eu-west-1/s3/" in url, url
