"""Artifact store: model directories and single files, on a local directory or S3.

Every node reads models from one store, so a directory is written with a manifest (size and
sha256 of each file) that goes up LAST: a reader that finds a manifest finds its files, and
the manifest's own sha256 (its *digest*, recorded at import) proves a download is the
artifact that was imported. Keys are "/"-separated paths relative to the store root.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.config
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

Progress = Callable[[int, int], None]  # (bytes done, bytes total)

MANIFEST_NAME = "raydock-manifest.json"
MANIFEST_VERSION = 1

# boto3 managed transfers; read at each transfer, so tests may patch them
MULTIPART_THRESHOLD = 8 * 1024 * 1024
MULTIPART_CHUNKSIZE = 8 * 1024 * 1024
MAX_CONCURRENCY = 4

_CHUNK = 1024 * 1024  # local copies
_TMP_MARK = ".raydock-tmp-"  # in every temp name; list() skips such files


class ArtifactError(Exception):
    """An artifact could not be stored or fetched; the message names the key and the reason."""


class ArtifactMissing(ArtifactError):
    """The key (or a file its manifest lists) is not in the store."""


class ArtifactCorrupt(ArtifactError):
    """Content differs from what was recorded: checksum or size mismatch, or a bad manifest."""


@dataclass(frozen=True)
class ManifestFile:
    path: str  # posix, relative to the artifact's prefix
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What put_dir recorded: every file of a directory artifact with its size and sha256."""

    files: tuple[ManifestFile, ...]

    def to_bytes(self) -> bytes:
        """Canonical JSON (files sorted by path), so equal manifests have equal digests."""
        files = sorted(self.files, key=lambda f: f.path)
        doc = {
            "version": MANIFEST_VERSION,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        """sha256 of the manifest: the checksum recorded at import."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        """Parse and check a stored manifest; ArtifactCorrupt says what is wrong with it."""
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ArtifactCorrupt(f"manifest is not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION:
            raise ArtifactCorrupt(f"manifest is not a version {MANIFEST_VERSION} manifest")
        entries = doc.get("files")
        if not isinstance(entries, list):
            raise ArtifactCorrupt("manifest has no 'files' list")
        files = []
        for i, e in enumerate(entries):
            ok = (
                isinstance(e, dict)
                and isinstance(e.get("path"), str)
                and type(e.get("size")) is int
                and e["size"] >= 0
                and is_sha256(e.get("sha256"))
            )
            if not ok:
                raise ArtifactCorrupt(f"manifest entry {i} is not {{path, size, sha256}}: {e!r}")
            try:
                canonical = check_key(e["path"]) == e["path"]
            except ValueError as err:
                raise ArtifactCorrupt(f"manifest entry {i}: {err}") from None
            if not canonical:
                raise ArtifactCorrupt(f"manifest entry {i}: path {e['path']!r} ends with '/'")
            files.append(ManifestFile(e["path"], e["size"], e["sha256"]))
        if len({f.path for f in files}) != len(files):
            raise ArtifactCorrupt("manifest lists a file twice")
        return cls(tuple(files))


def is_sha256(value: Any) -> bool:
    """Whether value is a lowercase sha256 hex digest (what digests and manifests hold)."""
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def check_key(key: str) -> str:
    """Return the key without trailing "/"; ValueError if it could escape the store root."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"artifact key {key!r}: must be a non-empty string")
    if key.startswith("/"):
        raise ValueError(f"artifact key {key!r}: must be relative (starts with '/')")
    if "\\" in key or "\0" in key:
        raise ValueError(f"artifact key {key!r}: contains a backslash or NUL")
    stripped = key.rstrip("/")
    if any(part in ("", ".", "..") for part in stripped.split("/")):
        raise ValueError(f"artifact key {key!r}: has an empty, '.' or '..' segment")
    return stripped


def _check_prefix(prefix: str) -> str:
    """Like check_key, but "" (the whole store) is allowed."""
    return "" if prefix in ("", "/") else check_key(prefix)


def _join(prefix: str, path: str) -> str:
    return f"{prefix}/{path}" if prefix else path


def hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _temp_beside(dest: Path) -> Iterator[Path]:
    """A temp path next to dest, renamed onto dest when the block succeeds, removed if not."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{_TMP_MARK}{uuid.uuid4().hex[:16]}-{dest.name}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _local_errors(what: str) -> Iterator[None]:
    """Disk trouble (full, no permission) fails the artifact too, with a reason that names it."""
    try:
        yield
    except OSError as e:
        raise ArtifactError(f"{what}: {e}") from e


class _Counter:
    """Turns incremental byte callbacks (from any thread) into cumulative (done, total)."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        if self.progress is None:
            return
        with self._lock:
            # boto reports negative amounts when it rewinds a retried part
            self.done = max(0, min(self.total, self.done + n))
            self.progress(self.done, self.total)


def _copy(src: Path, dst: Path, counter: _Counter) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(_CHUNK):
            fo.write(chunk)
            counter.add(len(chunk))


class ArtifactStore(ABC):
    """Where artifacts live; get_dir/put_dir/get_file/put_file are the same for every backend.

    Subclasses provide the primitives (_upload, _download, _read_bytes, ...). Downloads land on
    a temp name next to the destination and are renamed into place only when complete (and,
    for directories, verified).
    """

    uri: str

    # --- primitives -------------------------------------------------------------------------

    @abstractmethod
    def _upload(self, local: Path, key: str, counter: _Counter) -> None: ...

    @abstractmethod
    def _download(self, key: str, dest: Path, counter: _Counter) -> None:
        """Write key's bytes to dest (a temp path); ArtifactMissing if absent."""

    @abstractmethod
    def _size(self, key: str) -> int:
        """Size of a stored file; ArtifactMissing if absent."""

    @abstractmethod
    def _read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def _write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def _delete_keys(self, keys: list[str]) -> None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys of the files at or under prefix (a directory, not a string prefix), sorted."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether key is a stored file."""

    def download_url(self, key: str, expires_s: int = 3600) -> str | None:
        """A URL a client can GET the file from without credentials; None if there is none."""
        check_key(key)
        return None

    def local_path(self, key: str) -> Path | None:
        """The file's path on this machine when the store is a local directory, else None."""
        check_key(key)
        return None

    # --- shared operations ------------------------------------------------------------------

    def put_file(self, local: Path, key: str, progress: Progress | None = None) -> None:
        """Store one file under key (replacing any file there)."""
        key = check_key(key)
        local = Path(local)
        with _local_errors(f"storing {local} as {key!r} in {self.uri}"):
            self._upload(local, key, _Counter(progress, local.stat().st_size))

    def get_file(self, key: str, local: Path, progress: Progress | None = None) -> None:
        """Fetch key into local, renamed into place once complete; ArtifactMissing if absent."""
        key = check_key(key)
        counter = _Counter(progress, self._size(key) if progress else 0)
        with (
            _local_errors(f"fetching {key!r} from {self.uri} to {local}"),
            _temp_beside(Path(local)) as tmp,
        ):
            self._download(key, tmp, counter)

    def put_dir(self, local_dir: Path, prefix: str, progress: Progress | None = None) -> Manifest:
        """Store every file under local_dir at prefix and return the manifest written last.

        Whatever was at prefix before is replaced: its manifest goes first (a reader sees no
        artifact, never a mix), files the new manifest does not list are deleted.
        """
        prefix = check_key(prefix)
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise ArtifactError(f"put_dir {prefix!r}: {local_dir} is not a directory")
        files = []
        with _local_errors(f"put_dir {prefix!r}: reading {local_dir}"):
            for path in local_dir.rglob("*"):
                rel = path.relative_to(local_dir).as_posix()
                if not path.is_file() or rel == MANIFEST_NAME:
                    continue  # a manifest here came from get_dir; a new one is written below
                files.append(ManifestFile(rel, path.stat().st_size, hash_file(path)))
        manifest = Manifest(tuple(sorted(files, key=lambda f: f.path)))

        manifest_key = _join(prefix, MANIFEST_NAME)
        self._delete_keys([manifest_key])
        counter = _Counter(progress, manifest.total_bytes)
        for f in manifest.files:
            with _local_errors(f"put_dir {prefix!r}: storing {f.path!r} in {self.uri}"):
                self._upload(local_dir / f.path, _join(prefix, f.path), counter)
        wanted = {_join(prefix, f.path) for f in manifest.files} | {manifest_key}
        self._delete_keys([k for k in self.list(prefix) if k not in wanted])
        self._write_bytes(manifest_key, manifest.to_bytes())
        return manifest

    def read_manifest(self, prefix: str) -> Manifest:
        """The manifest at prefix; ArtifactMissing if there is none (never or half imported)."""
        key = _join(check_key(prefix), MANIFEST_NAME)
        try:
            raw = self._read_bytes(key)
        except ArtifactMissing:
            raise ArtifactMissing(
                f"artifact {prefix!r}: no {MANIFEST_NAME} in {self.uri} "
                "(never imported, deleted, or the import did not finish)"
            ) from None
        try:
            return Manifest.from_bytes(raw)
        except ArtifactCorrupt as e:
            raise ArtifactCorrupt(f"artifact {prefix!r}: {e}") from None

    def get_dir(
        self, prefix: str, local_dir: Path, digest: str, progress: Progress | None = None
    ) -> Manifest:
        """Fetch the artifact at prefix into local_dir, verifying it against digest.

        The manifest must hash to digest and each file must match its size and sha256; a file
        is renamed into place only after it passed. On failure, files already placed stay (the
        caller fetches into a temp directory and removes it).
        """
        prefix = check_key(prefix)
        manifest = self.read_manifest(prefix)
        if manifest.digest != digest:
            raise ArtifactCorrupt(
                f"artifact {prefix!r}: manifest sha256 {manifest.digest} is not {digest} "
                "recorded at import (the artifact was replaced or altered)"
            )
        local_dir = Path(local_dir)
        with _local_errors(f"artifact {prefix!r}: creating {local_dir}"):
            local_dir.mkdir(parents=True, exist_ok=True)
        counter = _Counter(progress, manifest.total_bytes)
        for f in manifest.files:
            key = _join(prefix, f.path)
            with (
                _local_errors(f"artifact {prefix!r}: fetching {f.path!r} into {local_dir}"),
                _temp_beside(local_dir / f.path) as tmp,
            ):
                try:
                    self._fetch_dir_file(key, tmp, counter)
                except ArtifactMissing:
                    raise ArtifactMissing(
                        f"artifact {prefix!r}: file {f.path!r} listed in its manifest is "
                        f"missing from {self.uri}"
                    ) from None
                self._verify(prefix, f, tmp)
        return manifest

    def _fetch_dir_file(self, key: str, dest: Path, counter: _Counter) -> None:
        self._download(key, dest, counter)

    @staticmethod
    def _verify(prefix: str, f: ManifestFile, path: Path) -> None:
        size = path.stat().st_size
        if size != f.size:
            raise ArtifactCorrupt(
                f"artifact {prefix!r}: file {f.path!r} is {size} bytes, manifest says {f.size}"
            )
        sha = hash_file(path)
        if sha != f.sha256:
            raise ArtifactCorrupt(
                f"artifact {prefix!r}: file {f.path!r} has sha256 {sha}, manifest says {f.sha256}"
            )

    def delete(self, key_or_prefix: str) -> None:
        """Delete a file, or every file under a prefix; nothing there is not an error.

        Manifests go first, as in put_dir: a delete cut short leaves files no manifest names
        (an artifact that reads as deleted), never a manifest whose files are half gone.
        """
        keys = self.list(check_key(key_or_prefix))
        manifests = [k for k in keys if k.rpartition("/")[2] == MANIFEST_NAME]
        self._delete_keys(manifests)
        self._delete_keys([k for k in keys if k.rpartition("/")[2] != MANIFEST_NAME])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class LocalStore(ArtifactStore):
    """A directory on a local or shared filesystem (single node, NFS)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def local_path(self, key: str) -> Path | None:
        return self._path(check_key(key))

    def _upload(self, local: Path, key: str, counter: _Counter) -> None:
        with _temp_beside(self._path(key)) as tmp:
            _copy(local, tmp, counter)

    def _download(self, key: str, dest: Path, counter: _Counter) -> None:
        src = self._path(key)
        if not src.is_file():
            raise ArtifactMissing(f"{key!r} is not in {self.uri}")
        _copy(src, dest, counter)

    def _fetch_dir_file(self, key: str, dest: Path, counter: _Counter) -> None:
        # Store files are never changed in place (writes rename a new file over the old), so a
        # hard link is a safe copy; get_dir still hashes it.
        src = self._path(key)
        try:
            os.link(src, dest)
        except FileNotFoundError:
            if not src.is_file():
                raise ArtifactMissing(f"{key!r} is not in {self.uri}") from None
            raise
        except OSError:  # another filesystem, or links not supported
            self._download(key, dest, counter)
        else:
            counter.add(src.stat().st_size)

    def _size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ArtifactMissing(f"{key!r} is not in {self.uri}") from None

    def _read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactMissing(f"{key!r} is not in {self.uri}") from None

    def _write_bytes(self, key: str, data: bytes) -> None:
        with _temp_beside(self._path(key)) as tmp:
            tmp.write_bytes(data)

    def _delete_keys(self, keys: list[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            # drop directories left empty, up to the root
            parent = path.parent
            while parent != self.root and parent.is_relative_to(self.root):
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent

    def list(self, prefix: str = "") -> list[str]:
        prefix = _check_prefix(prefix)
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and _TMP_MARK not in p.name
        )

    def exists(self, key: str) -> bool:
        return self._path(check_key(key)).is_file()


class S3Store(ArtifactStore):
    """A bucket (and optional key prefix) on S3 or any S3-compatible server (endpoint_url).

    Credentials come from boto3's standard chain (env, profile, instance role), never from
    raydock. Picklable: the client is made again on first use after unpickling.
    """

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None) -> None:
        if not bucket:
            raise ValueError("S3Store needs a bucket name")
        self.bucket = bucket
        self.prefix = _check_prefix(prefix)
        self.endpoint_url = endpoint_url
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client: Any = None
        self._client_lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"bucket": self.bucket, "prefix": self.prefix, "endpoint_url": self.endpoint_url}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                session = boto3.session.Session()
                region = session.region_name
                if region is None and not self.endpoint_url:
                    region = bucket_region(self._new_client(session, "us-east-1"), self.bucket)
                self._client = self._new_client(session, region or "us-east-1")
            return self._client

    def _new_client(self, session: Any, region: str) -> Any:
        # custom endpoints (MinIO, moto, Ceph) want path-style URLs
        style = "path" if self.endpoint_url else "auto"
        return session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=region,
            config=botocore.config.Config(signature_version="s3v4", s3={"addressing_style": style}),
        )

    def _full(self, key: str) -> str:
        return _join(self.prefix, key)

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Turn boto's exceptions into ArtifactError naming the key."""
        where = f"s3://{self.bucket}/{self._full(key)}"
        try:
            yield
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise ArtifactMissing(f"{key!r} is not in {self.uri}") from None
            raise ArtifactError(f"{action} {where}: {code} {err.get('Message', e)}") from e
        except (BotoCoreError, S3UploadFailedError) as e:
            raise ArtifactError(f"{action} {where}: {e}") from e

    @staticmethod
    def _transfer_config() -> TransferConfig:
        return TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNKSIZE,
            max_concurrency=MAX_CONCURRENCY,
        )

    def _upload(self, local: Path, key: str, counter: _Counter) -> None:
        with self._errors("upload to", key):
            self.client.upload_file(
                str(local),
                self.bucket,
                self._full(key),
                Config=self._transfer_config(),
                Callback=counter.add,
            )

    def _download(self, key: str, dest: Path, counter: _Counter) -> None:
        with self._errors("download of", key):
            self.client.download_file(
                self.bucket,
                self._full(key),
                str(dest),
                Config=self._transfer_config(),
                Callback=counter.add,
            )

    def _size(self, key: str) -> int:
        with self._errors("head of", key):
            return self.client.head_object(Bucket=self.bucket, Key=self._full(key))["ContentLength"]

    def _read_bytes(self, key: str) -> bytes:
        with self._errors("read of", key):
            return self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()

    def _write_bytes(self, key: str, data: bytes) -> None:
        with self._errors("write of", key):
            self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data)

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):  # delete_objects takes at most 1000 keys
            batch = keys[i : i + 1000]
            with self._errors("delete of", batch[0]):
                resp = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._full(k)} for k in batch], "Quiet": True},
                )
            if resp.get("Errors"):
                e = resp["Errors"][0]
                raise ArtifactError(
                    f"delete of s3://{self.bucket}/{e.get('Key')}: {e.get('Code')} "
                    f"{e.get('Message')} ({len(resp['Errors'])} keys not deleted)"
                )

    def list(self, prefix: str = "") -> list[str]:
        prefix = _check_prefix(prefix)
        base = self._full(prefix) if prefix else self.prefix
        under = f"{base}/" if base else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        with self._errors("list of", prefix or "."):
            if prefix and self.exists(prefix):
                keys.append(prefix)
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=under
            ):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    def exists(self, key: str) -> bool:
        key = check_key(key)
        try:
            self._size(key)
        except ArtifactMissing:
            return False
        return True

    def download_url(self, key: str, expires_s: int = 3600) -> str | None:
        key = check_key(key)
        with self._errors("presigning", key):
            return self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._full(key)},
                ExpiresIn=expires_s,
            )


def bucket_region(client: Any, bucket: str) -> str | None:
    """The AWS region a bucket lives in (S3 names it in a header, on a redirect too), or None.
    Calls follow S3's redirects from any region, presigned URLs cannot: one signed for
    us-east-1 on an eu-west-1 bucket is refused (AuthorizationQueryParametersError)."""
    try:
        answer = client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        answer = exc.response
    except BotoCoreError:  # no network, no credentials: the calls will say
        return None
    return (answer.get("ResponseMetadata") or {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")


def open_store(root: str, endpoint_url: str | None = None) -> ArtifactStore:
    """The store for a configured root: "s3://bucket[/prefix]" or a local directory.

    endpoint_url (an S3-compatible server) only applies to s3:// roots.
    """
    if root.startswith("s3://"):
        bucket, _, prefix = root[len("s3://") :].partition("/")
        return S3Store(bucket, prefix, endpoint_url)
    if root.startswith("file://"):
        root = root[len("file://") :]
    if not root:
        raise ValueError("artifact store root is empty")
    return LocalStore(Path(root).expanduser())
