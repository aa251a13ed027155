"""response_format and tools, enforced by guided decoding on the tiny random model."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from raydock.modelgen import cached_model_dir, write_zip
from tests.guided_checks import validator_for
from tests.unit.test_native_tool_calls import QWEN3_THINKING_TEMPLATE, qwen_like_model

from .conftest import deploy_and_wait, import_ready, legacy_sdk, tool_conversation

CORPUS = Path(__file__).parents[1] / "schemas"
SCHEMAS = sorted(CORPUS.glob("*.json"))
UNSUPPORTED = sorted((CORPUS / "unsupported").glob("*.json"))
ASK = [{"role": "user", "content": "Fill in the record."}]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def check(schema: dict, content: str) -> None:
    validator_for(schema).validate(json.loads(content))


@pytest.fixture(scope="module")
def sdk(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url, api_key=live.key, timeout=120)


def test_corpus_is_large_enough():
    assert len(SCHEMAS) >= 80 and len(UNSUPPORTED) >= 6


CLOSED: dict[str, bool] = {}  # schema -> whether its replies ended with "stop" in max_tokens
#: replies that must close their JSON within max_tokens (the rest end "length", never "stop")
MIN_CLOSED = 0.9


@pytest.mark.parametrize("path", SCHEMAS, ids=[p.stem for p in SCHEMAS])
def test_schema_is_always_satisfied(sdk, path):
    case = load(path)
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": case["name"], "schema": case["schema"], "strict": True},
    }
    reply = sdk.chat.completions.create(
        model="m", messages=ASK, max_tokens=512, seed=7, response_format=fmt
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "stop":
        check(case["schema"], choice.message.content)

    stream = sdk.chat.completions.create(
        model="m", messages=ASK, max_tokens=512, seed=8, response_format=fmt, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed = chunks[-1].choices[0].finish_reason
    assert streamed in ("stop", "length")
    if streamed == "stop":
        check(case["schema"], text)
    CLOSED[path.stem] = choice.finish_reason == streamed == "stop"


def test_most_replies_close_within_max_tokens():
    if len(CLOSED) < len(SCHEMAS):
        pytest.skip("runs after the whole corpus")
    closed = sum(CLOSED.values())
    print(f"corpus: {closed}/{len(CLOSED)} schemas closed within 512 tokens (transformers)")
    assert closed >= MIN_CLOSED * len(CLOSED), sorted(k for k, v in CLOSED.items() if not v)


def test_json_object_mode(sdk):
    for seed in range(3):
        reply = sdk.chat.completions.create(
            model="m",
            messages=ASK,
            max_tokens=512,
            seed=seed,
            response_format={"type": "json_object"},
        )
        assert reply.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_cut_by_max_tokens_is_length_never_stop(sdk):
    schema = load(SCHEMAS[0])["schema"]
    reply = sdk.chat.completions.create(
        model="m",
        messages=ASK,
        max_tokens=2,
        seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("path", UNSUPPORTED, ids=[p.stem for p in UNSUPPORTED])
def test_unenforceable_schema_is_400_naming_keyword(live, path):
    case = load(path)
    r = httpx.post(
        f"{live.base_url}/chat/completions",
        timeout=30,
        headers={"Authorization": f"Bearer {live.key}"},
        json={
            "messages": ASK,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": case["name"], "schema": case["schema"]},
            },
        },
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert f"'{case['keyword']}'" in err["message"]
    assert err["param"] == "response_format.json_schema.schema"


def test_legacy_completions_enforce_response_format(sdk, live):
    legacy = legacy_sdk(sdk)
    case = load(SCHEMAS[0])
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": case["schema"]}}
    ask = {"model": "m", "prompt": "The record:", "max_tokens": 512}
    reply = legacy.completions.create(**ask, seed=4, extra_body={"response_format": fmt})
    assert reply.choices[0].finish_reason == "stop"
    check(case["schema"], reply.choices[0].text)
    chunks = list(
        legacy.completions.create(**ask, seed=5, stream=True, extra_body={"response_format": fmt})
    )
    check(case["schema"], "".join(c.choices[0].text for c in chunks if c.choices))
    reply = legacy.completions.create(
        **ask, seed=6, extra_body={"response_format": {"type": "json_object"}}
    )
    assert isinstance(json.loads(reply.choices[0].text), dict)

    bad = load(UNSUPPORTED[0])
    r = httpx.post(
        f"{live.base_url.removesuffix('/v2')}/v1/completions",
        timeout=30,
        headers={"Authorization": f"Bearer {live.key}"},
        json={
            "prompt": "x",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": bad["name"], "schema": bad["schema"]},
            },
        },
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "response_format.json_schema.schema"


def test_vllm_style_structured_outputs(sdk):
    choices = ["sunny", "rain", "snow (heavy)"]
    for seed in range(3):
        reply = sdk.chat.completions.create(
            model="m", messages=ASK, max_tokens=20, seed=seed, extra_body={"guided_choice": choices}
        )
        assert reply.choices[0].message.content in choices
    schema = load(SCHEMAS[0])["schema"]
    reply = sdk.chat.completions.create(
        model="m",
        messages=ASK,
        max_tokens=512,
        seed=1,
        extra_body={"structured_outputs": {"json": schema}},
    )
    assert reply.choices[0].finish_reason == "stop"
    check(schema, reply.choices[0].message.content)
    # grammars (GBNF or Lark) are enforced on every engine
    gbnf = 'root ::= ("yes" | "no") " " [0-9] [0-9]?'
    reply = sdk.chat.completions.create(
        model="m", messages=ASK, max_tokens=20, seed=2, extra_body={"guided_grammar": gbnf}
    )
    assert reply.choices[0].finish_reason == "stop"
    assert re.fullmatch(r"(yes|no) [0-9]{1,2}", reply.choices[0].message.content)


def test_vllm_style_regex_is_enforced(sdk):
    regex = r"[0-9]{3}-[a-z]{2,6}( [A-Z][a-z]{1,8})?"
    for seed in range(3):
        reply = sdk.chat.completions.create(
            model="m", messages=ASK, max_tokens=40, seed=seed, extra_body={"guided_regex": regex}
        )
        assert reply.choices[0].finish_reason == "stop"
        assert re.fullmatch(regex, reply.choices[0].message.content)
    out = legacy_sdk(sdk).completions.create(
        model="m",
        prompt="A code:",
        max_tokens=40,
        seed=5,
        n=2,
        extra_body={"structured_outputs": {"regex": regex}},
    )
    assert [re.fullmatch(regex, c.text) is not None for c in out.choices] == [True, True]
    # outside the engine's dialect: a 400 naming the field, before any token
    for bad in (r"(?=a)[a-z]+", r"([a-z])\1"):
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.chat.completions.create(
                model="m", messages=ASK, max_tokens=8, extra_body={"guided_regex": bad}
            )
        assert refused.value.body["param"] == "guided_regex"
        assert "look-arounds" in refused.value.body["message"]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["C", "F"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
        },
    },
}
TOOLS = {"get_weather": WEATHER, "get_time": TIME}


def assert_valid_call(choice, allowed: set[str], finish: str = "tool_calls"):
    assert choice.finish_reason == finish
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name in allowed and call.id
    schema = TOOLS[call.function.name]["function"]["parameters"]
    check(schema, call.function.arguments)


@pytest.mark.parametrize("seed", range(3))
def test_tool_choice_required_and_named(sdk, seed):
    reply = sdk.chat.completions.create(
        model="m",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        seed=seed,
        max_tokens=200,
    )
    assert_valid_call(reply.choices[0], {"get_weather", "get_time"})
    reply = sdk.chat.completions.create(
        model="m",
        messages=ASK,
        tools=[WEATHER, TIME],
        seed=seed,
        max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert_valid_call(reply.choices[0], {"get_time"}, finish="stop")  # named: as OpenAI


def test_tool_choice_auto_and_none(sdk):
    for seed in range(4):
        choice = sdk.chat.completions.create(
            model="m", messages=ASK, tools=[WEATHER], seed=seed, tool_choice="auto", max_tokens=60
        ).choices[0]
        if choice.message.tool_calls:
            assert_valid_call(choice, {"get_weather"})
        else:
            assert choice.message.content and not choice.message.content.startswith("{")
    choice = sdk.chat.completions.create(
        model="m", messages=ASK, tools=[WEATHER], seed=1, tool_choice="none", max_tokens=10
    ).choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")


#: the tiny model's tokens that start with "{" ("{" and '{"'): "auto" allows text only when it
#: does not start with "{", so with these forced first the one valid reply is a tool call
BRACE_TOKENS = {"98": 100, "737": 100}


@pytest.mark.parametrize("seed", range(2))
def test_tool_choice_auto_calls_the_tool_when_only_a_call_is_valid(sdk, seed):
    tok = AutoTokenizer.from_pretrained(cached_model_dir("tiny"))
    assert [tok.convert_ids_to_tokens(int(i)) for i in BRACE_TOKENS] == ["{", '{"']
    choice = sdk.chat.completions.create(
        model="m",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="auto",
        seed=seed,
        max_tokens=200,
        logit_bias=BRACE_TOKENS,
    ).choices[0]
    assert_valid_call(choice, {"get_weather"})  # finish_reason "tool_calls", valid arguments
    assert not choice.message.content


def test_tools_take_precedence_over_response_format(sdk):
    reply = sdk.chat.completions.create(
        model="m",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        seed=2,
        max_tokens=200,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "boolean"}},
        },
    )
    assert_valid_call(reply.choices[0], {"get_weather"})


def test_streamed_tool_call(sdk):
    chunks = list(
        sdk.chat.completions.create(
            model="m",
            messages=ASK,
            tools=[WEATHER],
            tool_choice="required",
            seed=3,
            max_tokens=200,
            stream=True,
        )
    )
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    check(WEATHER["function"]["parameters"], calls[0].function.arguments)
    # as OpenAI: the finish in a chunk of its own after the call
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not chunks[-1].choices[0].delta.tool_calls


def test_tool_conversation_over_three_turns(sdk):
    tool_conversation(sdk)


@contextlib.contextmanager
def own_deployment(platform, zips, folder: Path, name: str) -> Iterator[openai.OpenAI]:
    """The model generated in `folder` imported and deployed as `name` (about 20 s here): an
    OpenAI client on its endpoint, then the deployment undeployed."""
    files = {f.name: f for f in folder.iterdir() if f.is_file()}
    model = import_ready(platform, write_zip(zips / f"tiny-{folder.name}.zip", files))
    dep = deploy_and_wait(platform, model["modelId"], name)
    try:
        key = platform.client.create_key(dep["deploymentId"], "tests")
        base_url = f"{platform.url}/deployments/{dep['deploymentId']}/v2"
        yield openai.OpenAI(base_url=base_url, api_key=key, timeout=120)
    finally:
        platform.client.wait_job(
            platform.client.post(f"/deployments/{dep['deploymentId']}/undeploy")["dockStatusId"]
        )


def test_auto_takes_tool_calls_in_the_chat_templates_own_wrapper(platform, zips, tmp_path):
    """Qwen's way of calling tools (`<tool_call>` blocks; the tags are tokens of its vocabulary)
    needs a model of its own: an import and a deploy (about 20 s here), undeployed at the end.
    The opening tag's token is favoured: the random model would rarely pick it."""
    tags = qwen_like_model(tmp_path / "qwen-like")
    with own_deployment(platform, zips, tmp_path / "qwen-like", "chat-qwen-like") as sdk:
        ask = {
            "model": "m",
            "messages": ASK,
            "tools": [WEATHER, TIME],
            "seed": 1,
            "max_tokens": 512,  # eight calls (the most) take about 370
            "logit_bias": {str(tags["<tool_call>"]): 100},
        }
        one = sdk.chat.completions.create(**ask, parallel_tool_calls=False)
        assert_valid_call(one.choices[0], set(TOOLS))  # one call, "tool_calls", valid arguments
        assert one.choices[0].message.content is None
        chunks = list(sdk.chat.completions.create(**ask, stream=True))
        assert not any(c.choices and c.choices[0].delta.content for c in chunks)  # no tags
        calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
        assert [c.index for c in calls] == list(range(len(calls))) and len(calls) > 1
        assert len({c.id for c in calls}) == len(calls)
        for call in calls:
            check(TOOLS[call.function.name]["function"]["parameters"], call.function.arguments)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_and_named_calls_come_after_the_thinking_the_template_opens(
    platform, zips, tmp_path
):
    """Qwen3-Thinking's way: the template ends the prompt in `<think>\\n`, the vocabulary holds
    `<think>`, `</think>` and the call tags. Under "required" and a named function the model
    ends its thinking, then calls; the thinking is split off the content (as vLLM's reasoning
    parser does), whole and streamed: here it is empty, so no reasoning and no content.
    It needs a model of its own: an import and a deploy (about 20 s here), undeployed at the
    end. The end tag's token is favoured: the random model would rarely end its thinking."""
    tags = qwen_like_model(
        tmp_path / "qwen-thinking",
        QWEN3_THINKING_TEMPLATE,
        ("<think>", "</think>", "<tool_call>", "</tool_call>"),
    )
    with own_deployment(platform, zips, tmp_path / "qwen-thinking", "chat-qwen-thinking") as sdk:
        ask = {
            "model": "m",
            "messages": ASK,
            "tools": [WEATHER, TIME],
            "seed": 1,
            "max_tokens": 512,
            "logit_bias": {str(tags["</think>"]): 100},
        }
        named = {"type": "function", "function": {"name": "get_time"}}
        for tool_choice, names, finish in (
            ("required", set(TOOLS), "tool_calls"),
            (named, {"get_time"}, "stop"),  # named: as OpenAI
        ):
            choice = sdk.chat.completions.create(**ask, tool_choice=tool_choice).choices[0]
            assert choice.finish_reason == finish, choice
            assert choice.message.content is None, choice  # the end tag is not content
            assert getattr(choice.message, "reasoning", None) is None  # empty thinking
            calls = choice.message.tool_calls
            assert calls and (len(calls) == 1 or tool_choice == "required")  # named: once
            for call in calls:
                assert call.function.name in names
                check(TOOLS[call.function.name]["function"]["parameters"], call.function.arguments)
            chunks = list(sdk.chat.completions.create(**ask, tool_choice=tool_choice, stream=True))
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
            assert content == ""
            assert not any(
                getattr(c.choices[0].delta, "reasoning", None) for c in chunks if c.choices
            )
            assert [d.function.name for d in deltas] == [c.function.name for c in calls]
            assert chunks[-1].choices[0].finish_reason == finish


def test_tool_errors(live):
    def post(**extra):
        return httpx.post(
            f"{live.base_url}/chat/completions",
            timeout=30,
            headers={"Authorization": f"Bearer {live.key}"},
            json={"messages": ASK, **extra},
        )

    r = post(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    r = post(tools=[{"type": "function", "function": {}}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools.0.function.name"
    r = post(tool_choice="required")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
