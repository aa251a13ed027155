"""raydock.platform.hf against a local server speaking the Hub's API (no Ray): which files a
model needs, the reasons a repo is refused, and a download that a retry resumes."""

from __future__ import annotations

import pytest

from raydock.modelgen import cached_model_dir
from raydock.optimizers.merge import is_merge_of, merged_key
from raydock.platform import hf
from raydock.platform.model_archive import ArchiveLimits
from tests.hf_hub import FakeHub

LIMITS = ArchiveLimits(max_total_bytes=20 * 2**20)


@pytest.fixture(scope="module")
def hub():
    files = {p.name: p.read_bytes() for p in cached_model_dir("tiny").iterdir() if p.is_file()}
    with FakeHub() as hub:
        hub.add_repo("org/public", files | {"README.md": b"card", "pytorch_model.bin": b"x"})
        hub.add_repo("org/private", files, private=True)
        hub.add_repo("org/gated", files, gated=True)
        hub.add_repo("org/pickled", {**files, "model.safetensors": b""} | {"model.bin": b"x"})
        hub.add_repo("org/flaky", files)
        hub.add_token("hf_good", user="alice")
        yield hub


def files_of(hub, repo: str, token: str | None = None, connection: str | None = None):
    return hf.repo_files(hub.url, repo, None, token, connection, "base", LIMITS)


def test_only_the_files_a_model_serves_are_chosen(hub):
    files = files_of(hub, "org/public")
    assert "README.md" not in files.sizes and "pytorch_model.bin" not in files.sizes
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files.sizes)
    assert len(files.sha) == 40


def test_refusals_say_what_to_do(hub):
    with pytest.raises(hf.HubError, match="private repository needs a connection"):
        files_of(hub, "org/private")
    assert files_of(hub, "org/private", "hf_good", "team").total > 0
    with pytest.raises(hf.HubError, match="gated.*no connection"):
        files_of(hub, "org/gated")
    with pytest.raises(hf.HubError, match="refused the token of connection 'old'"):
        files_of(hub, "org/public", "hf_revoked", "old")
    with pytest.raises(hf.HubError, match="over the import limit"):
        hf.repo_files(hub.url, "org/public", None, None, None, "base", ArchiveLimits(1000))
    with pytest.raises(hf.HubError, match="revision 'nope'"):
        hf.repo_files(hub.url, "org/public", "nope", None, None, "base", LIMITS)


def test_whoami_names_the_account_or_refuses(hub):
    assert hf.whoami(hub.url, "hf_good") == "alice"
    with pytest.raises(hf.HubError, match="refused"):
        hf.whoami(hub.url, "hf_bad")


def test_a_broken_download_fails_then_a_retry_fetches_only_what_is_missing(
    hub, tmp_path, monkeypatch
):
    monkeypatch.setattr(hf, "RETRY_PAUSE_S", 0)
    files = files_of(hub, "org/flaky")
    hub.cut("org/flaky", "model.safetensors", 1000, times=hf.DOWNLOAD_ATTEMPTS, reset=True)
    folder = tmp_path / "download"
    with pytest.raises(hf.HubError, match="interrupted.*retry the import"):
        hf.download(hub.url, "org/flaky", files, None, None, folder, lambda *_: None)
    seen: list[tuple[int, int]] = []
    hf.download(hub.url, "org/flaky", files, None, None, folder, lambda *a: seen.append(a))
    assert seen[-1] == (files.total, files.total)
    hf.take_model_files(folder, files, tmp_path / "model")
    for name, size in files.sizes.items():
        assert (tmp_path / "model" / name).stat().st_size == size
    config_gets = [
        r
        for r in hub.requests
        if r["method"] == "GET"
        and r["path"].endswith("flaky/resolve/" + files.sha + "/config.json")
    ]
    assert len(config_gets) == 1  # kept from the broken attempt


def test_a_merge_is_found_by_its_adapter():
    key = merged_key("base-sum", "adapter-sum")
    assert key.startswith("merged/")
    assert is_merge_of(key.split("/")[1], "adapter-sum")
    assert not is_merge_of(key.split("/")[1], "base-sum")
