"""The CLI's chunked upload, against the API app in process (no Ray): an upload broken off
(Ctrl-C, a refusal) deletes its session and chunks on the server, which kept them a day."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from raydock.client import Client
from raydock.platform import api_deps
from raydock.platform.api import app


def test_ctrl_c_during_an_upload_deletes_its_session(api, tmp_path):
    reg, admin_key = api
    archive = tmp_path / "model.zip"
    archive.write_bytes(b"PK" + b"\0" * 5000)
    client = Client("http://raydock.test", admin_key)
    client.http = TestClient(app, base_url="http://raydock.test/public")
    client.http.headers["X-api-key"] = admin_key

    def interrupt(sent: int, total: int) -> None:
        if sent < total:  # after the first chunk reached the server
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.import_zip(archive, chunked=True, chunk_bytes=1024, progress=interrupt)
    assert reg.list_upload_sessions() == []
    uploads = api_deps.ctx.settings.uploads_path
    assert not uploads.exists() or list(uploads.iterdir()) == []


def test_the_upload_fits_a_server_with_a_small_chunk_limit(api, tmp_path, monkeypatch):
    """A server behind a proxy's 1 KiB body limit, with upload_chunk_max_bytes set to match,
    refused the CLI's 8 MiB chunks: every `raydock import` failed."""
    import dataclasses

    reg, admin_key = api
    settings = api_deps.ctx.settings
    small = dataclasses.replace(settings, upload_chunk_max_bytes=1024)
    monkeypatch.setattr(api_deps.ctx, "settings", small)
    archive = tmp_path / "model.zip"
    archive.write_bytes(b"PK" + b"\0" * 5000)
    client = Client("http://raydock.test", admin_key)
    client.http = TestClient(app, base_url="http://raydock.test/public")
    client.http.headers["X-api-key"] = admin_key
    sent = []

    def all_sent(done: int, total: int) -> None:
        sent.append(done)
        if done == total:  # stop before `complete`, which imports (a Ray task)
            [session] = reg.list_upload_sessions()
            sent.append((session["totalChunks"], session["chunksReceived"]))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.import_zip(archive, chunked=True, progress=all_sent)
    assert sent == [1024, 2048, 3072, 4096, 5002, (5, 5)]


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    from raydock import cli, cli_resources

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_resources, "cmd_models", interrupted)
    assert cli.main(["models", "list", "--key", "k"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raydock: interrupted"), err


def test_a_backup_into_a_missing_folder_says_so(tmp_path):
    from raydock import cli

    target = tmp_path / "nodir" / "bk.tar"
    with pytest.raises(SystemExit) as exc:  # its message is the one line on stderr
        cli.main(["backup", str(target), "--key", "k", "--url", "http://127.0.0.1:9"])
    assert f"{target.parent} is not a folder" in str(exc.value) and ".part" not in str(exc.value)
