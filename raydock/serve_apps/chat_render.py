"""Chat messages to prompt text with the model's own chat template, tool conversations included.

A template that knows tools (its source reads `tool_calls`) renders OpenAI tool conversations
itself: the tool list, assistant messages carrying `tool_calls`, and `tool` results. For any
other template raydock renders them in a documented fallback the template can always show,
since it uses only the system, user and assistant roles:

- the tool list goes into the system message (one is added first when there is none):
  `TOOLS_PREAMBLE`, then the functions as JSON;
- an assistant message's calls become its text, each as the JSON raydock's tool-call output
  has: `{"name": "<function>", "arguments": {...}}`, one per line after any content;
- consecutive `tool` messages become one user message, a line
  `Tool result (<function>, call <id>): <content>` per result.

Some templates refuse a system message (Gemma's) or tool-call ids not in their model's own
format (Mistral's); when the template fails, raydock renders the fallback once more with the
system text at the head of the first user message, and refuses only if that fails too.

A template that teaches its model a native tool-call format (Qwen's and Hermes'
`<tool_call>\n{...}\n</tool_call>`, Qwen3-Coder's `<tool_call>` around an XML
`<function=...>` body: `tool_call_wrapper`) gets it accepted under every tool_choice
besides raydock's bare JSON call (`guided.grammars.with_native_calls`). Such a template
renders an assistant's calls itself, from their arguments as an object (`_native`).

A reasoning model's template may open the thinking block itself: its generation prompt ends in
`<think>\n` (Qwen3-Thinking-2507, QwQ, DeepSeek-R1), so the model's output starts inside the
thinking, without a `<think>` of its own (`opens_thinking`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from raydock.serve_apps.guided.grammars import (
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_WRAPPERS,
    TagTokens,
    ToolCallWrapper,
)

TOOLS_PREAMBLE = (
    "You can call these tools. To call one, answer with only a JSON object "
    '{"name": <the tool\'s name>, "arguments": <its arguments>}.'
)

#: A conversation every importable chat model must render (import validation uses it too).
SAMPLE_CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
    {"role": "assistant", "content": "It is 21 °C in Paris."},
    {"role": "user", "content": "Thanks!"},
]
SAMPLE_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


class ChatTemplateError(ValueError):
    """The model's chat template cannot render these messages (the reason is its own)."""


def template_source(tokenizer: Any, tools: bool = False) -> str | None:
    """The chat template's source; of named templates (Hermes-style), "tool_use" for a chat
    with tools (as Hugging Face picks it), else "default"."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = (tools and template.get("tool_use")) or template.get("default")
    return template if isinstance(template, str) else None


def tool_call_wrapper(tokenizer: Any) -> ToolCallWrapper | None:
    """The native tool-call wrapper the model's chat template teaches (its source holds the
    opening tag, e.g. `<tool_call>`, and the wrapper's other signs: Qwen3-Coder's
    `<function=` and `<parameter=` for its XML body), with the ids of the tokenizer's added
    tokens for its tags; None: the model is asked for bare JSON calls."""
    source = template_source(tokenizer, tools=True) or ""
    taught = [w for w in TOOL_CALL_WRAPPERS if w.taught_by(source)]
    wrapper = max(taught, key=lambda w: len(w.signs), default=None)  # the most specific
    if wrapper is None:
        return None
    added = _tag_tokens(tokenizer)
    return dataclasses.replace(
        wrapper, open_token=added.get(wrapper.open), close_token=added.get(wrapper.close)
    )


def tag_tokens(tokenizer: Any) -> TagTokens:
    """The ids of the vocabulary's own tokens for THINK_OPEN and THINK_CLOSE (Qwen3's,
    DeepSeek-R1's) and for the known wrappers' tags, where it has them, whatever wrapper the
    template teaches (none, too): a tools grammar names them wherever it takes the tags
    spelled out."""
    added = _tag_tokens(tokenizer)

    def ids(tags: list[str]) -> frozenset[int]:
        return frozenset(added[tag] for tag in tags if tag in added)

    return TagTokens(
        added.get(THINK_OPEN),
        added.get(THINK_CLOSE),
        call_opens=ids([w.open for w in TOOL_CALL_WRAPPERS]),
        call_closes=ids([w.close for w in TOOL_CALL_WRAPPERS]),
    )


def thinks(tokenizer: Any) -> bool:
    """Whether the model thinks: its vocabulary has THINK_OPEN or THINK_CLOSE (Qwen3's,
    DeepSeek-R1's), or its chat template's source holds THINK_OPEN (Qwen3's hybrid, which
    strips past thinking). Such a model may think before the call "required" or a named
    function asks for (`guided.grammars.with_native_calls`); any other is held to the call
    at once, as a block it opened without meaning to might never close. A prompt that
    `opens_thinking` starts inside a block whatever this says."""
    try:
        vocabulary = tokenizer.get_added_vocab()
    except Exception:  # a tokenizer without added tokens, or not a Hugging Face one
        vocabulary = {}
    source = template_source(tokenizer, tools=True) or ""
    return THINK_OPEN in source or any(tag in vocabulary for tag in (THINK_OPEN, THINK_CLOSE))


def _tag_tokens(tokenizer: Any) -> dict[str, int]:
    """The tokenizer's added tokens that a grammar may name as tags (text -> id)."""
    try:
        added = tokenizer.get_added_vocab()
    except Exception:  # a tokenizer without added tokens, or not a Hugging Face one
        return {}
    # a special token's text is skipped when the output is decoded: a tag the model wrote as
    # one would vanish from it, so such a tag is spelled out instead
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    return {text: i for text, i in added.items() if i not in special}


def opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt ends inside a thinking block its template opened (the
    generation prompt ends in `<think>` and whitespace): the model's output then starts inside
    the thinking and has no THINK_OPEN of its own. Only the end counts: a `<think>` a message
    mentions, or a block the template closes (`<think>\n\n</think>`), opens nothing."""
    return prompt.rstrip().endswith(THINK_OPEN)


def render(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> str:
    """The prompt text for `messages` (OpenAI chat messages) and `tools`, ending with the
    assistant's turn; raises ChatTemplateError with the template's reason."""
    source = template_source(tokenizer, tools=bool(tools))
    if source is None:
        raise ChatTemplateError("this model has no chat template; use /v1/completions")
    if "developer" not in source:  # OpenAI's newer name for system, which such a template
        # would drop (Qwen's renders its default system turn instead) or mislabel
        messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    if "tool_calls" in source:
        attempts = [([_native(m) for m in messages], {"tools": tools or None})]
    else:
        attempts = [(fallback_messages(messages, tools), {})]
    attempts.append((_system_in_first_user(fallback_messages(messages, tools)), {}))
    first_error: Exception | None = None
    for conversation, kwargs in attempts:
        try:
            return tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True, **kwargs
            )
        except Exception as exc:  # jinja2's TemplateError, or what the template's code raises
            first_error = first_error or exc
    raise ChatTemplateError(f"the model's chat template failed: {first_error}")


def _arguments(raw: Any) -> Any:
    """Hugging Face templates expect a call's arguments as an object, OpenAI sends a string."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def _native(message: dict[str, Any]) -> dict[str, Any]:
    if not message.get("tool_calls"):
        return message
    calls = [
        {**c, "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
        for c in message["tool_calls"]
    ]
    return {**message, "tool_calls": calls}


def _system_in_first_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    system = [m["content"] for m in messages if m["role"] in ("system", "developer")]
    rest = [m for m in messages if m["role"] not in ("system", "developer")]
    if system and rest and rest[0]["role"] == "user":
        rest[0] = {**rest[0], "content": "\n\n".join([*system, rest[0]["content"]])}
    elif system:
        rest.insert(0, {"role": "user", "content": "\n\n".join(system)})
    return rest


def fallback_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """The conversation in system/user/assistant messages only (see the module docstring)."""
    names = {
        c.get("id"): c["function"]["name"]
        for m in messages
        for c in m.get("tool_calls") or ()
        if isinstance(c.get("function"), dict)
    }
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            name = names.get(m.get("tool_call_id"), m.get("name") or "tool")
            line = f"Tool result ({name}, call {m.get('tool_call_id')}): {content}"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + line
            else:
                out.append({"role": "user", "content": line, "_tool_results": True})
            continue
        if role == "assistant" and m.get("tool_calls"):
            calls = [
                json.dumps(
                    {
                        "name": c["function"]["name"],
                        "arguments": _arguments(c["function"]["arguments"]),
                    },
                    separators=(",", ":"),
                )
                for c in m["tool_calls"]
            ]
            content = "\n".join([content, *calls] if content else calls)
        out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        listing = json.dumps([t.get("function", t) for t in tools], separators=(",", ":"))
        preamble = f"{TOOLS_PREAMBLE}\nTools: {listing}"
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{preamble}"}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out
