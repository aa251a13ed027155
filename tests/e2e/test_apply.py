"""Declarative deployments as a user runs them: `raydock apply | diff | get deployments |
rollback` in a separate process against the session's platform, and `ray job submit` of an
apply against the session's cluster (its job server).

One flow, because each step starts from the state the previous one left: create, a no-op
re-apply, a change (`_v2`), a rollback to `_v1` (`_v3`), a change applied as a Ray job
(`_v4`), the export applied back (no change), a bad file, and --prune. It needs a few
minutes: five deploys of the tiny model and two undeploys, which it waits for.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import ray
import yaml

from raydock.client import default_deploy_body
from raydock.modelgen import build_model_zip

from .conftest import ASK_JSON
from .test_cli import raydock
from .test_huggingface import model_files

NAME = "apply-chat"
HF_REPO = "acme/apply-chat"

APP = """\
kind: Deployment
name: {name}
model:
  zip: models/tiny.zip
deviceType: cpu-small
hyperParameters:
  temperature: 1
  maxTokens: {max_tokens}
scalingParameters:
  maxBatchSize: 4
  minReplicas: 1
  maxReplicas: 1
  scaleDownDelay: 600
apiKeys:
  - name: app
"""


def served_tokens(platform, deployment_id: str, key: str) -> int:
    """Tokens a request that leaves max_tokens to the deployment gets: its maxTokens."""
    sdk = openai.OpenAI(base_url=f"{platform.url}/deployments/{deployment_id}/v2", api_key=key)
    reply = sdk.chat.completions.create(
        model="m", messages=ASK_JSON, extra_body={"ignore_eos": True}
    )
    return reply.usage.completion_tokens


def on_model(platform, name: str, model_id: str) -> str:
    """How apply's output names a deployment: its name on its model."""
    model = platform.client.get(f"/models/{model_id}")
    return f"deployment {name} on model {model_id} ({model['name']})"


def write_app(folder: Path, max_tokens: int, name: str = NAME) -> None:
    (folder / "app.yaml").write_text(APP.format(name=name, max_tokens=max_tokens))


def secrets_in(output: str) -> list[str]:
    return re.findall(r"key \(shown once, store it now\): (\S+)", output)


def versions(platform, deployment_id: str) -> list[dict]:
    return platform.client.get(f"/deployments/{deployment_id}/history")["versions"]


def ray_job(platform, working_dir: Path, key_file: Path) -> subprocess.CompletedProcess:
    """`ray job submit` of `raydock apply -f .`, as README shows it: the platform's URL and
    the key's file in the job's environment (the key itself stays out of it)."""
    dashboard = ray._private.worker.get_dashboard_url()
    env = {
        "RAYDOCK_URL": platform.url,
        "RAYDOCK_API_KEY_FILE": str(key_file),
        # the job runs `raydock` from the cluster's Python environment
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    ray_cli = str(Path(sys.executable).with_name("ray"))
    return subprocess.run(
        [
            ray_cli,
            "job",
            "submit",
            "--address",
            f"http://{dashboard}",
            "--working-dir",
            str(working_dir),
            "--runtime-env-json",
            json.dumps({"env_vars": env}),
            "--",
            "raydock",
            "apply",
            "-f",
            ".",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_apply_diff_rollback_export_prune_and_a_ray_job(
    platform, ready_model, tiny_zip, hf_hub, tmp_path
):
    auth = {"RAYDOCK_URL": platform.url, "RAYDOCK_API_KEY": platform.admin_key}
    files = tmp_path / "deployments"
    (files / "models").mkdir(parents=True)
    shutil.copy(tiny_zip, files / "models" / "tiny.zip")  # the same bytes as ready_model's
    write_app(files, max_tokens=3)
    models_before = platform.client.get("/models")["total"]
    on = on_model(platform, NAME, ready_model["modelId"])

    # diff: what would change, exit 1
    diff = raydock("diff", "-f", str(files), **auth)
    assert diff.returncode == 1, diff.stderr
    assert f"app.yaml:2: {on}: create" in diff.stdout

    # create: on the model already imported from that zip (no upload), with its key
    done = raydock("apply", "-f", str(files), **auth)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{on}: create → {NAME}_v1" in done.stdout
    assert f"apiKey app of {on}: create" in done.stdout
    assert f"{on}: DEPLOYED ({NAME}_v1)" in done.stdout
    assert "importing" not in done.stdout
    (key,) = secrets_in(done.stdout)
    assert platform.client.get("/models")["total"] == models_before
    (dep,) = [d for d in platform.client.get("/apply/export")["documents"] if d["name"] == NAME]
    assert dep["model"] == {"id": ready_model["modelId"]}
    dep_id = platform.client.get(f"/models/{ready_model['modelId']}/deployments")["deployments"]
    dep_id = next(d["deploymentId"] for d in dep_id if d["name"] == NAME)
    assert served_tokens(platform, dep_id, key) == 3

    # the same files again: nothing happens, and the key's secret is not shown again
    again = raydock("apply", "-f", str(files), **auth)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{on}: unchanged" in again.stdout and not secrets_in(again.stdout)
    assert "apply: 2 unchanged; done" in again.stdout
    assert len(versions(platform, dep_id)) == 1
    assert len(platform.client.get(f"/deployments/{dep_id}/api-keys")["apiKeys"]) == 1

    # a change: diff names it, apply redeploys as _v2, the endpoint serves it
    write_app(files, max_tokens=5)
    diff = raydock("diff", "-f", str(files), **auth)
    assert diff.returncode == 1 and "hyperParameters.maxTokens: 3 → 5" in diff.stdout
    done = raydock("apply", "-f", str(files), **auth)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{on}: redeploy → {NAME}_v2" in done.stdout
    assert served_tokens(platform, dep_id, key) == 5

    # rollback to _v1: its configuration, as a new version _v3
    back = raydock("rollback", NAME, "--version", "1", "-o", "json", **auth)
    assert back.returncode == 0, back.stderr
    assert f"rolling back to {NAME}_v1 as {NAME}_v3" in back.stderr
    assert json.loads(back.stdout)["status"] == "DEPLOYED"
    assert served_tokens(platform, dep_id, key) == 3
    history = versions(platform, dep_id)
    assert [v["name"] for v in history] == [f"{NAME}_v{n}" for n in (1, 2, 3)]
    assert history[2]["config"]["hyperParameters"]["maxTokens"] == 3
    missing = raydock("rollback", dep_id, "--version", "9", **auth)
    assert missing.returncode == 1
    assert f"version 9 not found: deployment {NAME} has versions 1 to 3" in missing.stderr
    with platform.http() as http:
        zero = http.post(f"/api/public/deployments/{dep_id}/rollback", params={"version": 0})
    assert zero.status_code == 422 and zero.json()["error"]["param"] == "version"
    assert zero.json()["error"]["message"] == "version must be at least 1 (got 0)"

    # a change applied by a Ray job: its log shows the change and its result
    key_file = tmp_path / "raydock.key"
    key_file.write_text(platform.admin_key)
    key_file.chmod(0o600)
    write_app(files, max_tokens=4)
    job = ray_job(platform, files, key_file)
    assert job.returncode == 0, job.stdout + job.stderr
    assert f"{on}: redeploy → {NAME}_v4" in job.stdout
    assert "hyperParameters.maxTokens: 3 → 4" in job.stdout
    assert f"{on}: DEPLOYED ({NAME}_v4)" in job.stdout
    assert platform.admin_key not in job.stdout + job.stderr
    assert served_tokens(platform, dep_id, key) == 4

    # a job whose deployment cannot be made fails, saying why
    failing = tmp_path / "failing"
    failing.mkdir()
    model_id = ready_model["modelId"]
    (failing / "gpu.yaml").write_text(
        f"name: apply-gpu\nmodel: {{id: {model_id}}}\ndeviceType: g5.xlarge\n"
    )
    job = ray_job(platform, failing, key_file)
    assert job.returncode != 0
    assert "gpu.yaml:1: " in job.stdout and "g5.xlarge" in job.stdout

    # the live state exported as files applies back unchanged (a dry run: nothing adopted)
    export = raydock("get", "deployments", "-o", "yaml", **auth)
    assert export.returncode == 0, export.stderr
    (mine,) = [d for d in yaml.safe_load_all(export.stdout) if d["name"] == NAME]
    assert mine["hyperParameters"]["maxTokens"] == 4 and mine["apiKeys"] == [{"name": "app"}]
    assert key not in export.stdout
    (tmp_path / "exported.yaml").write_text(yaml.safe_dump(mine))
    same = raydock("diff", "-f", str(tmp_path / "exported.yaml"), **auth)
    assert same.returncode == 0, same.stdout + same.stderr

    # a bad file: one line naming the file, line and field; nothing made
    bad = files / "bad.yaml"
    text = APP.format(name="apply-bad", max_tokens=3)
    bad.write_text(text.replace("temperature: 1\n", "temperature: 5\n"))
    refused = raydock("apply", "-f", str(bad), **auth)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"{bad}:7: hyperParameters.temperature must be between 0 and 2 (got 5)" in (
        refused.stderr
    )
    assert "apply-bad" not in json.dumps(platform.client.get("/apply/export"))

    # --prune: a file set without apply-chat undeploys it; deployments made by hand stay
    by_hand = {
        d["deploymentId"]: d["status"]
        for d in platform.client.get(f"/models/{ready_model['modelId']}/deployments")["deployments"]
        if not d["appliedFrom"]
    }
    other = tmp_path / "other"
    other.mkdir()
    hf_hub.add_repo(HF_REPO, model_files())  # a model apply imports from the Hub first
    for name in ("apply-two", "apply-three"):  # two documents, one repo: downloaded once
        (other / f"{name}.yaml").write_text(
            APP.format(name=name, max_tokens=2).replace(
                "zip: models/tiny.zip", f"huggingFace: {{repoId: {HF_REPO}}}"
            )
        )
    secrets = tmp_path / "secrets.txt"  # the created key's secret: there, not in the output
    pruned = raydock("apply", "-f", str(other), "--prune", "--secrets-out", str(secrets), **auth)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert f"key written to {secrets}" in pruned.stdout and not secrets_in(pruned.stdout)
    lines = sorted(secrets.read_text().splitlines())
    (hub_model,) = [m for m in platform.client.get("/models")["models"] if m["name"] == HF_REPO]
    assert [line.split(":")[0] for line in lines] == [
        f"{hub_model['modelId']}/apply-three/app",
        f"{hub_model['modelId']}/apply-two/app",
    ]
    assert all(line.split()[-1] not in pruned.stdout for line in lines)
    assert secrets.stat().st_mode & 0o777 == 0o600
    assert f"{on}: undeploy" in pruned.stdout
    assert f"{on}: UNDEPLOYED" in pruned.stdout
    three, two = (on_model(platform, n, hub_model["modelId"]) for n in ("apply-three", "apply-two"))
    assert f"{three}: import-and-create" in pruned.stdout  # its model's id once it started
    to_import = f"on huggingFace {HF_REPO}"  # not on the platform before its import ends
    assert f"deployment apply-two {to_import}: wait" in pruned.stdout  # then in a second round
    assert f"apply: again, for deployment apply-two {to_import}" in pruned.stdout
    assert f"{two}: create" in pruned.stdout
    assert f"{two}: DEPLOYED" in pruned.stdout and f"{three}: DEPLOYED" in pruned.stdout
    assert platform.client.get(f"/deployments/{dep_id}")["status"] == "UNDEPLOYED"
    # the repo's model, once imported, is the documents' model: nothing more to do
    again = raydock("apply", "-f", str(other), "--prune", **auth)
    assert again.returncode == 0 and "apply: 4 unchanged; done" in again.stdout, again.stdout
    for deployment_id, status in by_hand.items():
        assert platform.client.get(f"/deployments/{deployment_id}")["status"] == status

    # clean up what this test deployed
    made = [
        d
        for m in platform.client.get("/models")["models"]
        if m["source"] == "hugging_face" and m["name"] == HF_REPO
        for d in platform.client.get(f"/models/{m['modelId']}/deployments")["deployments"]
    ]
    assert sorted(d["name"] for d in made) == ["apply-three", "apply-two"]
    for dep in made:
        ref = platform.client.post(f"/deployments/{dep['deploymentId']}/undeploy")
        assert platform.client.wait_job(ref["dockStatusId"])["status"] == "SUCCESS"


def test_a_name_taken_is_refused_so_the_export_applies_back(platform, live, ready_model, tmp_path):
    """A second deployment of the model, or a second key of the deployment, under a name in
    use is a 409 naming the field and the value (over HTTP and in the CLI): `raydock get`
    then writes files apply takes (it knows deployments and keys by name). Deploys nothing:
    the session's live deployment holds the names."""
    auth = {"RAYDOCK_URL": platform.url, "RAYDOCK_API_KEY": platform.admin_key}
    dep, model_id = live.deployment, ready_model["modelId"]
    name = dep["name"]
    before = platform.client.get(f"/models/{model_id}/deployments")["total"]
    with platform.http() as http:
        again = http.post(
            f"/api/public/models/{model_id}/deploy",
            params={"modelType": "openSource"},
            json=default_deploy_body(name),
        )
    assert again.status_code == 409, again.text
    error = again.json()["error"]
    assert (error["param"], error["code"]) == ("name", "duplicate_name")
    assert f'name: model {model_id} already has a deployment named "{name}"' in error["message"]
    assert platform.client.get(f"/models/{model_id}/deployments")["total"] == before

    keys = {
        k["name"]
        for k in platform.client.get(f"/deployments/{dep['deploymentId']}/api-keys")["apiKeys"]
    }
    taken = sorted(keys)[0]
    refused = raydock("keys", "create", dep["deploymentId"], "--name", taken, **auth)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == (
        f"raydock: HTTP 409: name: deployment {dep['deploymentId']} already has an API key "
        f'named "{taken}"; choose another name (or delete that key first)'
    )

    # the model's deployments as files: apply would change nothing
    export = raydock("get", "deployments", "-o", "yaml", **auth)
    assert export.returncode == 0, export.stderr
    mine = [d for d in yaml.safe_load_all(export.stdout) if d["model"] == {"id": model_id}]
    assert name in [d["name"] for d in mine]
    (tmp_path / "exported.yaml").write_text(yaml.safe_dump_all(mine))
    same = raydock("diff", "-f", str(tmp_path / "exported.yaml"), **auth)
    assert same.returncode == 0, same.stdout + same.stderr


TWIN = "apply-twin"


def test_two_models_deployments_of_one_name_export_and_apply_back(
    platform, ready_model, tiny_zip, tmp_path
):
    """Two models each with a deployment "apply-twin" (a name is unique per model only):
    one apply makes both (uploading the second model's zip), `raydock get deployments -o
    yaml` applies back as a no-op, and a change to one of them redeploys only that one."""
    auth = {"RAYDOCK_URL": platform.url, "RAYDOCK_API_KEY": platform.admin_key}
    files = tmp_path / "twins"
    (files / "models").mkdir(parents=True)
    shutil.copy(tiny_zip, files / "models" / "tiny.zip")  # ready_model's bytes
    build_model_zip(files / "models" / "twin.zip", size="tiny", seed=7)  # a model to upload
    for model_zip in ("tiny", "twin"):
        text = APP.format(name=TWIN, max_tokens=3)
        (files / f"{model_zip}.yaml").write_text(text.replace("tiny.zip", f"{model_zip}.zip"))
    secrets = tmp_path / "twin-secrets.txt"
    made = raydock("apply", "-f", str(files), "--secrets-out", str(secrets), **auth)
    assert made.returncode == 0, made.stdout + made.stderr
    assert "importing models/twin.zip" in made.stdout
    # each key's secret says which model's apply-twin it opens
    keys = dict(line.split(": ") for line in secrets.read_text().splitlines())
    by_model = {path.split("/")[0]: key for path, key in keys.items()}
    assert sorted(keys) == sorted(f"{m}/{TWIN}/app" for m in by_model)
    a = ready_model["modelId"]
    (b,) = set(by_model) - {a}
    deployment = {}
    for m in (a, b):
        assert f"{on_model(platform, TWIN, m)}: create → {TWIN}_v1" in made.stdout
        listed = platform.client.get(f"/models/{m}/deployments")["deployments"]
        deployment[m] = next(d["deploymentId"] for d in listed if d["name"] == TWIN)
        assert served_tokens(platform, deployment[m], by_model[m]) == 3

    # the live state as files: both, each on its model; applied back, nothing changes
    export = raydock("get", "deployments", "-o", "yaml", **auth)
    assert export.returncode == 0, export.stderr
    twins = [d for d in yaml.safe_load_all(export.stdout) if d["name"] == TWIN]
    assert sorted(d["model"]["id"] for d in twins) == sorted([a, b])
    live = tmp_path / "live.yaml"
    live.write_text(yaml.safe_dump_all(twins))
    same = raydock("apply", "-f", str(live), **auth)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "apply: 4 unchanged; done" in same.stdout

    # a change to b's only: b's redeploys, a's stays as it was
    for doc in twins:
        if doc["model"]["id"] == b:
            doc["hyperParameters"]["maxTokens"] = 5
    live.write_text(yaml.safe_dump_all(twins))
    changed = raydock("apply", "-f", str(live), **auth)
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert f"{on_model(platform, TWIN, b)}: redeploy → {TWIN}_v2" in changed.stdout
    assert f"{on_model(platform, TWIN, a)}: unchanged" in changed.stdout
    assert served_tokens(platform, deployment[b], by_model[b]) == 5
    assert served_tokens(platform, deployment[a], by_model[a]) == 3
    assert [len(versions(platform, deployment[m])) for m in (a, b)] == [1, 2]

    # clean up: both undeployed, the uploaded model deleted
    for m in (a, b):
        ref = platform.client.post(f"/deployments/{deployment[m]}/undeploy")
        assert platform.client.wait_job(ref["dockStatusId"])["status"] == "SUCCESS"
    platform.client.delete(f"/models/{b}")
