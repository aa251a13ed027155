"""The OpenAI surface through the Serve proxy, with unmodified clients (openai SDK, raw HTTP)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from raydock.modelgen import cached_model_dir

from .conftest import deploy_and_wait, greedy_tokens, legacy_sdk, wait_for

HELLO = [{"role": "user", "content": "Tell me about lighthouses."}]


@pytest.fixture(scope="module")
def sdk(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key=live.key)


def test_streaming_chat_chunks_done_and_usage(sdk, live):
    stream = sdk.chat.completions.create(
        model="m",
        messages=HELLO,
        max_tokens=10,
        stream=True,
        seed=3,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 10
    whole = sdk.chat.completions.create(model="m", messages=HELLO, max_tokens=10, seed=3)
    assert whole.choices[0].message.content == text  # streaming == non-streaming
    # raw SSE ends with [DONE]
    r = httpx.post(
        f"{live.base_url}/chat/completions",
        timeout=60,
        headers={"Authorization": f"Bearer {live.key}"},
        json={"messages": HELLO, "max_tokens": 3, "stream": True},
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in r.text.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_seed_makes_output_reproducible(sdk):
    def ask(seed):
        return (
            sdk.chat.completions.create(
                model="m", messages=HELLO, max_tokens=16, temperature=1.0, seed=seed
            )
            .choices[0]
            .message.content
        )

    assert ask(11) == ask(11)
    assert len({ask(11), ask(12), ask(13)}) > 1


def test_n_choices_and_sampling_params(sdk):
    reply = sdk.chat.completions.create(
        model="m",
        messages=HELLO,
        max_completion_tokens=5,
        n=3,
        seed=1,
        top_p=0.9,
        temperature=0.7,
        extra_body={"top_k": 20},
    )
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    assert reply.usage.completion_tokens <= 15
    # sampled choices differ from each other; greedy ones are all the same answer
    sampled = sdk.chat.completions.create(
        model="m", messages=HELLO, max_tokens=16, n=4, seed=7, temperature=1.0
    )
    assert len({c.message.content for c in sampled.choices}) > 1
    greedy = sdk.chat.completions.create(
        model="m", messages=HELLO, max_tokens=16, n=4, seed=7, temperature=0
    )
    assert len({c.message.content for c in greedy.choices}) == 1


def test_logprobs(sdk):
    reply = sdk.chat.completions.create(
        model="m", messages=HELLO, max_tokens=4, logprobs=True, top_logprobs=3, seed=2
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-6


def test_stop_sequence_ends_generation_before_it(sdk):
    greedy = dict(model="m", messages=HELLO, max_tokens=40, temperature=0)
    full = sdk.chat.completions.create(**greedy).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = sdk.chat.completions.create(**greedy, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[: full.index(stop)]
    assert stop not in cut.message.content


def test_penalties_are_applied_and_checked(sdk, live):
    plain = greedy_tokens(sdk, HELLO)
    assert len(plain) == 32
    for penalties in (
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"repetition_penalty": 2.0},
    ):
        penalized = greedy_tokens(sdk, HELLO, **penalties)
        assert len(set(penalized)) > len(set(plain)), penalties
    # +100 on one token makes it the greedy choice at every step
    word = AutoTokenizer.from_pretrained(cached_model_dir("tiny")).decode([300])
    assert word.strip() and set(greedy_tokens(sdk, HELLO, logit_bias={"300": 100})) == {word}

    def refused(**body) -> dict:
        r = httpx.post(
            f"{live.base_url}/chat/completions",
            headers={"Authorization": f"Bearer {live.key}"},
            json={"messages": HELLO, **body},
        )
        assert r.status_code == 400
        return r.json()["error"]

    err = refused(presence_penalty=2.5)
    assert err["param"] == "presence_penalty" and "-2" in err["message"]
    err = refused(logit_bias={"99999": 1})
    assert err["param"] == "logit_bias.99999" and "0–" in err["message"]


def test_length_finish_and_legacy_completions(sdk):
    client = legacy_sdk(sdk)
    r = client.completions.create(
        model="m",
        prompt="The harbour at dawn",
        max_tokens=6,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    choice = r.choices[0]
    assert r.object == "text_completion" and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 6
    assert len(choice.logprobs.tokens) == 6
    for token, top in zip(choice.logprobs.tokens, choice.logprobs.top_logprobs, strict=True):
        assert token in top and len(top) in (2, 3)  # as OpenAI: with the sampled token
    # each token's place in the text, as code that pairs tokens with the text reads it
    tokens, offsets = choice.logprobs.tokens, choice.logprobs.text_offset
    placed = [choice.text[o : o + len(t)] for o, t in zip(offsets, tokens, strict=True)]
    assert placed == tokens, (choice.text, offsets)
    stream = client.completions.create(
        model="m", prompt="The harbour", max_tokens=4, stream=True, extra_body={"ignore_eos": True}
    )
    assert "".join(c.choices[0].text for c in stream if c.choices)
    # echo: the text begins with the prompt, whole or streamed
    echoed = client.completions.create(model="m", prompt="The harbour", max_tokens=3, echo=True)
    assert echoed.choices[0].text.startswith("The harbour")
    assert len(echoed.choices[0].text) > len("The harbour")
    stream = client.completions.create(
        model="m", prompt="The harbour", max_tokens=3, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices).startswith("The harbour")
    with pytest.raises(openai.BadRequestError) as exc:  # it would need the prompt's logprobs
        client.completions.create(model="m", prompt="x", max_tokens=2, echo=True, logprobs=1)
    assert exc.value.body["param"] == "echo"


def test_v1_streams_with_usage_and_serves_legacy_completions(platform, live, ready_model):
    client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=live.key)
    dep_id = live.deployment["deploymentId"]
    stream = client.chat.completions.create(
        model=dep_id,
        messages=HELLO,
        max_tokens=6,
        stream=True,
        seed=5,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    whole = client.chat.completions.create(model=dep_id, messages=HELLO, max_tokens=6, seed=5)
    assert whole.choices[0].message.content == text
    # /v1/completions: the same base URL
    done = client.completions.create(model=dep_id, prompt="The harbour", max_tokens=4)
    assert done.object == "text_completion" and done.usage.completion_tokens == 4
    streamed = client.completions.create(
        model=dep_id, prompt="The harbour", max_tokens=4, stream=True, extra_body={"seed": 1}
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices)
    # another deployment's key reaches only its own deployment
    other = deploy_and_wait(platform, ready_model["modelId"], "v1-other")
    other_key = platform.client.create_key(other["deploymentId"])
    r = httpx.post(
        v1_url(platform),
        json={"model": dep_id, "messages": HELLO, "max_tokens": 2},
        headers={"Authorization": f"Bearer {other_key}"},
    )
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = httpx.post(
        v1_url(platform),
        json={"model": other["deploymentId"], "messages": HELLO, "max_tokens": 2},
        headers={"Authorization": f"Bearer {live.key}"},
    )
    assert r.status_code == 404
    platform.client.wait_job(
        platform.client.post(f"/deployments/{other['deploymentId']}/undeploy")["dockStatusId"]
    )


def test_openai_standard_base_url(platform, live):
    client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=live.key)
    models = client.models.list().data
    dep_id = live.deployment["deploymentId"]
    # the deployment, then the adapters of its base it serves by request (test_adapters.py)
    assert models[0].id == dep_id and all(m.id.startswith(f"{dep_id}:") for m in models[1:])
    for name in (live.deployment["deploymentId"], live.deployment["name"]):
        reply = client.chat.completions.create(model=name, messages=HELLO, max_tokens=2)
        assert reply.choices[0].message.role == "assistant"
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=HELLO, max_tokens=2)
    assert exc.value.body["param"] == "model"
    # one model by its id or the deployment's name, as client.models.retrieve asks
    for name in (dep_id, live.deployment["name"]):
        assert client.models.retrieve(name).id == dep_id
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("no-such-model")
    assert exc.value.body["code"] == "model_not_found"
    # /v1 needs a model: a 400 that names it, not a 404 about "None"
    r = httpx.post(
        v1_url(platform),
        json={"messages": HELLO, "max_tokens": 2},
        headers={"Authorization": f"Bearer {live.key}"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    assert "model is required" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),  # 0 and vLLM's -1: off
        ({"max_tokens": 513}, "max_tokens"),
        ({"n": 9}, "n"),
        ({"stop": list("abcdefghi")}, "stop"),  # 8 at most
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: as OpenAI
        # the engines read text: an image part is refused, not silently dropped
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content.0.type",
        ),
        # a schema keyword with a value no schema has (it was a 500)
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
            "response_format.json_schema.schema",
        ),
        # a tool result names the call it answers, as OpenAI requires
        (
            {"messages": [*HELLO, {"role": "tool", "content": "21"}]},
            "messages.1.tool_call_id",
        ),
    ],
)
def test_out_of_range_parameter_is_400_naming_it(live, extra, param):
    r = httpx.post(
        f"{live.base_url}/chat/completions",
        timeout=30,
        headers={"Authorization": f"Bearer {live.key}"},
        json={"messages": HELLO} | extra,
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]
    assert err["type"] == "invalid_request_error"


def test_error_shapes(platform, live):
    url = f"{platform.url}/deployments/dp-unknown/v2/chat/completions"
    r = httpx.post(url, json={"messages": HELLO}, headers={"Authorization": f"Bearer {live.key}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{live.base_url}/chat/completions", json={"messages": HELLO})
    fields = {"message", "type", "param", "code", "request_id"}
    assert r.status_code == 401 and set(r.json()["error"]) == fields
    r = httpx.post(
        f"{live.base_url}/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {live.key}"},
    )
    assert r.status_code == 400


def v1_url(platform, kind: str = "chat/completions") -> str:
    """The OpenAI-standard path: the gateway, which streams from the engine by handle."""
    return f"{platform.url}/v1/{kind}"


@pytest.mark.parametrize("path", ["replica route", "gateway /v1"])
def test_client_disconnect_frees_its_batch_slot(platform, live, path):
    dep_id = live.deployment["deploymentId"]
    stats_url = f"/api/public/deployments/{dep_id}/stats"
    url = f"{live.base_url}/chat/completions" if path == "replica route" else v1_url(platform)
    http = platform.http()
    before = http.get(stats_url).json()
    with httpx.stream(
        "POST",
        url,
        timeout=60,
        headers={"Authorization": f"Bearer {live.key}"},
        json={
            "model": dep_id,
            "messages": HELLO,
            "max_tokens": 512,
            "stream": True,
            "ignore_eos": True,
        },
    ) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
        assert http.get(stats_url).json()["running"] == 1
    # closed mid-stream: the sequence leaves the batch at the next decode step
    after = wait_for(lambda: (s := http.get(stats_url).json())["running"] == 0 and s, timeout=5)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["finished"] == before["finished"]


def test_requests_are_batched_together(platform, live):
    stats_url = f"/api/public/deployments/{live.deployment['deploymentId']}/stats"
    body = {"messages": HELLO, "max_tokens": 64, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(
            timeout=60, headers={"Authorization": f"Bearer {live.key}"}
        ) as c:
            return await asyncio.gather(
                *(c.post(f"{live.base_url}/chat/completions", json=body) for _ in range(6))
            )

    http = platform.http()
    before = http.get(stats_url).json()
    assert all(r.status_code == 200 for r in asyncio.run(burst()))
    after = http.get(stats_url).json()
    # read as deltas (max_batch is the replica's lifetime high, met by earlier tests): the
    # 6 x 64 tokens took at most 2 x 64 decoding steps, an average batch of 3 or more, where
    # one sequence at a time takes 384
    assert after["finished"] - before["finished"] == 6
    steps = after["steps"] - before["steps"]
    assert 64 <= steps <= 128, (before, after)


def test_stop_string_inside_a_stream(sdk):
    """A stop string met mid-reply ends the stream before it: the chunks join to the text up
    to the stop, the stop never appears, and the finish reason is "stop"."""
    greedy = {"model": "m", "messages": HELLO, "max_tokens": 40, "temperature": 0}
    full = sdk.chat.completions.create(**greedy, extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(text) > 10 and text.index(stop) > 0, text
    chunks = list(
        sdk.chat.completions.create(
            **greedy, stop=[stop], stream=True, extra_body={"ignore_eos": True}
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text[: text.index(stop)], (text, stop)
    assert stop not in streamed
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["stop"]


def test_full_queue_is_429_and_not_ready_is_503(platform, ready_model):
    dep = deploy_and_wait(
        platform,
        ready_model["modelId"],
        "narrow",
        scalingParameters={"maxBatchSize": 1, "maxReplicas": 1},
    )
    key = platform.client.create_key(dep["deploymentId"])
    url = f"{platform.url}/deployments/{dep['deploymentId']}/v2/chat/completions"
    body = {"model": dep["deploymentId"], "messages": HELLO, "max_tokens": 256, "ignore_eos": True}

    async def burst(target: str):
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
            return await asyncio.gather(*(c.post(target, json=body) for _ in range(16)))

    for target in (url, v1_url(platform)):  # the replica route, then the gateway's handle
        results = asyncio.run(burst(target))
        codes = sorted(r.status_code for r in results)
        assert set(codes) == {200, 429}, (target, codes)
        err = next(r for r in results if r.status_code == 429).json()["error"]
        assert err["type"] == "rate_limit_error"

    ref = platform.client.post(f"/deployments/{dep['deploymentId']}/undeploy")
    platform.client.wait_job(ref["dockStatusId"])
    ref = platform.client.post(f"/deployments/{dep['deploymentId']}/retrigger")
    auth = {"Authorization": f"Bearer {key}"}
    for target in (url, v1_url(platform)):
        r = httpx.post(target, json=body, headers=auth)
        assert r.status_code == 503 and r.json()["error"]["code"] == "deployment_not_ready"
    platform.client.wait_job(ref["dockStatusId"])
    # the gateway's cached handle reaches the new app, not the one undeployed
    small = {**body, "max_tokens": 2}
    for target in (url, v1_url(platform)):
        wait_for(lambda t=target: httpx.post(t, json=small, headers=auth).status_code == 200, 5)
    platform.client.wait_job(
        platform.client.post(f"/deployments/{dep['deploymentId']}/undeploy")["dockStatusId"]
    )


# ------------------------------------------------------------------ the Responses API

CITY_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"enum": ["Oslo", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_responses_api_with_the_openai_sdk(platform, live):
    """client.responses.create / .stream (the OpenAI SDK, unmodified) on the gateway's /v1
    and on the deployment's own route: text, a stream, a JSON schema, a tool call and its
    second turn, and what raydock refuses."""
    client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=live.key)
    dep_id = live.deployment["deploymentId"]
    ask = {"model": dep_id, "input": "Tell me about lighthouses.", "instructions": "Be brief"}
    reply = client.responses.create(**ask, max_output_tokens=8, temperature=0, metadata={"t": "1"})
    assert reply.object == "response" and reply.id.startswith("resp_") and reply.output_text
    assert reply.model == live.deployment["name"] and reply.metadata == {"t": "1"}
    assert reply.usage.output_tokens <= 8 and reply.usage.input_tokens > 0
    if reply.usage.output_tokens == 8:  # cut by max_output_tokens
        assert reply.status == "incomplete"
        assert reply.incomplete_details.reason == "max_output_tokens"
    # the same greedy reply, streamed, through the SDK's own event accumulator (which
    # gives a final response only for response.completed: a cut one ends response.incomplete)
    with client.responses.stream(**ask, max_output_tokens=8, temperature=0) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in kinds and kinds[-1] == f"response.{reply.status}"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    last = events[-1].response
    assert last.output_text == reply.output_text and last.usage.output_tokens > 0
    # a JSON schema, enforced
    person = client.responses.create(
        model=dep_id,
        input="Describe a person as JSON.",
        max_output_tokens=64,
        text={
            "format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
        },
    )
    assert person.status == "completed", person
    data = json.loads(person.output_text)
    assert set(data) == {"name", "age"} and 0 <= data["age"] <= 120 and len(data["name"]) <= 8
    # a function call, then the second turn with its output
    question = [{"role": "user", "content": "What is the weather in Oslo?"}]
    called = client.responses.create(
        model=dep_id,
        input=question,
        tools=[CITY_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=64,
    )
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Oslo", "Rome")
    assert call.call_id and called.status == "completed"
    with client.responses.stream(
        model=dep_id,
        input=question,
        tools=[CITY_TOOL],
        tool_choice="required",
        max_output_tokens=64,
    ) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    (streamed_call,) = streamed.output
    assert streamed_call.type == "function_call" and streamed_call.name == "get_weather"
    assert json.loads(streamed_call.arguments)["city"] in ("Oslo", "Rome")
    answered = client.responses.create(
        model=dep_id,
        input=[
            *question,
            call.model_dump(exclude_none=True),  # the output item, sent back as it came
            {"type": "function_call_output", "call_id": call.call_id, "output": "Rain, 8 °C"},
        ],
        tools=[CITY_TOOL],
        tool_choice="none",
        max_output_tokens=8,
    )
    assert answered.output[0].type == "message" and answered.output_text
    # refusals: 400 naming the field
    for extra, param in [
        ({"previous_response_id": reply.id}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"max_output_tokens": 513}, "max_output_tokens"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tool_choice": "required"}, "tool_choice"),  # chat's rule, naming the field sent
    ]:
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(**ask, **extra)
        assert exc.value.body["param"] == param, exc.value.body
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.retrieve(reply.id)
    assert exc.value.body["code"] == "response_not_found"
    # the deployment's own route answers it too (its replicas, one hop)
    own = openai.OpenAI(base_url=f"{platform.url}/deployments/{dep_id}/v1", api_key=live.key)
    assert own.responses.create(**ask, max_output_tokens=4).output_text
    with pytest.raises(openai.NotFoundError) as exc:
        own.responses.retrieve(reply.id)
    assert exc.value.body["code"] == "response_not_found"
