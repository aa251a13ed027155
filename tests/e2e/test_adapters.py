"""LoRA adapters end to end: an adapter imported onto its base (or refused with the reason it
does not fit), then deployed as its own deployment, whose answers are the base's with the
adapter applied: equal to PEFT's merge of the same adapter computed in this process."""

from __future__ import annotations

import openai
import pytest
import torch

from raydock.client import default_deploy_body
from raydock.modelgen import cached_model_dir
from raydock.modelgen.adapters import build_adapter_zip, cached_adapter_dir
from raydock.optimizers import plan

from .conftest import deploy_and_wait

PROMPT = [{"role": "user", "content": "Tell me about the river"}]
TOKENS = 16


def import_adapter(platform, path, base_id: str) -> dict:
    ref = platform.client.import_zip(path, kind="adapter", baseModelId=base_id)
    platform.client.wait_job(ref["dockStatusId"], timeout=300)
    return platform.client.get(f"/models/{ref['modelId']}")


def reference_reply(seed: int) -> str:
    """The greedy reply of base + adapter merged by PEFT here, as the chat endpoint renders
    the prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = cached_model_dir("tiny")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
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
