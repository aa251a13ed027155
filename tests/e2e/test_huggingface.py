"""Models from Hugging Face and the catalog, end to end: connections, imports by repo id
(public, private, gated, pickle-only, interrupted then retried), the one-request deploy from
Hugging Face answered through the OpenAI SDK, a catalog entry deployed, a deviceType too
small refused with the estimate. The Hub is a local server speaking its API (tests/hf_hub.py);
everything else is real."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import ray

from raydock.client import default_deploy_body
from raydock.modelgen import cached_model_dir
from raydock.modelgen.adapters import cached_adapter_dir

from .conftest import wait_for

TOKEN = "hf_e2e" + "T0k3n" * 6
OTHER_TOKEN = "hf_e2e_other" + "x" * 20
PUBLIC, PRIVATE, GATED = "acme/tiny-chat", "acme/private-chat", "acme/gated-chat"
PICKLED, FLAKY, SLOW = "acme/pickled-chat", "acme/flaky-chat", "acme/slow-chat"
ADAPTER, WIDE_ADAPTER = "acme/tiny-chat-lora", "acme/small-chat-lora"
CATALOG_ENTRY = "smollm2-135m-instruct"


def model_files() -> dict[str, bytes]:
    """A generated chat model's files, plus what a real repo has and a model does not need."""
    folder = cached_model_dir("tiny")
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    return files | {"README.md": b"# a model card\n", "onnx/model.onnx": b"\0" * 2048}


@pytest.fixture(scope="module")
def hub(hf_hub):
    files = model_files()
    for repo in (PUBLIC, FLAKY, SLOW):
        hf_hub.add_repo(repo, files)
    hf_hub.throttle(SLOW, "model.safetensors", 100_000)  # 3.3 MB: half a minute
    hf_hub.add_repo(PRIVATE, files, private=True)
    hf_hub.add_repo(GATED, files, gated=True)
    weights = files.pop("model.safetensors")
    hf_hub.add_repo(PICKLED, files | {"pytorch_model.bin": weights})
    # the catalog entry's repo, served with generated weights of its architecture (Llama)
    hf_hub.add_repo("HuggingFaceTB/SmolLM2-135M-Instruct", model_files())
    hf_hub.add_repo(ADAPTER, cached_adapter_dir("tiny", 3))
    hf_hub.add_repo(WIDE_ADAPTER, cached_adapter_dir("small", 3))  # another base's shapes
    hf_hub.add_token(TOKEN, user="alice")
    hf_hub.add_token(OTHER_TOKEN, user="bob", can_read=set())
    return hf_hub


def gets(hub, repo: str, name: str) -> list[dict]:
    """The Hub's GETs of one file of a repo."""
    return [
        r
        for r in hub.requests
        if r["method"] == "GET"
        and r["path"].startswith(f"/{repo}/resolve/")
        and r["path"].endswith(f"/{name}")
    ]


def settled(platform, dep_id: str, timeout: float = 400) -> dict:
    """The deployment once it is DEPLOYED or FAILED (importing, then deploying before)."""
    last: list[dict] = []

    def done() -> bool:
        last.append(platform.client.get(f"/deployments/{dep_id}"))
        return last[-1]["status"] in ("DEPLOYED", "FAILED")

    try:
        wait_for(done, timeout=timeout, interval=1)
    except AssertionError:
        model = platform.client.get(f"/models/{last[-1]['modelId']}")
        raise AssertionError(f"deployment still {last[-1]['status']}; model {model}") from None
    return last[-1]


def import_hf(platform, repo: str, **extra) -> tuple[dict, dict]:
    ref = platform.client.post("/models/import/huggingface", json={"repoId": repo, **extra})
    job = platform.client.wait_job(ref["dockStatusId"], timeout=300)
    return job, platform.client.get(f"/models/{ref['modelId']}")


@pytest.fixture(scope="module")
def connection(platform, hub) -> dict:
    return platform.client.post("/connections", json={"name": "acme-team", "token": TOKEN})


def test_connections_are_created_tested_and_deleted_without_showing_the_token(platform, hub):
    http = platform.http()
    bad = http.post("/api/public/connections", json={"name": "bad", "token": "hf_wrong"})
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"] == "token"
    assert "refused" in bad.json()["error"]["message"]

    made = http.post("/api/public/connections", json={"name": "bob", "token": OTHER_TOKEN})
    assert made.status_code == 201, made.text
    conn = made.json()
    assert conn["hfUser"] == "bob" and conn["lastTest"]["ok"] is True
    dup = http.post("/api/public/connections", json={"name": "bob", "token": OTHER_TOKEN})
    assert dup.status_code == 409
    listed = http.get("/api/public/connections").json()
    assert "bob" in [c["name"] for c in listed["connections"]]

    # the token is revoked on the Hub: a test says so, and remembers it
    hub.revoke_token(OTHER_TOKEN)
    tested = http.post(f"/api/public/connections/{conn['connectionId']}/test").json()
    assert tested["lastTest"]["ok"] is False and "refused" in tested["lastTest"]["message"]
    hub.add_token(OTHER_TOKEN, user="bob", can_read=set())
    assert http.post(f"/api/public/connections/{conn['connectionId']}/test").json()["lastTest"][
        "ok"
    ]

    texts = [bad.text, made.text, dup.text, http.get("/api/public/connections").text]
    assert not any(OTHER_TOKEN in t or "hf_wrong" in t for t in texts)
    assert http.delete(f"/api/public/connections/{conn['connectionId']}").status_code == 200
    assert http.get(f"/api/public/connections/{conn['connectionId']}").status_code == 404


def test_a_public_repo_imports_only_the_files_a_model_needs(platform, hub):
    job, model = import_hf(platform, PUBLIC, description="from the hub", tags=["hf"])
    assert job["status"] == "SUCCESS", model
    assert model["status"] == "READY" and model["name"] == PUBLIC
    assert model["source"] == "hugging_face" and model["sourceLabel"] == "Hugging Face"
    assert model["metadata"]["origin"]["repoId"] == PUBLIC
    assert model["metadata"]["architecture"] == "LlamaForCausalLM"
    # the dock status says what was downloaded: every byte of the needed files, nothing else
    needed = {n: len(b) for n, b in model_files().items() if n != "README.md" and "/" not in n}
    assert sorted(job["response"]["files"]) == sorted(needed)
    assert job["response"]["downloadedBytes"] == sum(needed.values())
    assert all(len(gets(hub, PUBLIC, name)) == 1 for name in needed)
    assert not gets(hub, PUBLIC, "README.md") and not gets(hub, PUBLIC, "model.onnx")
    assert model["modelId"] in platform.stored("models")
    # its export works although its name is a repo id (the "/" failed every export)
    ref = platform.client.post(f"/models/{model['modelId']}/export")
    job = platform.client.wait_job(ref["dockStatusId"])
    assert job["status"] == "SUCCESS", job
    assert job["response"]["fileName"] == PUBLIC.replace("/", "_") + ".zip"


def test_an_adapter_from_hugging_face_is_checked_against_its_base(platform, hub):
    base = next(m for m in platform.client.get("/models")["models"] if m["name"] == PUBLIC)
    job, model = import_hf(platform, ADAPTER, kind="adapter", baseModelId=base["modelId"])
    assert model["status"] == "READY", model
    assert model["kind"] == "adapter" and model["metadata"]["adapter"]["rank"] == 8
    job, model = import_hf(platform, WIDE_ADAPTER, kind="adapter", baseModelId=base["modelId"])
    assert model["status"] == "IMPORT_FAILED" and "shape" in model["error"], model


def test_private_and_gated_repos_need_a_connection_and_say_so(platform, hub, connection):
    job, model = import_hf(platform, PRIVATE)
    assert job["status"] == "FAILED" and model["status"] == "IMPORT_FAILED"
    assert (
        "not found" in model["error"] and "private repository needs a connection" in model["error"]
    )

    job, model = import_hf(platform, GATED)
    assert model["status"] == "IMPORT_FAILED"
    assert "gated" in model["error"] and "no connection" in model["error"]
    assert model["modelId"] not in platform.stored("models")

    job, model = import_hf(platform, PRIVATE, connectionId=connection["connectionId"])
    assert model["status"] == "READY", model
    assert model["metadata"]["origin"]["connection"] == "acme-team"

    # a connection whose account may not read the gated repo is named in the reason
    bob = platform.client.post(
        "/connections", json={"name": "bob-gated", "token": OTHER_TOKEN, "verify": False}
    )
    job, model = import_hf(platform, GATED, connectionId=bob["connectionId"])
    assert model["status"] == "IMPORT_FAILED"
    assert "'bob-gated'" in model["error"] and "gated" in model["error"]


def test_pickle_only_weights_are_refused_before_any_download(platform, hub):
    before = len(hub.requests)
    job, model = import_hf(platform, PICKLED)
    assert model["status"] == "IMPORT_FAILED"
    assert "pickle" in model["error"] and "safetensors" in model["error"]
    assert not [r for r in hub.requests[before:] if "/resolve/" in r["path"]]


def test_an_interrupted_download_fails_cleanly_and_a_retry_completes_it(platform, hub):
    # every attempt at the weights breaks off midway: the import fails, the store stays empty
    hub.cut(FLAKY, "model.safetensors", after_bytes=100_000, times=3, reset=True)
    job, model = import_hf(platform, FLAKY)
    assert model["status"] == "IMPORT_FAILED", model
    assert "interrupted" in model["error"] and "retry the import" in model["error"]
    assert model["modelId"] not in platform.stored("models")
    assert len(gets(hub, FLAKY, "model.safetensors")) == 3

    ref = platform.client.post(f"/models/{model['modelId']}/retry-import")
    job = platform.client.wait_job(ref["dockStatusId"], timeout=300)
    model = platform.client.get(f"/models/{model['modelId']}")
    assert job["status"] == "SUCCESS" and model["status"] == "READY", model
    # the files finished before the break were kept: fetched once in all
    assert len(gets(hub, FLAKY, "config.json")) == 1
    assert len(gets(hub, FLAKY, "tokenizer.json")) == 1


def test_deleting_a_model_stops_its_download(platform, hub):
    """The job ended, yet the import task downloaded on (up to the archive limit), then
    validated and stored what no model would use."""
    ref = platform.client.post("/models/import/huggingface", json={"repoId": SLOW})
    wait_for(lambda: any(r.get("sent") for r in gets(hub, SLOW, "model.safetensors")), timeout=60)
    deleted = platform.http().delete(f"/api/public/models/{ref['modelId']}")
    assert deleted.status_code == 200, deleted.text
    [transfer] = gets(hub, SLOW, "model.safetensors")
    wait_for(lambda: transfer["gone"], timeout=20)  # the task was ended: the Hub saw it go
    assert transfer["sent"] < len(model_files()["model.safetensors"])
    job = platform.client.get(f"/dock-status/{ref['dockStatusId']}")
    assert (job["status"], job["message"]) == ("FAILED", "the model was deleted")


def test_deploy_from_hugging_face_in_one_request_then_chat(platform, hub, connection):
    body = default_deploy_body("hf-chat", description="straight from the hub", tags=["hf"]) | {
        "repoId": PRIVATE,
        "connectionId": connection["connectionId"],
    }
    ref = platform.client.post("/deployments/huggingface", json=body)
    dep_id = ref["deployment"]["deploymentId"]
    assert ref["action"] == "IMPORT" and ref["deployment"]["status"] == "READY_TO_DEPLOY"

    dep = settled(platform, dep_id)
    assert dep["status"] == "DEPLOYED", dep
    assert dep["description"] == "straight from the hub"
    model = platform.client.get(f"/models/{dep['modelId']}")
    assert model["source"] == "hugging_face" and model["activeDeployments"] == 1

    key = platform.client.create_key(dep_id)
    sdk = openai.OpenAI(base_url=f"{platform.url}/deployments/{dep_id}/v2", api_key=key)
    reply = sdk.chat.completions.create(
        model=dep_id, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
    )
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    platform.client.wait_job(
        platform.client.post(f"/deployments/{dep_id}/undeploy")["dockStatusId"]
    )


def test_the_catalog_lists_30_models_and_deploys_one(platform, hub):
    listed = platform.client.get("/catalog")
    assert listed["total"] >= 30
    smol = platform.client.get("/catalog", params={"family": "smollm"})["models"]
    assert {e["id"] for e in smol} >= {CATALOG_ENTRY} and all(e["family"] == "smollm" for e in smol)
    entry = next(e for e in smol if e["id"] == CATALOG_ENTRY)
    assert entry["suggestedDeviceType"] == "cpu-medium"  # its 2.01 GiB at batch 10
    assert "cpu-small" not in entry["deviceTypes"]

    body = default_deploy_body("catalog-chat", device="cpu-medium")
    ref = platform.client.post(f"/catalog/{CATALOG_ENTRY}/deploy", json=body)
    assert ref["action"] == "IMPORT" and ref["model"]["source"] == "platform_hosted"
    dep_id = ref["deployment"]["deploymentId"]
    dep = settled(platform, dep_id)
    assert dep["status"] == "DEPLOYED", dep
    model = platform.client.get(f"/models/{dep['modelId']}")
    assert model["sourceLabel"] == "Platform Hosted" and model["name"] == entry["name"]
    key = platform.client.create_key(dep_id)
    sdk = openai.OpenAI(base_url=f"{platform.url}/deployments/{dep_id}/v2", api_key=key)
    assert (
        sdk.chat.completions.create(
            model=dep_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        .choices[0]
        .message.content
    )

    # a second deployment of the entry reuses the imported model: no second download
    again = platform.client.post(
        f"/catalog/{CATALOG_ENTRY}/deploy",
        json=default_deploy_body(
            "catalog-two", device="cpu-medium", scalingParameters={"maxBatchSize": 2}
        ),
    )
    assert again["action"] == "DEPLOY" and again["model"]["modelId"] == model["modelId"]
    platform.client.wait_job(again["dockStatusId"], timeout=400)
    for d in (dep_id, again["deployment"]["deploymentId"]):
        platform.client.wait_job(platform.client.post(f"/deployments/{d}/undeploy")["dockStatusId"])


def test_a_device_type_too_small_is_refused_with_the_estimate(platform, hub):
    before = platform.client.get("/models")["total"]
    r = platform.http().post(
        "/api/public/catalog/llama-3.1-8b-instruct/deploy",
        json=default_deploy_body("too-big", device="cpu-small"),
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "deviceType" and err["code"] == "insufficient_memory"
    assert "GiB" in err["message"] and "2 GiB of memory" in err["message"]
    assert "'g5.xlarge'" in err["message"]  # the smallest deviceType that fits
    assert platform.client.get("/models")["total"] == before  # nothing imported

    # the deploy form of an imported model offers the smallest deviceType that fits
    model = next(m for m in platform.client.get("/models")["models"] if m["name"] == PUBLIC)
    form = platform.client.get(f"/models/{model['modelId']}/deploy-form")
    assert form["fit"]["suggestedDeviceType"] == "cpu-small"
    assert form["fit"]["deviceTypes"]["cpu-small"]["fits"]


def test_no_token_reaches_a_log_or_the_database(platform, hub):
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    home = platform.settings.home_path
    files = [p for p in [*logs.rglob("*"), *home.rglob("*")] if p.is_file()]
    assert files
    leaked = [
        p
        for p in files
        if TOKEN.encode() in p.read_bytes() or OTHER_TOKEN.encode() in p.read_bytes()
    ]
    assert not leaked, leaked


def test_the_cli_imports_from_hugging_face_and_lists_the_catalog(platform, hub, capsys):
    from raydock.cli import main

    auth = ["--url", platform.url, "--key", platform.admin_key]
    assert main(["import-hf", PUBLIC, *auth]) == 0
    out = capsys.readouterr()
    assert '"status": "READY"' in out.out and "import" in out.err  # the progress bar
    assert main(["catalog", "--family", "qwen", *auth]) == 0
    table = capsys.readouterr().out
    assert "qwen2.5-7b-instruct" in table and "g5.xlarge" in table and "llama" not in table
    assert main(["import-hf", "acme/missing-repo", *auth]) == 1
    assert "not found" in capsys.readouterr().err
