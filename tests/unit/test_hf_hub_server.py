"""tests/hf_hub.py's FakeHub answers huggingface_hub's real download code as the Hub does.

Every request huggingface_hub makes goes through its shared httpx2 client; a guard on that client
fails any test that would reach a host but the fake one (the real Hub, Xet, telemetry).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, constants, file_download, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import _http

from tests.hf_hub import FakeHub

TOKEN = "hf_fake_reader_0123456789"
# httpx2 hands huggingface_hub the body in DOWNLOAD_CHUNK_SIZE (10 MiB) pieces: bytes of a
# piece still being filled when the connection drops are lost, so only a cut past the first
# whole piece leaves anything to resume from
CHUNK = constants.DOWNLOAD_CHUNK_SIZE
# http_get (file_download.py) retries a GET that ends in httpx2.RemoteProtocolError (the peer
# closed mid-body), ConnectError or a timeout 5 times, 1 s apart, resuming with
# `Range: bytes=<written>-`; the count starts again whenever an attempt wrote data. So one
# hf_hub_download makes at most 6 GETs of a file that never progresses.
GET_ATTEMPTS = 6


@pytest.fixture(autouse=True)
def _no_world(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No token from the environment or disk, no offline switch, no host but 127.0.0.1."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)

    def local_only(request: httpx2.Request) -> None:
        assert request.url.host == "127.0.0.1", f"left the machine: {request.url}"

    def factory() -> httpx2.Client:
        client = _http.default_client_factory()
        hooks = client.event_hooks
        client.event_hooks = {
            "request": [*hooks["request"], local_only],
            "response": hooks["response"],
        }
        return client

    _http.set_client_factory(factory)
    yield
    _http.set_client_factory(_http.default_client_factory)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as running:
        running.add_token(TOKEN, user="alice")
        yield running


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """http_get's pauses between retries, recorded instead of slept (its only use of `time`)."""
    pauses: list[float] = []
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=pauses.append))
    return pauses


def _download(hub: FakeHub, repo_id: str, local_dir: Path, **kwargs) -> Path:
    cache = local_dir.parent / "hf-cache"  # refs/ land there even with local_dir
    return Path(
        snapshot_download(repo_id, endpoint=hub.url, local_dir=local_dir, cache_dir=cache, **kwargs)
    )


def _files(folder: Path) -> dict[str, bytes]:
    """The repo files in a local_dir, without huggingface_hub's .cache/ bookkeeping."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).parts[0] != ".cache"
    }


def _gets(hub: FakeHub, repo_id: str, filename: str) -> list[tuple[str | None, int]]:
    """(Range header, status) of each GET of one file, at any revision."""
    prefix = f"/{repo_id}/resolve/"
    return [
        (r["range"], r["status"])
        for r in hub.requests
        if r["method"] == "GET"
        and r["path"].startswith(prefix)
        and r["path"][len(prefix) :].split("/", 1)[1] == filename
    ]


def test_model_info_lists_files_with_sizes(hub: FakeHub) -> None:
    sha = hub.add_repo("org/tiny", {"config.json": b'{"a": 1}', "model.safetensors": b"\0" * 300})
    api = HfApi(endpoint=hub.url)

    info = api.model_info("org/tiny", files_metadata=True)
    assert info.sha == sha and info.private is False and info.gated is False
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes == {"config.json": 8, "model.safetensors": 300}
    lfs = {s.rfilename: s.lfs for s in info.siblings}
    assert lfs["config.json"] is None and lfs["model.safetensors"].size == 300
    # as on the Hub, sizes only when asked for
    assert {s.size for s in api.model_info("org/tiny").siblings} == {None}
    assert api.model_info("org/tiny", revision=sha).sha == sha
    assert sorted(api.list_repo_files("org/tiny")) == ["config.json", "model.safetensors"]


def test_tree_lists_folders(hub: FakeHub) -> None:
    hub.add_repo("org/tree", {"a.json": b"1", "sub/b.json": b"22", "sub/deep/c.bin": b"333"})
    api = HfApi(endpoint=hub.url)

    top = {e.path: type(e).__name__ for e in api.list_repo_tree("org/tree")}
    assert top == {"a.json": "RepoFile", "sub": "RepoFolder"}
    under = {e.path for e in api.list_repo_tree("org/tree", path_in_repo="sub", recursive=True)}
    assert under == {"sub/b.json", "sub/deep", "sub/deep/c.bin"}
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("org/tree", path_in_repo="nowhere"))


def test_snapshot_download_fetches_exactly_the_allowed_files(hub: FakeHub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = {
        "config.json": b'{"model_type": "tiny"}',
        "model.safetensors": bytes(range(256)) * 40,
        "tokenizer/tokenizer.json": b'{"v": 1}',
        "pytorch_model.bin": b"not wanted",
        "README.md": b"# tiny",
    }
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    hub.add_repo("org/tiny", src)  # a folder on disk

    out = _download(hub, "org/tiny", tmp_path / "out", allow_patterns=["*.json", "*.safetensors"])

    wanted = {"config.json", "model.safetensors", "tokenizer/tokenizer.json"}
    assert _files(out) == {name: files[name] for name in wanted}
    assert {name for name in files if _gets(hub, "org/tiny", name)} == wanted


def test_private_repo_needs_a_token_that_may_read_it(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/secret", {"config.json": b"{}"}, private=True)
    hub.add_token("hf_other", user="bob", can_read={"org/elsewhere"})
    api = HfApi(endpoint=hub.url)

    for token in (None, "hf_other"):  # anonymous: 401, a token without the repo: 404
        with pytest.raises(RepositoryNotFoundError) as caught:
            api.model_info("org/secret", token=token)
        assert not isinstance(caught.value, GatedRepoError)
        with pytest.raises(RepositoryNotFoundError):
            _download(hub, "org/secret", tmp_path / f"denied-{token}", token=token)
    assert {r["status"] for r in hub.requests} == {401, 404}
    # an unknown token: the Hub refuses the credentials themselves, on any repo
    with pytest.raises(HfHubHTTPError) as caught:
        api.model_info("org/secret", token="hf_wrong")
    assert caught.value.response.status_code == 401
    assert not isinstance(caught.value, RepositoryNotFoundError)

    assert api.model_info("org/secret", token=TOKEN).private is True
    out = _download(hub, "org/secret", tmp_path / "ok", token=TOKEN)
    assert _files(out) == {"config.json": b"{}"}
    assert all(r["auth"] for r in hub.requests[-4:])
    assert not any(TOKEN in str(r) for r in hub.requests)


def test_gated_repo_shows_its_files_but_serves_them_to_granted_tokens(
    hub: FakeHub, tmp_path: Path
) -> None:
    hub.add_repo("org/gated", {"config.json": b"{}"}, gated=True)
    hub.add_token("hf_not_granted", can_read=set())
    api = HfApi(endpoint=hub.url)

    assert api.model_info("org/gated").gated == "auto"  # info and listing stay public
    for token in (None, "hf_not_granted"):  # 401 and 403, both X-Error-Code: GatedRepo
        with pytest.raises(GatedRepoError):
            _download(hub, "org/gated", tmp_path / f"denied-{token}", token=token)
    assert {r["status"] for r in hub.requests if r["method"] == "HEAD"} == {401, 403}
    out = _download(hub, "org/gated", tmp_path / "ok", token=TOKEN)
    assert _files(out) == {"config.json": b"{}"}


def test_whoami(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.url)
    assert api.whoami(token=TOKEN)["name"] == "alice"
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        api.whoami(token="hf_wrong")


def test_unknown_repo_revision_and_file(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/tiny", {"config.json": b"{}"})
    api = HfApi(endpoint=hub.url)

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/tiny", revision="v2")
    with pytest.raises(RevisionNotFoundError):
        _download(hub, "org/tiny", tmp_path / "rev", revision="v2")
    with pytest.raises(RevisionNotFoundError):
        _download(hub, "org/tiny", tmp_path / "sha", revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/tiny", "absent.json", endpoint=hub.url, local_dir=tmp_path / "file")


def test_a_cut_is_resumed_with_a_range_request_within_one_call(
    hub: FakeHub, tmp_path: Path, sleeps: list[float]
) -> None:
    weights = bytes(range(256)) * ((CHUNK + 300_000) // 256)
    hub.add_repo("org/big", {"model.safetensors": weights, "config.json": b"{}"})
    hub.cut("org/big", "model.safetensors", after_bytes=CHUNK + 1000, times=1)

    out = _download(hub, "org/big", tmp_path / "out")

    assert (out / "model.safetensors").read_bytes() == weights
    # the first GET broke after a whole 10 MiB piece had been written: the retry asked for the rest
    assert _gets(hub, "org/big", "model.safetensors") == [(None, 200), (f"bytes={CHUNK}-", 206)]
    assert sleeps == [1]


def test_a_call_that_runs_out_of_retries_fails_and_the_next_starts_over(
    hub: FakeHub, tmp_path: Path, sleeps: list[float]
) -> None:
    weights = bytes(range(256)) * 4096  # 1 MiB: every cut loses what it sent (see CHUNK)
    hub.add_repo("org/flaky", {"model.safetensors": weights, "config.json": b"{}"})
    hub.cut("org/flaky", "model.safetensors", after_bytes=500_000, times=GET_ATTEMPTS)
    out = tmp_path / "out"

    with pytest.raises(httpx2.RemoteProtocolError):
        _download(hub, "org/flaky", out)
    assert _gets(hub, "org/flaky", "model.safetensors") == [(None, 200)] * GET_ATTEMPTS
    assert len(sleeps) == GET_ATTEMPTS - 1
    # the partial file was private to the failed call (<hash>.<etag>.<uuid>.incomplete in
    # local_dir/.cache/huggingface/download/) and is deleted with it: nothing to resume from
    assert not list(out.rglob("*.incomplete"))
    assert not (out / "model.safetensors").exists()

    _download(hub, "org/flaky", out)
    assert _files(out) == {"model.safetensors": weights, "config.json": b"{}"}
    assert _gets(hub, "org/flaky", "model.safetensors")[GET_ATTEMPTS:] == [(None, 200)]


def test_a_reset_connection_is_not_retried(
    hub: FakeHub, tmp_path: Path, sleeps: list[float]
) -> None:
    weights = bytes(range(256)) * ((CHUNK + 300_000) // 256)
    hub.add_repo("org/reset", {"model.safetensors": weights})
    hub.cut("org/reset", "model.safetensors", after_bytes=CHUNK + 1000, times=1, reset=True)

    # httpx2.ReadError (a NetworkError) is outside what http_get resumes on
    with pytest.raises(httpx2.ReadError):
        _download(hub, "org/reset", tmp_path / "out")
    assert _gets(hub, "org/reset", "model.safetensors") == [(None, 200)]
    assert sleeps == []

    _download(hub, "org/reset", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == weights


def test_the_guard_stops_requests_to_the_real_hub() -> None:
    with pytest.raises(AssertionError, match="left the machine"):
        HfApi().model_info("openai-community/gpt2")
