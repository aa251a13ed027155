"""A thinking model's reasoning apart from its answer, through real HTTP with the OpenAI SDK:
chat (`message.reasoning`, `delta.reasoning`, usage), `include_reasoning: false`, a
json_schema answer after a template that opens the thinking, and the Responses API's
`reasoning` item.

One deployment of its own (an import and a deploy, about 20 s here; undeployed at the end):
the tiny model with Qwen3-Thinking's template (the generation prompt ends in `<think>\\n`)
and tag tokens (`qwen_like_model`). The end tag's token is favoured a little (+4): the random
model would rarely end its thinking, and with more it would write little else; the seed makes
the output the same for every request."""

from __future__ import annotations

import json

import openai
from playwright.sync_api import expect

from tests.unit.test_native_tool_calls import QWEN3_THINKING_TEMPLATE, qwen_like_model

from .conftest import sign_in
from .test_structured import own_deployment

ASK = [{"role": "user", "content": "Say hello."}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


def test_a_thinking_models_reasoning_comes_apart_from_its_answer(platform, zips, tmp_path, page):
    tags = qwen_like_model(
        tmp_path / "qwen-thinking",
        QWEN3_THINKING_TEMPLATE,
        ("<think>", "</think>", "<tool_call>", "</tool_call>"),
    )
    bias = {str(tags["</think>"]): 4}
    with own_deployment(platform, zips, tmp_path / "qwen-thinking", "chat-thinking") as sdk:
        ask = {"model": "m", "messages": ASK, "seed": 2, "max_tokens": 40, "logit_bias": bias}
        whole = sdk.chat.completions.create(**ask)
        message = whole.choices[0].message
        assert message.reasoning and message.content  # the thinking ended, then an answer
        assert "</think>" not in message.reasoning and "<think>" not in message.reasoning
        thought = whole.usage.completion_tokens_details.reasoning_tokens
        assert 0 < thought < whole.usage.completion_tokens

        # streamed: the reasoning first, piece by piece, then the same content
        chunks = list(
            sdk.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
        )
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        kinds = ["reasoning" if getattr(d, "reasoning", None) else "content" for d in deltas]
        assert kinds.index("content") > 1 and "reasoning" not in kinds[kinds.index("content") :]
        assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == message.reasoning
        assert "".join(d.content or "" for d in deltas) == message.content
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == thought

        hidden = sdk.chat.completions.create(**ask, extra_body={"include_reasoning": False})
        assert hidden.choices[0].message.reasoning is None
        assert hidden.choices[0].message.content == message.content

        # json_schema: the answer at once, the content JSON that validates
        fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER_SCHEMA}}
        structured = sdk.chat.completions.create(
            model="m", messages=ASK, seed=2, max_tokens=60, response_format=fmt
        )
        assert structured.choices[0].finish_reason == "stop"
        value = json.loads(structured.choices[0].message.content)
        assert set(value) == {"city", "days"} and isinstance(value["days"], int)

        # the Responses API (on /v1): a reasoning item before the message, output_text the answer
        v1 = openai.OpenAI(
            base_url=str(sdk.base_url).rstrip("/").removesuffix("/v2") + "/v1",
            api_key=sdk.api_key,
            timeout=120,
        )
        extra = {"seed": 2, "logit_bias": bias}
        response = v1.responses.create(
            model="m", input="Say hello.", max_output_tokens=40, extra_body=extra
        )
        assert [item.type for item in response.output] == ["reasoning", "message"]
        assert response.output[0].content[0].text == message.reasoning
        assert response.output_text == message.content
        assert response.usage.output_tokens_details.reasoning_tokens == thought
        with v1.responses.stream(
            model="m", input="Say hello.", max_output_tokens=40, extra_body=extra
        ) as stream:
            events = list(stream)
        types = [event.type for event in events]
        assert types.index("response.reasoning_text.delta") < types.index(
            "response.output_text.delta"
        )
        # max_output_tokens ends this reply (response.incomplete): the last event's response
        final = events[-1].response
        assert [item.type for item in final.output] == ["reasoning", "message"]
        assert final.output_text == message.content

        # the dashboard's playground shows the thinking apart from the answer (greedy: the
        # same reply as the API's), folded once the answer begins
        hello = [{"role": "user", "content": "Hello there"}]
        api = sdk.chat.completions.create(model="m", messages=hello, temperature=0, max_tokens=24)
        api = api.choices[0].message
        assert api.reasoning  # the template opened the thinking: the reply starts in it
        dep_id = str(sdk.base_url).rstrip("/").split("/")[-2]
        sign_in(page, platform.admin_key)
        expect(page.locator("#user-name")).to_have_text("admin")
        page.goto(f"/#/deployments/{dep_id}/playground")
        page.get_by_label("Temperature").fill("0")
        page.get_by_label("Max tokens").fill("24")
        page.get_by_label("Message").fill("Hello there")
        page.get_by_role("button", name="Send").click()
        expect(page.locator(".bubble.streaming")).to_have_count(0, timeout=60_000)
        bubble = page.locator('.bubble[data-role="assistant"]')
        expect(bubble.locator(".thinking")).to_be_visible()
        expect(bubble.locator(".thinking .reasoning")).to_have_text(api.reasoning.strip())
        expect(bubble.locator(".text")).to_have_text((api.content or "").strip())
        if api.content:
            expect(bubble.locator(".thinking")).not_to_have_attribute("open", "")
