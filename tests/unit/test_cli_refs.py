"""The CLI against the API app in process (a real registry on SQLite, no Ray): a model,
deployment or key is named by its id or its name in every command; a deploy leaves the
parameters it was not given to the platform's defaults; and `models export`, `keys limits`,
`uploads list|show|cancel`."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
import zipfile
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from raydock import cli
from raydock.client import Client, default_deploy_body
from raydock.platform import api_deps, api_usage, schemas
from raydock.platform.api import app
from raydock.platform.apply import DeploymentSpec


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    async def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class _Lifecycle:
    """The lifecycle actor's handle: a deploy or an export is a job that succeeds at once
    (an export leaves a zip in the store, as export_model_task does)."""

    def __init__(self, reg, settings):
        self.reg, self.settings = reg, settings
        self.deploy = _Remote(self._deploy)
        self.submit_export = _Remote(self._export)
        self.replicas = _Remote(self._replicas)
        self.export_fails = False

    @staticmethod
    def _replicas(dep_id: str) -> dict:
        none = {"current": 0, "target": 0, "byState": {}, "applicationStatus": None}
        return none | {"message": "", "nodes": []}

    def _deploy(self, dep_id: str, body: dict, user_id: str) -> dict:
        model_id = self.reg.get_deployment(dep_id)["modelId"]
        job = self.reg.create_job("DEPLOY", model_id, user_id, dep_id)
        self.reg.set_deployment_status(dep_id, "DEPLOYING")
        self.reg.set_deployment_status(dep_id, "DEPLOYED")
        return self.reg.update_job(job["dockStatusId"], status="SUCCESS", percentage=100)

    def _export(self, model: dict, job_id: str, config: dict | None) -> None:
        if self.export_fails:
            self.reg.update_job(job_id, status="FAILED", message="export failed: disk full")
            return
        key = f"exports/{model['modelId']}/{job_id}/tiny.zip"
        work = self.settings.home_path / "export.zip"
        with zipfile.ZipFile(work, "w") as zf:
            zf.writestr("deployconfig.json", json.dumps(config or {}))
        self.settings.store().put_file(work, key)
        url = f"/api/public/exports/{job_id}/download"
        response = {"downloadUrl": url, "fileName": "tiny.zip", "artifactKey": key}
        self.reg.update_job(job_id, status="SUCCESS", percentage=100, response=response)


@dataclasses.dataclass
class Platform:
    reg: Any
    admin: dict
    lifecycle: _Lifecycle
    sent: list[httpx.Request]

    def model(self, name: str, deployconfig: dict | None = None) -> str:
        m = self.reg.create_model(name, "file", self.admin["userId"])
        self.reg.set_model_status(m["modelId"], "VALIDATING")
        self.reg.set_model_status(
            m["modelId"], "READY", artifact_uri="/x", checksum=name, deployconfig=deployconfig
        )
        return m["modelId"]

    def deployment(self, model_id: str, name: str, **overrides: Any) -> str:
        body = default_deploy_body(name, **overrides)
        return self.reg.create_deployment(model_id, body, self.admin["userId"])["deploymentId"]

    def paths(self) -> list[str]:
        """The API paths the CLI called since the last look, with their query."""
        called = [
            f"{r.method} {r.url.path.removeprefix('/public')}"
            + (f"?{r.url.query.decode()}" if r.url.query else "")
            for r in self.sent
        ]
        self.sent.clear()
        return called


@pytest.fixture
def platform(api, monkeypatch) -> Platform:
    reg, key = api
    settings = dataclasses.replace(api_deps.ctx.settings, cluster_autoscaling=True)
    monkeypatch.setattr(api_deps.ctx, "settings", settings)
    lifecycle = _Lifecycle(reg, settings)
    monkeypatch.setattr(api_deps.ctx, "lifecycle", lifecycle, raising=False)

    async def no_meter() -> None:  # the meter is a Ray actor: what is stored is the usage
        return None

    monkeypatch.setattr(api_usage, "_flush_meter", no_meter)
    sent: list[httpx.Request] = []
    client = Client("http://raydock.test", key)
    client.http = TestClient(app, base_url="http://raydock.test/public")
    client.http.headers["X-api-key"] = key
    client.http.event_hooks["request"].append(sent.append)
    monkeypatch.setattr(cli, "_client", lambda args: client)
    return Platform(reg, reg.authenticate_management(key), lifecycle, sent)


def run(capsys, *argv: str) -> Any:
    """`raydock ARGV -o json`: exit status 0, its JSON output."""
    assert cli.main([*argv, "-o", "json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def refused(*argv: str) -> str:
    """The one line `raydock ARGV` exits with (status 1)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    message = str(exc.value)
    assert message.startswith("raydock: ") and "\n" not in message, message
    return message


# ------------------------------------------------------------------ ids or names


def test_usage_of_a_deployment_named_by_its_name_counts_its_requests(platform, capsys):
    """The user's report: `usage --deployment <name>` showed 0 (the name was sent as the id)."""
    model = platform.model("tiny")
    dep = platform.deployment(model, "chat")
    other = platform.deployment(model, "other")
    minute = int(time.time()) // 60 * 60
    platform.reg.record_usage(
        [(minute, dep, "", "key-a", 3, 10, 20), (minute, other, "", "k", 1, 1, 1)]
    )
    by_name = run(capsys, "usage", "--deployment", "chat", "--group-by", "total")
    assert by_name["totals"]["requests"] == 3
    assert run(capsys, "usage", "--deployment", dep, "--group-by", "total") == by_name


def test_every_model_and_deployment_argument_takes_a_name_or_an_id(platform, capsys):
    model = platform.model("tiny")
    dep = platform.deployment(model, "chat")
    platform.paths()
    for ref in ("tiny", model):
        assert run(capsys, "models", "show", ref)["modelId"] == model
        rows = run(capsys, "deployments", "list", "--model", ref)["deployments"]
        assert [d["deploymentId"] for d in rows] == [dep]
    for ref in ("chat", dep):
        assert run(capsys, "deployments", "show", ref)["deploymentId"] == dep
        assert run(capsys, "deployments", "history", ref) == run(capsys, "history", ref)
        key = run(capsys, "keys", "create", ref, "--name", f"k-{ref}")
        listed = run(capsys, "keys", "list", ref)["apiKeys"]
        assert key["keyId"] in {k["keyId"] for k in listed}
        # a key by its name (its deployment's to give) or its id
        assert run(capsys, "keys", "delete", ref, f"k-{ref}")["keyId"] == key["keyId"]
    called = platform.paths()
    # what reached the API was always the id; an id was used as given (no listing)
    assert not [c for c in called if "/chat" in c or "/tiny" in c or "=chat" in c], called
    by_id = [c for c in called if c.startswith("GET /deployments/") or "/models/" in c]
    assert all(dep in c or model in c for c in by_id), by_id


def test_an_unknown_name_is_one_line_naming_the_option_and_the_value(platform):
    platform.model("tiny")
    assert refused("usage", "--deployment", "nope") == (
        "raydock: --deployment 'nope': no deployment has this id or name"
    )
    assert "MODEL 'gone'" in refused("models", "show", "gone")
    assert "--model 'gone'" in refused("deployments", "list", "--model", "gone")
    assert "DEPLOYMENT 'nope'" in refused("keys", "list", "nope")
    assert "DEPLOYMENT 'nope'" in refused("rollback", "nope", "--version", "1")
    assert "--base-model 'gone'" in refused(
        "import", "x.zip", "--kind", "adapter", "--base-model", "gone", "--key", "k"
    )
    assert "--key-id 'ci'" in refused("usage", "--key-id", "ci")  # a key's name: per deployment


def test_an_ambiguous_name_lists_the_ids_it_could_mean(platform):
    first, second = platform.model("tiny"), platform.model("tiny")
    one = platform.deployment(first, "twin")
    two = platform.deployment(second, "twin")
    message = refused("deployments", "show", "twin")
    assert "DEPLOYMENT 'twin': 2 deployments have this name" in message
    assert one in message and two in message
    message = refused("models", "show", "tiny")
    assert first in message and second in message


# ------------------------------------------------------------------ deploy defaults


def test_a_cli_deploy_gets_the_platforms_defaults_like_apply_and_the_deploy_form(platform, capsys):
    """One definition of each default (schemas.py): what the CLI leaves out, the platform
    fills in, as it does for `raydock apply` and the web deploy form."""
    model = platform.model("tiny")
    run(capsys, "deployments", "deploy", "tiny", "--name", "d1", "--no-wait")
    assert cli.main(["deploy", "tiny", "--name", "d2"]) == 0
    capsys.readouterr()
    argv = f"deployments deploy {model} --name d3 --no-wait --set scalingParameters.maxReplicas=3"
    run(capsys, *shlex.split(argv))
    deps = {d["name"]: d["config"] for d in platform.reg.list_deployments(model)}

    defaults = {
        "hyperParameters": schemas.HyperParameters().model_dump(),
        "scalingParameters": schemas.ScalingParameters().model_dump(),
        "optimizationInfo": schemas.OptimizationInfo().model_dump(),
    }
    form = cli._client(None).get(f"/models/{model}/deploy-form")["form"]
    applied = DeploymentSpec.model_validate(
        {"name": "a", "deviceType": "cpu-small", "model": {"id": model}}
    ).deploy_body()
    for group, values in defaults.items():
        assert deps["d1"][group] == deps["d2"][group] == values, group
        assert form[group] == applied[group] == values, group
    assert deps["d1"]["scalingParameters"]["maxBatchSize"] == 10
    assert deps["d3"]["scalingParameters"] == defaults["scalingParameters"] | {"maxReplicas": 3}
    # the CLI sent no default of its own: only what it was given
    bodies = [json.loads(r.content) for r in platform.sent if r.url.path.endswith("/deploy")]
    assert [set(b) for b in bodies] == [{"name", "hyperParameters", "deviceType"}] * 2 + [
        {"name", "hyperParameters", "deviceType", "scalingParameters"}
    ]


def test_set_values_are_yaml_else_their_text_and_a_path_leads_through_fields(platform, capsys):
    model = platform.model("tiny")
    argv = ["deployments", "deploy", model, "--name", "d4", "--no-wait"]
    run(capsys, *argv, "--set", "description=2024-01-01", "--set", "hyperParameters.topK=40")
    dep = next(d for d in platform.reg.list_deployments(model) if d["name"] == "d4")
    assert dep["config"]["description"] == "2024-01-01"  # a YAML date: no JSON value, text
    assert dep["config"]["hyperParameters"]["topK"] == 40
    # not YAML: its text, which the platform then refuses for what it is, in one line
    assert cli.main([*argv[:-2], "d5", "--set", "tags=[a"]) == 1
    assert capsys.readouterr().err == "raydock: HTTP 422: tags must be a list\n"
    assert refused(*argv, "--set", "name.x=1") == "raydock: --set name.x: name has no fields"


def test_apply_refuses_a_secrets_file_it_cannot_write_before_changing_anything(
    platform, capsys, tmp_path
):
    model = platform.model("tiny")
    doc = tmp_path / "app.yaml"
    doc.write_text(
        f"name: s1\nmodel: {{id: {model}}}\ndeviceType: cpu-small\napiKeys: [{{name: k}}]\n"
    )
    asked = len(platform.sent)
    secrets = tmp_path / "missing-folder" / "secrets.txt"
    assert cli.main(["apply", "-f", str(doc), "--secrets-out", str(secrets)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"raydock: --secrets-out {secrets}: cannot write it: "), err
    assert len(platform.sent) == asked  # nothing was asked of the platform: no key made


def test_the_deploy_form_takes_what_validates_of_a_zips_deployconfig_and_says_what_not(
    platform,
):
    deployconfig = {
        "hyperParameters": {"topK": 7, "temperature": 9},
        "scalingParameters": "big",
        "optimizationInfo": {"optimizationOption": "vllm"},
        "timeout": "60",
        "deviceType": "cpu-small",
    }
    m = platform.model("odd", deployconfig)
    answer = cli._client(None).get(f"/models/{m}/deploy-form")
    form = answer["form"]
    assert form["hyperParameters"]["topK"] == 7  # the valid field of a group is taken
    assert form["hyperParameters"]["temperature"] == schemas.HyperParameters().temperature
    assert form["scalingParameters"] == schemas.ScalingParameters().model_dump()
    assert form["timeout"] == schemas.DEFAULT_TIMEOUT_S
    ignored = answer["prefillIgnored"]
    assert ignored["hyperParameters.temperature"] == "temperature must be between 0 and 2 (got 9)"
    assert ignored["scalingParameters"] == "must be a mapping of its fields"
    assert ignored["optimizationInfo.optimizationOption"].startswith("optimizationOption")
    assert ignored["timeout"] == "timeout must be an integer"
    assert set(ignored) == {
        "hyperParameters.temperature",
        "scalingParameters",
        "optimizationInfo.optimizationOption",
        "timeout",
    }
    # a value of the right type that the deploy body refuses is not taken either (a zip
    # exported from a platform whose hardware.yaml differs)
    m = platform.model("other", {"deviceType": "p5.48xlarge-x", "timeout": 5, "name": " "})
    answer = cli._client(None).get(f"/models/{m}/deploy-form")
    assert answer["form"]["timeout"] == schemas.DEFAULT_TIMEOUT_S
    assert answer["form"]["deviceType"] == "cpu-small" and answer["form"]["name"] == "other"
    ignored = answer["prefillIgnored"]
    assert ignored["timeout"] == "timeout must be between 30 and 180 (got 5)"
    assert ignored["deviceType"].startswith("deviceType must be one of g4dn.xlarge")
    assert set(ignored) == {"timeout", "deviceType", "name"}


# ------------------------------------------------------------------ keys limits


def test_keys_limits_sets_and_clears_a_keys_limits(platform, capsys):
    dep = platform.deployment(platform.model("tiny"), "chat")
    key = run(capsys, "keys", "create", "chat", "--name", "ci", "--tokens-per-minute", "500")
    argv = shlex.split("keys limits chat ci --requests-per-minute 5 --tokens-per-day 1000")
    limits = run(capsys, *argv)["limits"]
    assert limits == {"requestsPerMinute": 5, "tokensPerMinute": 500, "tokensPerDay": 1000}
    patched = [json.loads(r.content) for r in platform.sent if r.method == "PATCH"]
    assert patched == [{"limits": {"requestsPerMinute": 5, "tokensPerDay": 1000}}]
    # one cleared (null), the others kept
    limits = run(capsys, "keys", "limits", dep, key["keyId"], "--clear", "tokensPerDay")["limits"]
    assert limits["tokensPerDay"] is None and limits["requestsPerMinute"] == 5
    # --clear alone: every limit not given
    limits = run(capsys, "keys", "limits", "chat", "ci", "--clear", "--tokens-per-day", "7")
    assert limits["limits"] == {
        "requestsPerMinute": None,
        "tokensPerMinute": None,
        "tokensPerDay": 7,
    }
    assert "--requests-per-minute" in refused("keys", "limits", "chat", "ci")
    assert "KEY 'nokey'" in refused("keys", "limits", "chat", "nokey", "--clear")


# ------------------------------------------------------------------ models export


def test_models_export_follows_the_job_and_saves_the_zip(platform, capsys, tmp_path):
    model = platform.model("tiny")
    dep = platform.deployment(model, "chat", hyperParameters={"topK": 7})
    platform.deployment(model, "later")  # the latest: what an export takes without --deployment
    out = tmp_path / "out"
    out.mkdir()
    shown = run(capsys, "models", "export", "tiny", "--deployment", "chat", "--out", str(out))
    exported = [p for p in platform.paths() if p.startswith("POST")]
    assert exported == [f"POST /models/{model}/export?deploymentId={dep}"]
    job = shown["dockStatusId"]
    assert shown["downloadUrl"] == f"http://raydock.test/api/public/exports/{job}/download"
    assert shown["savedTo"] == str(out / "tiny.zip") and shown["modelId"] == model
    with zipfile.ZipFile(out / "tiny.zip") as zf:
        assert json.loads(zf.read("deployconfig.json"))["hyperParameters"]["topK"] == 7
    # a failed export: exit 1, its reason in one line
    platform.lifecycle.export_fails = True
    assert cli.main(["models", "export", model]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "raydock: export failed: disk full"


# ------------------------------------------------------------------ uploads


def test_uploads_list_show_and_cancel_a_chunked_upload(platform, capsys):
    client = cli._client(None)
    body = {"fileName": "big.zip", "totalSize": 2048, "totalChunks": 2}
    sid = client.post("/files/session/start", json=body)["sessionId"]
    client.http.put(f"/files/session/{sid}/chunks/1", content=b"x" * 1024).raise_for_status()
    [listed] = run(capsys, "uploads", "list")["sessions"]
    assert listed["sessionId"] == sid and listed["fileName"] == "big.zip"
    assert (listed["chunksReceived"], listed["totalChunks"], listed["createdByName"]) == (
        1,
        2,
        "admin",
    )
    assert cli.main(["uploads", "list", "-o", "table"]) == 0
    assert f"{sid}  big.zip" in capsys.readouterr().out
    shown = run(capsys, "uploads", "show", sid)
    assert (shown["fileName"], shown["receivedChunks"]) == ("big.zip", [1])
    assert run(capsys, "uploads", "cancel", sid) == {"deleted": True, "sessionId": sid}
    assert platform.reg.list_upload_sessions() == []
    assert cli.main(["uploads", "show", sid]) == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_apply_refuses_key_limits_without_metering_before_making_the_deployment(
    platform, capsys, tmp_path, monkeypatch
):
    off = dataclasses.replace(api_deps.ctx.settings, metering=False)
    monkeypatch.setattr(api_deps.ctx, "settings", off)
    model = platform.model("tiny")
    doc = tmp_path / "app.yaml"
    doc.write_text(
        f"name: lim\nmodel: {{id: {model}}}\ndeviceType: cpu-small\n"
        "apiKeys:\n  - name: k\n    limits: {tokensPerDay: 100}\n"
    )
    assert cli.main(["apply", "-f", str(doc)]) == 1
    err = capsys.readouterr().err
    assert "409" in err and f"{doc}:1: limits: key limits need metering" in err, err
    assert platform.reg.list_deployments(model) == []  # nothing made, not half an apply


def test_connections_create_without_a_terminal_or_hf_token_says_what_to_set():
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "raydock.cli", "connections", "create", "hub"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env | {"RAYDOCK_API_KEY": "rdm-x", "RAYDOCK_URL": "http://127.0.0.1:9"},
        start_new_session=True,  # no controlling terminal, as in a job
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().endswith("set HF_TOKEN (no terminal to ask on)"), done.stderr


def test_apply_json_is_the_only_thing_on_stdout_and_diff_errors_exit_2(platform, capsys, tmp_path):
    """Scripts read `apply -o json` with a JSON parser and tell diff's "would change" (1) from
    its failures (2)."""
    model = platform.model("tiny")
    doc = tmp_path / "app.yaml"
    doc.write_text(f"name: js\nmodel: {{id: {model}}}\ndeviceType: cpu-small\n")
    assert cli.main(["diff", "-f", str(doc)]) == 1  # would create it
    capsys.readouterr()
    assert cli.main(["apply", "-f", str(doc), "-o", "json"]) == 0
    out, err = capsys.readouterr()
    assert [c["action"] for c in json.loads(out)["changes"]] == ["create"]
    assert "DEPLOYED" in err and "apply: 1 create; done" in err  # the progress, on stderr
    assert cli.main(["diff", "-f", str(doc)]) == 0  # nothing left to change
    assert cli.main(["diff", "-f", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_connection_command_without_its_target_names_what_is_missing(platform):
    for action in ("create", "test", "delete"):
        assert refused("connections", action) == (
            f"raydock: connections {action} needs a connection name or id"
        )
    assert platform.paths() == []  # nothing asked of the platform (no token prompt either)


def test_an_error_body_that_is_not_raydocks_is_one_short_line():
    from raydock.client import ApiFailure

    page = "<html>\n<head><title>502 Bad Gateway</title></head>\n" + "x" * 3000 + "</html>"
    assert str(ApiFailure(502, page)) == "HTTP 502: <html>"
    assert str(ApiFailure(404, {"detail": "Not Found"})) == "HTTP 404: Not Found"
    assert str(ApiFailure(400, {"error": {"message": "bad"}})) == "HTTP 400: bad"
    assert len(str(ApiFailure(500, "y" * 1000))) < 220


def test_backup_to_a_folder_is_refused_before_anything_streams(platform, tmp_path):
    assert refused("backup", str(tmp_path)) == (
        f"raydock: {tmp_path} is a folder; name the backup file in it"
    )
    assert platform.paths() == []


def test_demo_says_what_it_lacks_before_starting_anything(monkeypatch, capsys):
    """A platform's URL without its key, or the port a platform already listens on: one line,
    before a Ray cluster would start."""
    import socket

    for name in ("RAYDOCK_API_KEY", "RAYDOCK_API_KEY_FILE", "RAYDOCK_URL"):
        monkeypatch.delenv(name, raising=False)
    assert refused("demo", "--url", "http://127.0.0.1:9") == (
        "raydock: demo --url needs the platform's key (--key or RAYDOCK_API_KEY)"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["demo", "--port", str(port)]) == 1
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
