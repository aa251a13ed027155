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


# Qwen2.5-Instruct's chat template (tools part as published; Qwen3 and Hermes-style templates
# teach the same `<tool_call>` wrapper)
QWEN25_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}"
    "{%- endif %}"
    '{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.'
    "\\n\\nYou are provided with function signatures within <tools></tools> XML tags:"
    '\\n<tools>" }}'
    '{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}'
    '{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and '
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call>'
    '<|im_end|>\\n" }}'
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    '{%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}'
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == \"assistant\" %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}'
    "{{- '\", \"arguments\": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    '{%- elif message.role == "tool" %}'
    '{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}'
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    '{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}'
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3's hybrid template (its tools part as Qwen2.5's): thinking on by default, the model
# opens its own block; the generation prompt closes an empty one when thinking is turned off
QWEN3_TEMPLATE = QWEN25_TEMPLATE.replace(
    "{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    "{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is "
    "false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}",
)


def test_a_qwen_template_is_detected_with_its_tool_call_wrapper(tokenizer):
    tok = copy.copy(tokenizer)
    tok.chat_template = QWEN25_TEMPLATE
    text = chat_render.render(tok, SAMPLE_CONVERSATION, SAMPLE_TOOLS)  # natively: it knows tools
    # what the template teaches, and how it shows a past call: the wrapper raydock accepts
    assert "<tool_call>\n{" in text and chat_render.TOOLS_PREAMBLE not in text
    past = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert f"<tool_call>\n{past}\n</tool_call>" in text
    wrapper = chat_render.tool_call_wrapper(tok)
    assert (wrapper.open, wrapper.close) == ("<tool_call>", "</tool_call>")
    assert wrapper.open_token is None  # the tiny vocabulary has no token for the tag


def test_templates_without_a_wrapper_have_none(tokenizer):
    tok = copy.copy(tokenizer)
    assert chat_render.tool_call_wrapper(tok) is None  # raydock's generated models
    for template in (NATIVE_TEMPLATE, QWEN_LIKE, None, {"default": QWEN25_TEMPLATE}):
        tok.chat_template = template
        found = chat_render.tool_call_wrapper(tok)
        assert (found is not None) == isinstance(template, dict), template  # named: "default"


def test_named_templates_render_tools_with_their_tool_use_template(tokenizer):
    """Hermes-style tokenizers keep tools (and `<tool_call>`) in a "tool_use" template beside
    "default": a chat with tools renders with it, and its wrapper is the one taught."""
    tok = copy.copy(tokenizer)
    tok.chat_template = {"default": NATIVE_TEMPLATE, "tool_use": QWEN25_TEMPLATE}
    text = chat_render.render(tok, SAMPLE_CONVERSATION, SAMPLE_TOOLS)
    assert "<tool_call>\n{" in text and chat_render.TOOLS_PREAMBLE not in text
    assert chat_render.tool_call_wrapper(tok).open == "<tool_call>"
    plain = [m for m in SAMPLE_CONVERSATION if m["role"] in ("system", "user")][:2]
    assert "<tool_call>" not in chat_render.render(tok, plain)  # no tools: "default"


@pytest.mark.parametrize(
    ("generation_prompt", "opens"),
    [
        ("<|im_start|>assistant\n<think>\n", True),  # Qwen3-Thinking-2507, QwQ
        ("<|Assistant|><think>\n", True),  # DeepSeek-R1
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # Qwen3, thinking off
        ("<|im_start|>assistant\n", False),
    ],
)
def test_a_template_that_opens_the_thinking_is_told_from_its_rendered_prompt(
    tokenizer, generation_prompt, opens
):
    tok = copy.copy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        f"{{% if add_generation_prompt %}}{generation_prompt}{{% endif %}}"
    )
    # a message that ends mentioning the tag opens nothing: only the prompt's end counts
    messages = [{"role": "user", "content": "What does this tag do: <think>"}]
    prompt = chat_render.render(tok, messages)
    assert prompt.endswith(generation_prompt)
    assert chat_render.opens_thinking(prompt) == opens


def test_the_vocabularys_own_end_of_thinking_is_found(tokenizer):
    tok = copy.deepcopy(tokenizer)
    assert chat_render.tag_tokens(tok).think_close is None  # the tiny vocabulary spells it
    tok.add_tokens(["<think>", "</think>"])
    assert chat_render.tag_tokens(tok).think_close == tok.convert_tokens_to_ids("</think>")
    tok.add_special_tokens({"additional_special_tokens": ["</think>"]})
    assert chat_render.tag_tokens(tok).think_close is None  # decoding would drop it: spelled


def test_a_model_thinks_by_its_vocabulary_or_its_templates_source(tokenizer):
    """Qwen3's and DeepSeek-R1's vocabularies hold the thinking tags; Qwen3's hybrid template
    names `<think>` (it strips past thinking); Qwen2.5's and the tiny model's neither."""
    tok = copy.deepcopy(tokenizer)
    assert not chat_render.thinks(tok)
    tok.chat_template = QWEN25_TEMPLATE
    assert not chat_render.thinks(tok)
    tok.chat_template = QWEN3_TEMPLATE
    assert chat_render.thinks(tok)
    tok.chat_template = QWEN25_TEMPLATE
    tok.add_tokens(["</think>"])
    assert chat_render.thinks(tok)
