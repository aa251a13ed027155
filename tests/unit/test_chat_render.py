"""Chat rendering of tool conversations: the model's template when it knows tools, else the
documented fallback."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from raydock.modelgen import cached_model_dir
from raydock.serve_apps import chat_render
from raydock.serve_apps.chat_render import SAMPLE_CONVERSATION, SAMPLE_TOOLS, ChatTemplateError

# a template in the style of Hugging Face's tool-aware ones: tools listed, calls and results
# shown, arguments read as an object
NATIVE_TEMPLATE = (
    "{%- if tools %}[tools:{% for t in tools %}{{ t.function.name }};{% endfor %}]{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.tool_calls %}<call>{% for c in m.tool_calls %}"
    "{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}</call>"
    "{%- elif m.role == 'tool' %}<result id={{ m.tool_call_id }}>{{ m.content }}</result>"
    "{%- else %}<{{ m.role }}>{{ m.content }}{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(cached_model_dir("tiny", 0))


def test_fallback_renders_a_tool_conversation_with_a_template_that_refuses_tools(tokenizer):
    with pytest.raises(Exception, match="Unsupported chat role tool"):
        tokenizer.apply_chat_template(SAMPLE_CONVERSATION, tokenize=False)
    text = chat_render.render(tokenizer, SAMPLE_CONVERSATION, SAMPLE_TOOLS)
    assert chat_render.TOOLS_PREAMBLE in text and '"name":"get_weather"' in text
    # the call as raydock's tool-call output spells it, then its result as a user turn
    call = '<|assistant|>\n{"name":"get_weather","arguments":{"city":"Paris"}}<|end|>'
    result = '<|user|>\nTool result (get_weather, call call_1): {"celsius": 21}<|end|>'
    assert call in text and result in text
    assert text.index(call) < text.index(result)
    assert text.endswith("<|assistant|>\n")


def test_fallback_merges_consecutive_tool_results_and_adds_a_system_message():
    messages = [
        {"role": "user", "content": "both"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "1"},
        {"role": "tool", "tool_call_id": "b", "content": "2"},
    ]
    out = chat_render.fallback_messages(copy.deepcopy(messages), SAMPLE_TOOLS)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith(chat_render.TOOLS_PREAMBLE)
    assert (
        out[2]["content"] == 'Checking.\n{"name":"f","arguments":{}}\n{"name":"g","arguments":{}}'
    )
    assert out[3]["content"] == "Tool result (f, call a): 1\nTool result (g, call b): 2"


def test_a_template_that_knows_tools_renders_them_itself(tokenizer):
    tok = copy.copy(tokenizer)
    tok.chat_template = NATIVE_TEMPLATE
    text = chat_render.render(tok, SAMPLE_CONVERSATION, SAMPLE_TOOLS)
    assert text.startswith("[tools:get_weather;]")
    assert "<call>get_weather(Paris)</call>" in text  # arguments handed over as an object
    assert '<result id=call_1>{"celsius": 21}</result>' in text
    assert chat_render.TOOLS_PREAMBLE not in text


def test_template_errors_and_a_missing_template_are_chat_template_errors(tokenizer):
    tok = copy.copy(tokenizer)
    tok.chat_template = "{{ raise_exception('no assistants here') }}"
    with pytest.raises(ChatTemplateError, match="no assistants here"):
        chat_render.render(tok, [{"role": "user", "content": "hi"}])
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        chat_render.render(tok, [{"role": "user", "content": "hi"}])


def test_a_template_refusing_system_messages_gets_them_in_the_first_user_turn(tokenizer):
    tok = copy.copy(tokenizer)
    tok.chat_template = (  # in the style of Gemma's
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    )
    text = chat_render.render(
        tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert text == "<user>Be brief.\n\nHi<assistant>"


# Qwen2.5's way: a system turn of its own when the first message is not "system"
QWEN_LIKE = (
    "{%- if messages[0].role != 'system' %}<system>You are Qwen.{% endif %}"
    "{%- for m in messages %}{% if m.role in ('system', 'user', 'assistant') %}"
    "<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}"
    "{%- if tool_calls is defined %}{% endif %}<assistant>"
)


@pytest.mark.parametrize("template", [NATIVE_TEMPLATE, QWEN_LIKE])
def test_a_developer_message_is_the_system_message_for_a_template_without_it(tokenizer, template):
    t = copy.copy(tokenizer)
    t.chat_template = template
    messages = [
        {"role": "developer", "content": "Always answer in French."},
        {"role": "user", "content": "hi"},
    ]
    text = chat_render.render(t, messages)
    assert "<system>Always answer in French." in text and "You are Qwen" not in text
    t.chat_template = template.replace("'assistant')", "'assistant', 'developer')")
    if t.chat_template != template:  # a template that knows the role gets it as sent
        assert "<developer>Always answer in French." in chat_render.render(t, messages)
