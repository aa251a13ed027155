"""Models from the Hugging Face Hub: what a repo holds, which files a model needs, and a
download of them whose finished files a retry keeps, through `huggingface_hub` (its endpoint
setting points it at any server that speaks the Hub's API).

Every failure becomes a HubError whose message a person can act on: repo not found, gated or
unauthorized (naming the connection), no safetensors weights, over the import limit, a
download interrupted (a retry fetches only the files not finished).
"""

from __future__ import annotations

import errno
import fnmatch
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydock.platform.model_archive import ArchiveError, check_layout

#: A sharded checkpoint's index: its `weight_map` names the shards the model loads.
INDEX_FILE = "model.safetensors.index.json"
#: The files of a model raydock serves (config, tokenizer, safetensors weights), at the repo
#: root: nothing else is downloaded (no pickles, no other formats, no READMEs of gigabytes).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "*.safetensors",
    INDEX_FILE,
    "adapter_config.json",
)
#: Pickle weights: listed so the layout check can say why they are refused, never fetched.
_PICKLE_FILES = ("*.bin", "*.pt", "*.pth", "*.ckpt")
#: Attempts per file before the import fails (each starts the file over: huggingface_hub keeps
#: a broken call's partial file private and deletes it).
DOWNLOAD_ATTEMPTS = 3
RETRY_PAUSE_S = 1.0


class HubError(Exception):
    """The Hub refused or failed; the message is meant for the user."""


@dataclass(frozen=True)
class RepoFiles:
    sha: str  # the commit the download is pinned to
    sizes: dict[str, int]  # root files the model needs -> bytes

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


def _needed(name: str, patterns: tuple[str, ...]) -> bool:
    return "/" not in name and any(fnmatch.fnmatch(name, p) for p in patterns)


class _Gated(Exception):
    """A gated repo seen in its listing, before any download is refused."""


def _refusal(exc: Exception, repo_id: str, revision: str | None, connection: str | None) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    via = f"connection {connection!r}" if connection else "no connection (anonymous)"
    if isinstance(exc, GatedRepoError | _Gated):
        return (
            f"{repo_id} is a gated repository and {via} may not read it: accept its licence "
            "on Hugging Face with the account of a connection's token, and import with that "
            "connection"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {revision!r} of {repo_id} does not exist on Hugging Face"
    if isinstance(exc, RepositoryNotFoundError):
        private = "" if connection else "; a private repository needs a connection"
        return (
            f"repository {repo_id} was not found on Hugging Face with {via} (check the "
            f"name{private}, or that the connection's token may read it)"
        )
    if getattr(getattr(exc, "response", None), "status_code", None) in (401, 403):
        return (
            f"Hugging Face refused the token of {via} (invalid, revoked, or not allowed to "
            "read this repository): test the connection"
        )
    return f"Hugging Face could not be reached or refused the request: {_short(exc)}"


def _disk_full(repo_id: str, missing: int, free: int) -> str:
    return (
        f"the node's disk cannot hold {repo_id}: {missing / 2**20:.1f} MiB still to download, "
        f"{free / 2**20:.1f} MiB free; free space on the node (its model cache: "
        "cache_max_gb) and retry the import"
    )


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def whoami(endpoint: str | None, token: str) -> str:
    """The account a token authenticates as; HubError when it does not."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi(endpoint=endpoint or None).whoami(token=token)
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status in (401, 403):
            raise HubError("the token was refused by Hugging Face (invalid or revoked)") from None
        raise HubError(f"Hugging Face could not check the token: {_short(exc)}") from None
    except Exception as exc:  # network: the Hub is unreachable from here
        raise HubError(f"Hugging Face could not be reached: {_short(exc)}") from None
    return str(info.get("name") or "")


def repo_files(
    endpoint: str | None,
    repo_id: str,
    revision: str | None,
    token: str | None,
    connection: str | None,
    kind: str,
    limits: Any,
) -> RepoFiles:
    """The files to download, checked before any byte of weights moves: the same layout
    rules as a .zip (config, tokenizer, safetensors; pickles refused) and the size limit."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint or None).model_info(
            repo_id, revision=revision, files_metadata=True, token=token or False
        )
    except Exception as exc:
        raise HubError(_refusal(exc, repo_id, revision, connection)) from None
    siblings = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    try:
        check_layout(
            [n for n in siblings if _needed(n, MODEL_FILES + _PICKLE_FILES)],
            kind,
            limits.allow_pickle,
        )
    except ArchiveError as exc:
        raise HubError(f"{repo_id}: {exc}") from None
    if not any(n.endswith(".safetensors") for n in siblings):  # allow_pickle let it pass
        raise HubError(
            f"{repo_id}: has pickle weights only, and an import from the Hub fetches "
            "safetensors weights alone (allow_pickle applies to uploaded zips): pick a repo "
            "with *.safetensors, or convert the weights and upload them as a zip"
        )
    if info.gated and not token:  # listing a gated repo is public; its files are not
        raise HubError(_refusal(_Gated(), repo_id, revision, connection))
    sha = info.sha or revision or "main"
    needed = [n for n in siblings if _needed(n, MODEL_FILES)]
    if INDEX_FILE in needed:  # sharded: only the shards the index names
        weights = _shards(endpoint, repo_id, sha, token, connection)
    else:
        weights = _weights(needed, kind)
    missing = sorted(weights - siblings.keys())
    if missing:
        raise HubError(f"{repo_id}: {INDEX_FILE} names {missing}, which the repo lacks")
    sizes = {n: siblings[n] for n in needed if not n.endswith(".safetensors")}
    sizes |= {n: siblings[n] for n in sorted(weights)}
    files = RepoFiles(sha=sha, sizes=sizes)
    if files.total > limits.max_total_bytes:
        raise HubError(
            f"{repo_id} needs {files.total / 2**30:.1f} GiB of model files, over the import "
            f"limit of {limits.max_total_bytes / 2**30:.1f} GiB (max_archive_bytes)"
        )
    return files


def _weights(names: list[str], kind: str) -> set[str]:
    """The safetensors files an unsharded model loads: model.safetensors (an adapter:
    adapter_model.safetensors) when the repo has it, so that no other copy of the weights
    beside it is fetched; else every one at the root."""
    single = "adapter_model.safetensors" if kind == "adapter" else "model.safetensors"
    if single in names:
        return {single}
    return {n for n in names if n.endswith(".safetensors")}


def _shards(
    endpoint: str | None, repo_id: str, sha: str, token: str | None, connection: str | None
) -> set[str]:
    """The shards the index's weight_map names, read from the Hub at the pinned commit: a
    repo may hold another copy of the weights beside them (e.g. Mistral's
    consolidated.safetensors), which is not fetched."""
    from huggingface_hub import hf_hub_download

    with tempfile.TemporaryDirectory(prefix="raydock-index-") as tmp:
        try:
            path = hf_hub_download(
                repo_id,
                INDEX_FILE,
                revision=sha,
                local_dir=tmp,
                cache_dir=Path(tmp) / ".cache",  # nothing written to the node's home
                token=token or False,
                endpoint=endpoint or None,
            )
        except Exception as exc:
            raise HubError(_refusal(exc, repo_id, sha, connection)) from None
        try:
            weight_map = json.loads(Path(path).read_text())["weight_map"]
            return {str(shard) for shard in weight_map.values()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise HubError(f"{repo_id}: {INDEX_FILE} has no readable weight_map") from None


def _bytes_on_disk(folder: Path) -> int:
    """Bytes downloaded so far, partial files (huggingface_hub's .incomplete) included."""
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.name.endswith((".lock", ".metadata")):
                total += path.stat().st_size
        except OSError:
            pass  # renamed while we looked
    return total


def download(
    endpoint: str | None,
    repo_id: str,
    files: RepoFiles,
    token: str | None,
    connection: str | None,
    folder: Path,
    progress: Callable[[int, int], None],
) -> None:
    """Download the files into `folder` one by one with `hf_hub_download`, which resumes a
    broken transfer within a call (HTTP Range) and skips a file already complete in
    `folder`: a retried import (this one's next attempt, or the user's retry after a
    failure) fetches only what is missing. HubError when the Hub refuses or every attempt
    breaks off. Progress is (bytes on disk, total), polled."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    folder.mkdir(parents=True, exist_ok=True)
    missing, free = files.total - _bytes_on_disk(folder), shutil.disk_usage(folder).free
    if missing > free:
        raise HubError(_disk_full(repo_id, missing, free))
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            progress(min(_bytes_on_disk(folder), files.total), files.total)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for name in sorted(files.sizes, key=files.sizes.get):  # small files first
            for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
                try:
                    hf_hub_download(
                        repo_id,
                        name,
                        revision=files.sha,
                        local_dir=folder,
                        cache_dir=folder / ".cache",  # nothing written to the node's home
                        token=token or False,
                        endpoint=endpoint or None,
                    )
                    break
                except (RepositoryNotFoundError, RevisionNotFoundError) as exc:  # gated too
                    raise HubError(_refusal(exc, repo_id, files.sha, connection)) from None
                except Exception as exc:  # the connection broke: try again, then give up
                    status = getattr(getattr(exc, "response", None), "status_code", None)
                    if status in (401, 403):  # a token revoked meanwhile: no retry helps
                        raise HubError(_refusal(exc, repo_id, files.sha, connection)) from None
                    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                        left = files.total - _bytes_on_disk(folder)
                        free = shutil.disk_usage(folder).free
                        raise HubError(_disk_full(repo_id, left, free)) from None
                    if attempt == DOWNLOAD_ATTEMPTS:
                        done = _bytes_on_disk(folder)
                        raise HubError(
                            f"the download of {repo_id} was interrupted after "
                            f"{done / 2**20:.1f} of {files.total / 2**20:.1f} MiB "
                            f"({DOWNLOAD_ATTEMPTS} attempts at {name}; last error: "
                            f"{_short(exc)}); retry the import: the files already "
                            "downloaded are kept, the one it broke off in starts over"
                        ) from None
                    time.sleep(RETRY_PAUSE_S * attempt)
    finally:
        stop.set()
        watcher.join()
    progress(files.total, files.total)


def take_model_files(folder: Path, files: RepoFiles, dest: Path) -> None:
    """Move the downloaded model files out of the download folder (its .cache bookkeeping
    stays behind) into `dest`, checking each is complete."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, size in files.sizes.items():
        src = folder / name
        if not src.is_file() or (size and src.stat().st_size != size):
            raise HubError(f"{name} is incomplete after the download; retry the import")
        src.replace(dest / name)
