"""Qwen3-Coder's tool-call format served: a model whose chat template teaches
`<tool_call>` around `<function=NAME>` `<parameter=P>` value `</parameter>` ... `</function>`
calls its tools in that format, and the client gets ordinary OpenAI tool calls whose
arguments are JSON typed by the tool's schema, whole and streamed; the next turn goes back
through the template. One deployment of its own (an import and a deploy, about 20 s here)."""

from __future__ import annotations

import json

import jsonschema
from transformers import AutoTokenizer

from raydock.serve_apps import chat_render
from tests.e2e.test_structured import own_deployment
from tests.unit.test_native_tool_calls import qwen_like_model
from tests.unit.test_tool_format_xml import QWEN3_CODER_TEMPLATE

RECORD = {
    "type": "function",
    "function": {
        "name": "record_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "metric": {"type": "boolean"},
            },
            "required": ["city", "days", "metric"],
        },
    },
}
ASK = [{"role": "user", "content": "Record the weather in Paris for three days."}]


def _typed(call) -> dict:
    """The call's arguments: JSON valid for the tool, each value of its schema's type."""
    assert call.function.name == "record_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, RECORD["function"]["parameters"])
    assert isinstance(arguments["city"], str)
    assert type(arguments["days"]) is int and type(arguments["metric"]) is bool
    return arguments


def test_a_qwen3_coder_like_model_calls_tools_in_its_xml_format(platform, zips, tmp_path):
    """The opening tag's token is favoured: the random model would rarely pick it over a
    bare JSON call; the grammar holds what follows to the XML body."""
    folder = tmp_path / "qwen3-coder-like"
    tags = qwen_like_model(folder, QWEN3_CODER_TEMPLATE)
    with own_deployment(platform, zips, folder, "chat-qwen3-coder-like") as sdk:
        ask = {
            "model": "m",
            "tools": [RECORD],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "seed": 1,
            "max_tokens": 300,
            "logit_bias": {str(tags["<tool_call>"]): 100},
        }
        choice = sdk.chat.completions.create(messages=ASK, **ask, logprobs=True).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        arguments = _typed(call)
        # what the model wrote (its tokens' logprobs): the call in its own format
        written = "".join(t.token for t in choice.logprobs.content)
        assert "<function=record_weather>" in written and "</function>" in written, written
        assert f"<parameter=days>\n{arguments['days']}\n</parameter>" in written, written

        chunks = list(sdk.chat.completions.create(messages=ASK, **ask, stream=True))
        assert not any(c.choices and c.choices[0].delta.content for c in chunks)  # no markup
        deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
        assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].id
        _typed(deltas[0])
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        # the next turn: the call and its result go back; the template writes the call in
        # its own format again (the prompt is the template's, token for token)
        turn = [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"recorded": true}'},
        ]
        second = sdk.chat.completions.create(messages=turn, **ask)
        _typed(second.choices[0].message.tool_calls[0])
        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompt = chat_render.render(tokenizer, turn, [RECORD])
        assert f"<parameter=days>\n{arguments['days']}\n</parameter>" in prompt
        assert "<tool_response>\n" in prompt and chat_render.TOOLS_PREAMBLE not in prompt
        expected = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert second.usage.prompt_tokens == expected
