"""Tool calls in the chat template's own wrapper (Qwen's and Hermes' `<tool_call>` ...
`</tool_call>`) under `tool_choice: "auto"`, without Ray: the request's constraint, the
grammar the engine replica makes of it for its template, and the OpenAI answer the service
makes of the output, whole and streamed."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import jsonschema
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from raydock.serve_apps import chat_render, protocol, structured
from raydock.serve_apps.engine_app import native_tool_grammar
from raydock.serve_apps.engines.base import StepEvent, TokenizerPrompts
from raydock.serve_apps.openai_service import _collect, _sse, chat_events, native_tool_calls
from tests.unit.test_chat_render import QWEN3_TEMPLATE, QWEN25_TEMPLATE
from tests.unit.test_guided import WEATHER, _accepts, decoder

TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
PARIS = '{"name":"get_weather","arguments":{"city":"Paris"}}'
NOW = '{"name":"get_time","arguments":{}}'
NAMED = {"type": "function", "function": {"name": "get_weather"}}
# as Qwen writes them (compact JSON: the grammar's, as for a bare call)
TWO_CALLS = f"<tool_call>\n{PARIS}\n</tool_call>\n<tool_call>\n{NOW}\n</tool_call>"


@pytest.fixture(scope="module")
def qwen_wrapper():
    tok = copy.copy(decoder()[0])
    tok.chat_template = QWEN25_TEMPLATE
    return chat_render.tool_call_wrapper(tok)


def _payload(tool_choice="auto", tools=(WEATHER, TIME), **request) -> dict:
    """What the API replica sends the engine replica for a chat request with `tools` (by
    default the two)."""
    req = protocol.ChatRequest(
        messages=[{"role": "user", "content": "hi"}],
        tools=list(tools),
        tool_choice=tool_choice,
        **request,
    )
    constraint = structured.constraint_for(None, req.tools, req.tool_choice)
    return {"grammar": constraint.grammar, "native_tool_calls": native_tool_calls(constraint, req)}


def test_the_engine_takes_wrapped_calls_under_every_tool_choice_one_for_a_named_function():
    assert _payload()["native_tool_calls"] == structured.MAX_NATIVE_CALLS
    assert _payload(parallel_tool_calls=False)["native_tool_calls"] == 1
    assert _payload("required")["native_tool_calls"] == structured.MAX_NATIVE_CALLS
    assert _payload("required", parallel_tool_calls=False)["native_tool_calls"] == 1
    assert _payload(NAMED)["native_tool_calls"] == 1


def test_the_engine_replica_adds_its_templates_wrapper_to_auto_grammars(qwen_wrapper):
    auto = _payload()
    assert native_tool_grammar(auto, None) == auto  # a template without a wrapper
    grammar = native_tool_grammar(auto, qwen_wrapper)["grammar"]
    for text in (TWO_CALLS, PARIS, "It is sunny."):
        assert _accepts(grammar, text), text
    bad_city = '<tool_call>{"name":"get_weather","arguments":{"city":5}}</tool_call>'
    for text in (bad_city, "<tool_call>", f"{TWO_CALLS} and text"):
        assert not _accepts(grammar, text), text
    assert not _accepts(auto["grammar"], TWO_CALLS)  # as sent, before the replica adds it
    one = native_tool_grammar(_payload(parallel_tool_calls=False), qwen_wrapper)["grammar"]
    assert _accepts(one, TWO_CALLS.split("\n<tool_call>")[0])
    assert not _accepts(one, TWO_CALLS)
    # a grammar of another shape (an API replica of another version): kept as it came
    other = auto | {"grammar": "start: %json {}"}
    assert native_tool_grammar(other, qwen_wrapper) == other


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (PARIS, ["get_weather"]),
        (TWO_CALLS, ["get_weather", "get_time"]),
        (f"<tool_call>{NOW}</tool_call>\n", ["get_time"]),
        # the JSON's end decides, not the next close tag inside a string
        (
            '<tool_call>{"name":"f","arguments":{"s":"</tool_call>"}}</tool_call>',
            ["f"],
        ),
        ("It is sunny.", None),
        (f"Calling: <tool_call>{NOW}</tool_call>", None),  # a mention is text
        (f"<tool_call>{NOW}", None),  # not closed
        (f"<tool_call>{NOW}</tool_call> done", None),
        ("<tool_call>not json</tool_call>", None),
    ],
)
def test_output_as_tool_calls(text, names):
    calls = structured.as_tool_calls(text)
    assert (None if calls is None else [c["function"]["name"] for c in calls]) == names


def _events(text: str, size: int = 6) -> list[list[dict]]:
    parts = [text[i : i + size] for i in range(0, len(text), size)]
    out = []
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        out.append(
            [
                {
                    "index": 0,
                    "text": part,
                    "logprobs": [],
                    "finish_reason": "stop" if last else None,
                    "prompt_tokens": 12 if last else 0,
                    "completion_tokens": len(parts) if last else 0,
                }
            ]
        )
    return out


async def _source(batches):
    for b in batches:
        yield b


def test_wrapped_calls_answer_as_openai_tool_calls():
    fmt = protocol.Formatter("chat", "m")
    events = chat_events(_source(_events(TWO_CALLS)), "tool_calls")
    body = asyncio.run(_collect(fmt, events, 1))
    reply = ChatCompletion.model_validate(body)
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert len({c.id for c in calls}) == 2
    assert "index" not in body["choices"][0]["message"]["tool_calls"][0]
    assert reply.usage.completion_tokens == len(_events(TWO_CALLS))


def _stream(text: str) -> list[ChatCompletionChunk]:
    async def chunks() -> list[str]:
        fmt = protocol.Formatter("chat", "m")
        events = chat_events(_source(_events(text)), "tool_calls")
        return [line async for line in _sse(fmt, None, events, True, "req-1")]

    lines = "".join(asyncio.run(chunks())).split("\n\n")
    data = [line.removeprefix("data: ") for line in lines if line]
    assert data[-1] == "[DONE]"
    return [ChatCompletionChunk.model_validate_json(d) for d in data[:-1]]


def test_wrapped_calls_stream_as_openai_tool_call_deltas():
    chunks = _stream(TWO_CALLS)
    assert not any(c.choices and c.choices[0].delta.content for c in chunks)  # no wrapper text
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "get_weather"), (1, "get_time")]
    assert chunks[0].choices[0].delta.role == "assistant"
    state = ChatCompletionStreamState()
    events = [event for chunk in chunks for event in state.handle_chunk(chunk)]
    # the SDK's stream helper ends each call, the last too, with its whole arguments
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.index, e.name, e.arguments) for e in done] == [
        (0, "get_weather", '{"city":"Paris"}'),
        (1, "get_time", "{}"),
    ]
    final = state.get_final_completion().choices[0]  # as the SDK puts the stream together
    assert final.finish_reason == "tool_calls"
    assert [c.function.arguments for c in final.message.tool_calls] == [
        '{"city":"Paris"}',
        "{}",
    ]


def test_text_mentioning_the_wrapper_streams_as_content():
    text = "I could call <tool_call> for that."
    chunks = _stream(text)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


class _Engine:
    """An engine that records the grammar the replica checks and decodes with."""

    max_batch_size, max_context, longest_token_chars, vocab_size = 2, 4096, 4, 256
    unsupported_params = frozenset()

    def __init__(self) -> None:
        self.grammars: list[str] = []

    def rendered_chat(self, messages, tools=None) -> tuple[str, list[int]]:
        return "<user>hi<assistant>", [1, 2, 3]

    async def check_grammar(self, grammar: str) -> None:
        self.grammars.append(grammar)

    async def generate(self, ids, params, regex=None, grammar=None, **options):
        self.grammars.append(grammar)
        yield [StepEvent("hi", [5], [], "stop", len(ids), 1)]


def _replica(engine, wrapper):
    """EngineServer's request path on a plain object (no Serve), with this engine and the
    wrapper its `__init__` would have found in the model's template."""
    from concurrent.futures import ThreadPoolExecutor

    from raydock.serve_apps.engine_app import EngineServer

    cls = EngineServer.func_or_class
    methods = ("generate", "_generate", "_prompt", "_check_params", "_check_constraint")
    server = type("Replica", (), {name: getattr(cls, name) for name in methods})()
    server.engine, server.queue_limit, server.requests, server.taken = engine, 1, 0, 0
    server.tool_call_wrapper = wrapper
    server.tag_tokens = chat_render.tag_tokens(getattr(engine, "tokenizer", None))
    server.thinks = chat_render.thinks(getattr(engine, "tokenizer", None))
    server.tokenizing = ThreadPoolExecutor(1)
    return server


async def _steps(server, request: dict):
    """The replica's step events (what the service reads after metering took its own)."""
    async for batch in server.generate(request):
        if steps := [ev for ev in batch if "index" in ev]:
            yield steps


@pytest.mark.parametrize("templated", [True, False])
def test_the_replica_checks_and_decodes_with_its_templates_grammar(qwen_wrapper, templated):
    server = _replica(_Engine(), qwen_wrapper if templated else None)
    request = {
        "messages": [{"role": "user", "content": "hi"}],
        "params": {"max_tokens": 4},
        **_payload(),
    }

    async def run() -> None:
        async for _ in _steps(server, request):
            pass

    asyncio.run(run())
    server.tokenizing.shutdown()
    checked, decoded = server.engine.grammars
    assert checked == decoded
    assert (checked != request["grammar"]) == templated
    assert _accepts(checked, TWO_CALLS) == templated


def qwen_like_model(
    root: Path,
    template: str = QWEN25_TEMPLATE,
    tags: tuple[str, ...] = ("<tool_call>", "</tool_call>"),
) -> dict[str, int]:
    """The tiny model at `root` with a vocabulary and template in Qwen's way: `tags` are
    added, non-special tokens (as many rare tokens of the tiny vocabulary give up their ids:
    the embedding has no row to spare) and the `template` teaches them. Returns the tags'
    token ids."""
    import shutil

    from raydock.modelgen import cached_model_dir

    shutil.copytree(cached_model_dir("tiny"), root)
    spec = json.loads((root / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tags = dict(zip(tags, sorted(vocab.values())[-len(tags) :], strict=True))
    freed = {token for token, i in vocab.items() if i in tags.values()}
    spec["model"]["vocab"] = {t: i for t, i in vocab.items() if t not in freed}

    def result(merge) -> str:  # ["a", "b"] or "a b": what the merge makes
        return "".join(merge) if isinstance(merge, list) else merge.replace(" ", "")

    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if result(m) not in freed]
    spec["added_tokens"] += [
        {"id": i, "content": tag, "single_word": False, "lstrip": False, "rstrip": False}
        | {"normalized": False, "special": False}
        for tag, i in tags.items()
    ]
    (root / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((root / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    (root / "chat_template.jinja").write_text(template)
    return tags


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("qwen-like") / "model"
    return root, qwen_like_model(root)


def test_a_qwen_like_model_answers_auto_with_calls_in_its_own_wrapper(qwen_like):
    """The whole path but HTTP and Ray: the engine replica finds the wrapper and its tokens in
    the model's template and vocabulary, the engine decodes under its grammar (the opening
    tag's token favoured: the random model would rarely pick it), the service answers."""
    from raydock.serve_apps.engines.transformers_engine import TransformersEngine

    root, tags = qwen_like
    engine = TransformersEngine(str(root), num_threads=1, max_batch_size=2)
    wrapper = chat_render.tool_call_wrapper(engine.tokenizer)
    assert (wrapper.open_token, wrapper.close_token) == tuple(tags.values())
    server = _replica(engine, wrapper)
    request = {
        "messages": [{"role": "user", "content": "The weather in Paris, and the time?"}],
        "tools": [WEATHER, TIME],
        "params": {
            "max_tokens": 300,
            "seed": 3,
            "logit_bias": ((tags["<tool_call>"], 100.0),),
        },
        **_payload(),
    }
    request["native_tool_calls"] = 2
    ids, opens_thinking = asyncio.run(server._prompt(request))
    prompt = engine.tokenizer.decode(ids)
    assert not opens_thinking
    assert "<tool_call>" in prompt and chat_render.TOOLS_PREAMBLE not in prompt  # its own

    async def answer() -> dict:
        events = chat_events(_steps(server, request), "tool_calls")
        return await _collect(protocol.Formatter("chat", "m"), events, 1)

    reply = ChatCompletion.model_validate(asyncio.run(answer()))
    server.tokenizing.shutdown()
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert len(calls) == 2 and len({c.id for c in calls}) == 2  # the bias asks for more: 2 max
    for call in calls:
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


# ---------------------------------------------------------------- what a client sees of replies
# that open with whitespace or thinking, are cut by max_tokens, or carry logprobs


def _answer(events: list[list[dict]]) -> ChatCompletion:
    fmt = protocol.Formatter("chat", "m")
    body = asyncio.run(_collect(fmt, chat_events(_source(events), "tool_calls"), 1))
    return ChatCompletion.model_validate(body)


def _streamed(events: list[list[dict]]) -> list[ChatCompletionChunk]:
    async def chunks() -> list[str]:
        fmt = protocol.Formatter("chat", "m")
        out = chat_events(_source(events), "tool_calls")
        return [line async for line in _sse(fmt, None, out, True, "req-1")]

    data = [d.removeprefix("data: ") for d in "".join(asyncio.run(chunks())).split("\n\n") if d]
    return [ChatCompletionChunk.model_validate_json(d) for d in data[:-1]]


def _as_sdk_assembles(chunks: list[ChatCompletionChunk]):
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    # its snapshot: the final completion refuses a reply cut by the length limit
    return state.current_completion_snapshot.choices[0]


def _cut(events: list[list[dict]]) -> list[list[dict]]:
    """The same events ended by max_tokens instead."""
    return events[:-1] + [[events[-1][0] | {"finish_reason": "length"}]]


THINKING = "<think>\nThe user asks for Paris; get_weather, then get_time.\n</think>"
INNER = THINKING.removeprefix("<think>").removesuffix("</think>")  # the reasoning a client reads


@pytest.mark.parametrize(
    "text",
    [f"\n{TWO_CALLS}", f"\n\n{TWO_CALLS}\n", f" {TWO_CALLS}", f"{THINKING}\n\n{TWO_CALLS}"],
    ids=["newline", "newlines", "space", "thinking"],
)
def test_calls_after_whitespace_or_thinking_answer_as_tool_calls(text):
    reasoning = INNER if text.startswith(THINKING) else None  # the thinking is reasoning
    whole = _answer(_events(text)).choices[0]
    streamed = _as_sdk_assembles(_streamed(_events(text)))
    for choice in (whole, streamed):
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert getattr(choice.message, "reasoning", None) == reasoning
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather", "get_time"]
        assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_text_after_thinking_is_the_content():
    text = f"{THINKING}\n\nIt is sunny in Paris."
    for choice in (_answer(_events(text)).choices[0], _as_sdk_assembles(_streamed(_events(text)))):
        assert choice.finish_reason == "stop"
        assert choice.message.content == "\n\nIt is sunny in Paris."
        assert choice.message.reasoning == INNER
        assert not choice.message.tool_calls


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        ('<tool_call>\n{"name":"get_w', []),  # its name not whole: no call (OpenAI sends none)
        ('<tool_call>\n{"name":"get_weather"', [("get_weather", "")]),
        (f"<tool_call>\n{PARIS[:-6]}", [("get_weather", '{"city":"Pa')]),
        # the second call cut before its name began: the first alone
        (TWO_CALLS[: TWO_CALLS.index("get_time")], [("get_weather", '{"city":"Paris"}')]),
        (f"{THINKING}\n<tool_call>{NOW[:-2]}", [("get_time", "{")]),
        (PARIS[:-5], [("get_weather", '{"city":"Par')]),  # a bare call
        ("<tool_call>\n", []),
    ],
    ids=[
        "in-name",
        "after-name",
        "in-arguments",
        "before-second",
        "after-thinking",
        "bare",
        "in-tag",
    ],
)
def test_a_call_cut_by_max_tokens_is_a_tool_call_so_far_with_length(text, calls):
    """As OpenAI: finish_reason "length", the call with the arguments generated so far; no
    wrapper tag anywhere, whole or streamed."""
    events = _cut(_events(text))
    chunks = _streamed(events)
    assert not any("tool_call>" in (c.choices[0].delta.content or "") for c in chunks if c.choices)
    for choice in (_answer(events).choices[0], _as_sdk_assembles(chunks)):
        assert choice.finish_reason == "length"
        assert (choice.message.content or None) is None
        assert getattr(choice.message, "reasoning", None) == (INNER if THINKING in text else None)
        got = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]
        assert got == calls


def _scored(text: str, size: int = 6) -> list[list[dict]]:
    """Events that carry their tokens' logprobs; the last, the end of the reply, has none
    (an EOS token's text is empty: as the engines report it)."""
    events = [
        [ev | {"logprobs": [(ev["text"], -0.25, [(ev["text"], -0.25)])]} for ev in batch]
        for batch in _events(text, size)
    ]
    end = {"text": "", "logprobs": [], "finish_reason": "stop"}
    last = events[-1][0]
    events[-1] = [last | {"finish_reason": None}]
    return events + [[last | end]]


@pytest.mark.parametrize("text", ["It is sunny.", f"{THINKING}\n\nIt is sunny."])
def test_streamed_chunks_without_tokens_carry_null_logprobs(text):
    """OpenAI clients read `logprobs.content[0]` of a chunk that has logprobs: a chunk with no
    token of its own (the end of the reply; the reply's part of an event the thinking ends
    in) carries `logprobs: null`, never `{"content": []}`."""
    chunks = [c for c in _streamed(_scored(text)) if c.choices]
    for chunk in chunks:
        logprobs = chunk.choices[0].logprobs
        assert logprobs is None or logprobs.content[0].token, chunk
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].logprobs is None
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text.removeprefix(THINKING)
    assert "".join(getattr(c.choices[0].delta, "reasoning", "") for c in chunks) == (
        INNER if THINKING in text else ""
    )
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices[0].logprobs) == len(
        _events(text)
    )


# ------------------------------------------------ templates that open the thinking themselves
# Qwen3-Thinking-2507's and QwQ's template (Qwen's tools and `<tool_call>`), and DeepSeek-R1's
# way (its own call format, which raydock does not know: bare JSON calls), each ending the
# generation prompt in `<think>\n`: the model's reply starts inside the thinking.

QWEN3_THINKING_TEMPLATE = QWEN25_TEMPLATE.replace(
    "'<|im_start|>assistant\\n' }}", "'<|im_start|>assistant\\n<think>\\n' }}"
)
R1_TEMPLATE = (
    "{%- for m in messages %}{% if m.role == 'system' %}{{ m.content }}"
    "{%- elif m.role == 'user' %}<|User|>{{ m.content }}"
    "{%- else %}<|Assistant|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"
)
# DeepSeek-R1-0528's way: the model opens its thinking itself, with its vocabulary's `<think>`
# token, and its template teaches no `<tool_call>` (raydock asks for bare JSON calls)
R1_0528_TEMPLATE = R1_TEMPLATE.replace(
    "<|Assistant|><think>\n{% endif %}", "<|Assistant|>{% endif %}"
)
# what the model writes after the prompt's `<think>\n`: its thinking, the tag that ends it
THOUGHT = "The user asks for Paris: get_weather, then get_time.\n</think>"


def _thought(written: str | None) -> str | None:
    """The reasoning a client reads of a thinking block as the model wrote it: no tags."""
    if written is None:
        return None
    return written.removeprefix("<think>").removesuffix("</think>") or None


class _Scripted(TokenizerPrompts):
    """An engine with a real tokenizer and chat template (the engines' own prompt path) whose
    model writes `reply`, token by token, under the grammar the replica sends it, as
    llguidance enforces it: a token the grammar refuses fails the test, and so does an end the
    grammar does not allow."""

    max_batch_size, max_context = 2, 4096
    unsupported_params = frozenset()

    def __init__(self, tokenizer, reply: str) -> None:
        from raydock.serve_apps.guided import GuidedDecoder

        self.tokenizer, self.reply = tokenizer, reply
        self.guided = GuidedDecoder(tokenizer, {tokenizer.eos_token_id}, len(tokenizer))

    async def check_grammar(self, grammar: str) -> None:
        self._matcher(grammar)

    def _matcher(self, grammar: str):
        from raydock.serve_apps.guided import grammar_of

        return self.guided.compile_sync(grammar_of("grammar", grammar)).deep_copy()

    async def generate(self, ids, params, regex=None, grammar=None, **options):
        matcher = self._matcher(grammar)
        tokens = self.tokenizer.encode(self.reply, add_special_tokens=False)
        for k, token in enumerate(tokens):
            written = self.tokenizer.decode(tokens[: k + 1])
            assert matcher.consume_tokens([token]), f"the grammar refuses {written!r}"
            # as the engines decode: special tokens skipped, added tags kept
            text = self.tokenizer.decode([token], skip_special_tokens=True)
            yield [StepEvent(text, [token], [], None, len(ids), k + 1)]
        assert matcher.is_accepting(), f"the grammar does not let {self.reply!r} end"
        yield [StepEvent("", [], [], "stop", len(ids), len(tokens) + 1)]


def _tokenizer(template: str, tags_are_tokens: bool):
    """The tiny model's tokenizer with `template`; with `tags_are_tokens`, `<think>`,
    `</think>` and the call tags added as the vocabulary's own (non-special) tokens, as
    Qwen3's and DeepSeek-R1's vocabularies hold them."""
    tok = copy.deepcopy(decoder()[0])
    tok.chat_template = template
    if tags_are_tokens:
        tok.add_tokens(["<think>", "</think>", "<tool_call>", "</tool_call>"])
    return tok


def _served(
    tok, reply: str, tags_in_content: bool = False, tool_choice: str | dict = "auto"
) -> tuple[list, object, object]:
    """The replica's events (less metering's), and the choice a client gets for them whole
    and streamed (as the OpenAI SDK puts a stream together), for a chat with two tools under
    `tool_choice` to a model that writes `reply` (no chunk shows a call tag, unless
    `tags_in_content`: the text mentions them)."""
    server = _replica(_Scripted(tok, reply), chat_render.tool_call_wrapper(tok))
    request = {
        "messages": [{"role": "user", "content": "The weather in Paris, and the time?"}],
        "tools": [WEATHER, TIME],
        "params": {"max_tokens": 300},
        **_payload(tool_choice),
    }
    finish = "stop" if isinstance(tool_choice, dict) else "tool_calls"  # as the service's

    async def run() -> tuple[list, dict, list[str]]:
        fmt = protocol.Formatter("chat", "m")
        steps = [ev async for batch in _steps(server, request) for ev in batch]
        whole = await _collect(fmt, chat_events(_steps(server, request), finish), 1)
        events = chat_events(_steps(server, request), finish)
        lines = [line async for line in _sse(fmt, None, events, True, "req-1")]
        return steps, whole, lines

    try:
        steps, whole, lines = asyncio.run(run())
    finally:
        server.tokenizing.shutdown()
    data = [d.removeprefix("data: ") for d in "".join(lines).split("\n\n") if d]
    assert data[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(d) for d in data[:-1]]
    shown = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert tags_in_content or "tool_call>" not in shown
    streamed = _as_sdk_assembles(chunks)
    return steps, ChatCompletion.model_validate(whole).choices[0], streamed


@pytest.mark.parametrize("tags_are_tokens", [False, True], ids=["spelled", "tokens"])
@pytest.mark.parametrize(
    ("template", "calls"),
    [(QWEN3_THINKING_TEMPLATE, TWO_CALLS), (R1_TEMPLATE, PARIS)],
    ids=["qwen3-thinking", "r1"],
)
def test_calls_after_thinking_the_template_opened_answer_as_tool_calls(
    template, calls, tags_are_tokens
):
    """The prompt ends in `<think>\\n`, so the model writes no `<think>`: its thinking, then
    `</think>`, then its calls. The client gets the thinking as written as the content (no
    tag invented) and the calls as tool_calls, whole and streamed."""
    tok = _tokenizer(template, tags_are_tokens)
    rendered = chat_render.render(tok, [{"role": "user", "content": "hi"}], [WEATHER, TIME])
    assert rendered.endswith("<think>\n")
    end_tag = tok.convert_tokens_to_ids("</think>")
    assert (end_tag in tok.encode(THOUGHT, add_special_tokens=False)) == tags_are_tokens
    steps, whole, streamed = _served(tok, f"{THOUGHT}\n\n{calls}")
    assert "".join(ev["text"] for ev in steps) == f"{THOUGHT}\n\n{calls}"
    names = ["get_weather", "get_time"] if calls == TWO_CALLS else ["get_weather"]
    for choice in (whole, streamed):
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None and choice.message.reasoning == _thought(THOUGHT)
        assert [c.function.name for c in choice.message.tool_calls] == names
        assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris"}


@pytest.mark.parametrize("template", [QWEN3_THINKING_TEMPLATE, R1_TEMPLATE])
def test_text_after_thinking_the_template_opened_is_the_content(template):
    reply = f"{THOUGHT}\n\nIt is sunny in Paris."
    _, whole, streamed = _served(_tokenizer(template, False), reply)
    for choice in (whole, streamed):
        assert (
            choice.finish_reason == "stop" and choice.message.content == "\n\nIt is sunny in Paris."
        )
        assert choice.message.reasoning == _thought(THOUGHT) and not choice.message.tool_calls


def test_the_thinking_the_template_opened_must_end_before_a_call():
    """The grammar starts inside the thinking: a call there is thinking text, so the model
    cannot end (the scripted model's end is refused), nor call a tool that is not declared
    after it."""
    tok = _tokenizer(QWEN3_THINKING_TEMPLATE, False)
    with pytest.raises(AssertionError, match="does not let"):
        _served(tok, TWO_CALLS)
    other = '<tool_call>\n{"name":"other","arguments":{}}\n</tool_call>'
    with pytest.raises(AssertionError, match="refuses"):
        _served(tok, f"{THOUGHT}\n\n{other}")


@pytest.mark.parametrize(
    ("reply", "reasoning"),
    [
        # `</think>` in a call's arguments is no end of thinking where none began
        ('<tool_call>\n{"name":"get_weather","arguments":{"city":"</think>"}}\n</tool_call>', None),
        (f"<think>\n{THOUGHT}\n\n{TWO_CALLS}", _thought(f"<think>\n{THOUGHT}")),  # its own
    ],
    ids=["think-tag-in-arguments", "own-thinking"],
)
def test_a_template_that_opens_no_thinking_answers_as_before(reply, reasoning):
    steps, whole, streamed = _served(_tokenizer(QWEN25_TEMPLATE, False), reply)
    assert not any(structured.IN_THINKING in ev for ev in steps)
    for choice in (whole, streamed):
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert getattr(choice.message, "reasoning", None) == reasoning
        assert choice.message.tool_calls[0].function.name == "get_weather"
    if reasoning is None:
        (call,) = whole.message.tool_calls
        assert json.loads(call.function.arguments) == {"city": "</think>"}


@pytest.mark.parametrize("tags_are_tokens", [False, True], ids=["spelled", "tokens"])
@pytest.mark.parametrize(
    ("template", "tool_choice", "calls", "names"),
    [
        (QWEN3_THINKING_TEMPLATE, "required", TWO_CALLS, ["get_weather", "get_time"]),
        (QWEN3_THINKING_TEMPLATE, NAMED, TWO_CALLS.split("\n<tool_call>")[0], ["get_weather"]),
        (R1_TEMPLATE, "required", NOW, ["get_time"]),
        (R1_TEMPLATE, NAMED, PARIS, ["get_weather"]),
    ],
    ids=["qwen3-thinking-required", "qwen3-thinking-named", "r1-required", "r1-named"],
)
def test_required_and_named_calls_come_after_thinking_the_template_opened(
    template, tool_choice, calls, names, tags_are_tokens
):
    """The prompt ends in `<think>\\n`: the model thinks freely, ends its thinking, then must
    call (required: one or more calls of the tools; named: that function). The client gets
    the thinking as the content, as under auto, and the calls as tool_calls, whole and
    streamed; finish_reason "tool_calls", or "stop" for a named function (as OpenAI)."""
    tok = _tokenizer(template, tags_are_tokens)
    steps, whole, streamed = _served(tok, f"{THOUGHT}\n\n{calls}", tool_choice=tool_choice)
    assert all(ev.get(structured.IN_THINKING) for ev in steps)
    for choice in (whole, streamed):
        assert choice.finish_reason == ("stop" if tool_choice == NAMED else "tool_calls")
        assert choice.message.content is None and choice.message.reasoning == _thought(THOUGHT)
        assert [c.function.name for c in choice.message.tool_calls] == names


def test_a_qwen3_thinking_like_model_ends_its_thinking_then_calls(tmp_path):
    """The whole path but HTTP and Ray, on the tiny model with Qwen3-Thinking's template and
    tag tokens: under "required" and a named function the engine decodes the thinking (its
    end tag's token favoured: the random model would rarely pick it), then calls."""
    from raydock.serve_apps.engines.transformers_engine import TransformersEngine

    tags = qwen_like_model(
        tmp_path / "model",
        QWEN3_THINKING_TEMPLATE,
        ("<think>", "</think>", "<tool_call>", "</tool_call>"),
    )
    engine = TransformersEngine(str(tmp_path / "model"), num_threads=1, max_batch_size=2)
    server = _replica(engine, chat_render.tool_call_wrapper(engine.tokenizer))

    async def answer(tool_choice: str | dict, finish: str) -> dict:
        request = {
            "messages": [{"role": "user", "content": "The weather in Paris, and the time?"}],
            "tools": [WEATHER, TIME],
            "params": {"max_tokens": 300, "seed": 3, "logit_bias": ((tags["</think>"], 100.0),)},
            **_payload(tool_choice),
        }
        events = chat_events(_steps(server, request), finish)
        return await _collect(protocol.Formatter("chat", "m"), events, 1)

    for tool_choice, names, finish in (
        ("required", {"get_weather", "get_time"}, "tool_calls"),
        (NAMED, {"get_weather"}, "stop"),
    ):
        (choice,) = ChatCompletion.model_validate(asyncio.run(answer(tool_choice, finish))).choices
        # the (empty) thinking: no reasoning, no content
        assert choice.finish_reason == finish and choice.message.content is None
        assert choice.message.reasoning is None
        calls = choice.message.tool_calls
        assert calls and {c.function.name for c in calls} <= names
    server.tokenizing.shutdown()


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_required_and_named_allow_no_call_inside_the_thinking_nor_text_after_it(tool_choice):
    tok = _tokenizer(QWEN3_THINKING_TEMPLATE, True)
    with pytest.raises(AssertionError, match="does not let"):  # a call in the thinking
        _served(tok, TWO_CALLS.split("\n<tool_call>")[0], tool_choice=tool_choice)
    with pytest.raises(AssertionError, match="refuses"):
        _served(tok, f"{THOUGHT}\n\nIt is sunny.", tool_choice=tool_choice)
    with pytest.raises(AssertionError, match="refuses"):  # named: that function only
        _served(tok, f"{THOUGHT}\n\n<tool_call>\n{NOW}\n</tool_call>", tool_choice=NAMED)


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
@pytest.mark.parametrize(
    ("template", "tags_are_tokens", "calls"),
    [
        (QWEN25_TEMPLATE, True, TWO_CALLS),  # Qwen3's vocabulary holds `<think>`
        (QWEN3_TEMPLATE, False, TWO_CALLS),  # Qwen3's hybrid template names it
        (R1_0528_TEMPLATE, True, PARIS),
    ],
    ids=["qwen3-vocabulary", "qwen3-template", "r1-0528"],
)
def test_required_and_named_take_a_thinking_block_a_thinking_model_opens_itself(
    template, tags_are_tokens, calls, tool_choice
):
    """A template that opens no thinking (Qwen3's hybrid, DeepSeek-R1-0528's) of a model that
    thinks: the model may open a block of its own before the call, as under auto; it stays
    the content."""
    calls = calls.split("\n<tool_call>")[0] if tool_choice == NAMED else calls
    tok = _tokenizer(template, tags_are_tokens)
    steps, whole, streamed = _served(tok, f"<think>\n{THOUGHT}\n\n{calls}", tool_choice=tool_choice)
    assert not any(structured.IN_THINKING in ev for ev in steps)
    for choice in (whole, streamed):
        assert choice.message.content is None
        assert choice.message.reasoning == _thought(f"<think>\n{THOUGHT}")
        assert choice.message.tool_calls[0].function.name == "get_weather"
        assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris"}
    _, whole, _ = _served(tok, calls, tool_choice=tool_choice)  # or none: the call at once
    assert whole.message.content is None and whole.message.tool_calls


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
@pytest.mark.parametrize(
    ("template", "calls"),
    [(QWEN25_TEMPLATE, TWO_CALLS), (R1_0528_TEMPLATE, PARIS)],
    ids=["qwen25", "no-wrapper"],
)
def test_required_and_named_call_at_once_on_a_model_that_does_not_think(
    template, calls, tool_choice
):
    """Neither its vocabulary nor its template knows `<think>`: the reply is the call, from
    its first token; a thinking block is refused as any other text."""
    calls = calls.split("\n<tool_call>")[0] if tool_choice == NAMED else calls
    tok = _tokenizer(template, False)
    _, whole, _ = _served(tok, calls, tool_choice=tool_choice)
    assert whole.message.content is None and whole.message.tool_calls
    with pytest.raises(AssertionError, match="the grammar refuses '<"):
        _served(tok, f"<think>\n{THOUGHT}\n\n{calls}", tool_choice=tool_choice)


def test_required_on_a_model_that_does_not_think_calls_even_when_pushed_to_write_text():
    """The whole path but HTTP and Ray, on the tiny model (no thinking in its vocabulary nor
    its template) with its `<` favoured: a reply opening with `<` could only be a thinking
    block, which would never end. "required" still gets its call, finish_reason
    "tool_calls"."""
    from raydock.modelgen import cached_model_dir
    from raydock.serve_apps.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(str(cached_model_dir("tiny")), num_threads=1, max_batch_size=1)
    assert not chat_render.thinks(engine.tokenizer)
    server = _replica(engine, chat_render.tool_call_wrapper(engine.tokenizer))
    less_than = engine.tokenizer.convert_tokens_to_ids("<")
    # a function without parameters: its one call leaves the model no text, no `<` fits in
    clock = {"type": "function", "function": {"name": "get_time"}}
    request = {
        "messages": [{"role": "user", "content": "What time is it?"}],
        "tools": [clock],
        "params": {"max_tokens": 40, "seed": 1, "logit_bias": ((less_than, 20.0),)},
        **_payload("required", tools=[clock]),
    }

    async def answer() -> dict:
        events = chat_events(_steps(server, request), "tool_calls")
        return await _collect(protocol.Formatter("chat", "m"), events, 1)

    try:
        (choice,) = ChatCompletion.model_validate(asyncio.run(answer())).choices
    finally:
        server.tokenizing.shutdown()
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]


# ------------------------------------------- the logprobs of held replies and of split events


def _tokened(text: str, finish: str = "stop", per_event: int = 3) -> list[list[dict]]:
    """Events of `per_event` tokens each (a token: 4 characters) with each token's logprob,
    then the end of the reply as its own event without a token (an EOS: as the engines
    report it)."""
    tokens = [text[i : i + 4] for i in range(0, len(text), 4)]
    events = [
        [
            {
                "index": 0,
                "text": "".join(group),
                "logprobs": [(t, -0.5, [(t, -0.5)]) for t in group],
                "finish_reason": None,
                "prompt_tokens": 0,
                "completion_tokens": 0,
            }
        ]
        for group in (tokens[i : i + per_event] for i in range(0, len(tokens), per_event))
    ]
    end = {"text": "", "logprobs": [], "finish_reason": finish, "prompt_tokens": 12}
    return events + [[events[0][0] | end | {"completion_tokens": len(tokens) + 1}]]


def _scored_tokens(choice) -> list[str]:
    return [t.token for t in choice.logprobs.content] if choice.logprobs else []


@pytest.mark.parametrize(
    ("text", "finish"),
    [
        (TWO_CALLS, "stop"),  # the calls' last event is the EOS, without a token
        (f"{THINKING}\n\n{TWO_CALLS}", "stop"),  # the thinking ends inside an event
        ("\n<tool_ca", "length"),  # cut before any call began: no call, yet its tokens
    ],
    ids=["calls", "thinking-then-calls", "cut-before-a-call"],
)
def test_every_token_of_a_reply_of_calls_keeps_its_logprob(text, finish):
    """A client asking for logprobs gets one for each token the model wrote, in order,
    whole; streamed, the thinking's chunks carry the logprobs of the thinking's tokens, and
    the calls the rest."""
    tokens = [text[i : i + 4] for i in range(0, len(text), 4)]
    events = _tokened(text, finish)
    whole = _answer(events).choices[0]
    assert _scored_tokens(whole) == tokens
    chunks = [c.choices[0] for c in _streamed(events) if c.choices]
    assert [t for c in chunks for t in _scored_tokens(c)] == tokens
    if text.startswith(THINKING):
        thinking = [
            t for c in chunks if getattr(c.delta, "reasoning", None) for t in _scored_tokens(c)
        ]
        # the token the thinking ends in goes with it; the reply's with the calls
        end = next(k for k in range(len(tokens)) if len("".join(tokens[: k + 1])) >= len(THINKING))
        assert "".join(thinking) == "".join(tokens[: end + 1])
        assert "".join(getattr(c.delta, "reasoning", "") for c in chunks) == INNER
        assert not any(c.delta.content for c in chunks)


# ------------------------------------ the vocabulary's own tags in thinking, text, and R1-style


def test_a_model_whose_vocabulary_holds_the_think_tags_thinks_without_a_wrapper():
    """Without `<tool_call>` in the template the grammar still names the vocabulary's own
    `<think>` and `</think>`: the model's first token, `<think>`, is not refused."""
    tok = _tokenizer(R1_0528_TEMPLATE, True)
    assert chat_render.tool_call_wrapper(tok) is None
    reply = f"<think>\n{THOUGHT}\n\n{PARIS}"
    assert tok.encode(reply, add_special_tokens=False)[0] == tok.convert_tokens_to_ids("<think>")
    _, whole, streamed = _served(tok, reply)
    for choice in (whole, streamed):
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.reasoning == _thought(f"<think>\n{THOUGHT}")
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    _, whole, _ = _served(tok, f"<think>\n{THOUGHT}\n\nIt is sunny.")
    assert whole.finish_reason == "stop" and whole.message.content == "\n\nIt is sunny."


# the model mentions its own tags, which its vocabulary holds as tokens, while it thinks
MENTIONS = "I will emit <tool_call> then </tool_call>, no <think> again.\n</think>"


@pytest.mark.parametrize(
    ("template", "reply", "reasoning"),
    [
        (QWEN25_TEMPLATE, f"<think>\n{MENTIONS}\n\n{TWO_CALLS}", _thought(f"<think>\n{MENTIONS}")),
        (QWEN3_THINKING_TEMPLATE, f"{MENTIONS}\n\n{TWO_CALLS}", _thought(MENTIONS)),
        # no wrapper in the template: its call tags are the vocabulary's tokens all the same
        (R1_TEMPLATE, f"{MENTIONS}\n\n{PARIS}", _thought(MENTIONS)),
        (R1_0528_TEMPLATE, f"<think>\n{MENTIONS}\n\n{PARIS}", _thought(f"<think>\n{MENTIONS}")),
    ],
    ids=["qwen3", "qwen3-thinking", "r1", "r1-0528"],
)
def test_the_vocabularys_own_tags_may_be_mentioned_in_the_thinking(template, reply, reasoning):
    tok = _tokenizer(template, True)
    assert tok.convert_tokens_to_ids("<tool_call>") in tok.encode(MENTIONS)
    _, whole, streamed = _served(tok, reply, tags_in_content=True)
    names = ["get_weather", "get_time"] if reply.endswith(TWO_CALLS) else ["get_weather"]
    for choice in (whole, streamed):
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.reasoning == reasoning
        assert [c.function.name for c in choice.message.tool_calls] == names


@pytest.mark.parametrize(
    ("template", "reply"),
    [
        (QWEN25_TEMPLATE, "It is sunny. Next time I would write <tool_call> and <think> first."),
        # no wrapper in the template: `<tool_call>` is text there, spelled or its token
        (R1_0528_TEMPLATE, "It is sunny. Next time I would write <tool_call> and <think> first."),
        (R1_TEMPLATE, f"{THOUGHT}\n\nIt is sunny; <tool_call> is no call here."),
        # a `</think>` after the thinking ended is text, spelled or its token
        (QWEN25_TEMPLATE, f"<think>\n{THOUGHT}\n\nIt is sunny. I ended that with </think>."),
        (QWEN3_THINKING_TEMPLATE, f"{THOUGHT}\n\nIt is sunny. </think> ended my thinking."),
        (R1_TEMPLATE, f"{THOUGHT}</think> It is sunny."),
        (QWEN25_TEMPLATE, "</think> It is sunny."),  # no thinking at all: a stray end tag
    ],
    ids=[
        "qwen3",
        "r1-0528",
        "r1-call-tag",
        "qwen3-end-tag",
        "qwen3-thinking-end-tag",
        "r1-end-tag-at-once",
        "stray-end-tag",
    ],
)
def test_text_may_mention_the_vocabularys_own_tags(template, reply):
    """The vocabulary's own tag tokens are taken in the text wherever the same tags spelled
    out are: the reply comes back as the content, whole and streamed."""
    tok = _tokenizer(template, True)
    assert len(tok.encode(reply)) < len(_tokenizer(template, False).encode(reply))  # tokens
    _, whole, streamed = _served(tok, reply, tags_in_content=True)
    thinks = template in (QWEN3_THINKING_TEMPLATE, R1_TEMPLATE) or reply.startswith("<think>")
    thought, _, content = reply.partition("</think>") if thinks else (None, "", reply)
    for choice in (whole, streamed):
        assert choice.finish_reason == "stop" and choice.message.content == content
        assert getattr(choice.message, "reasoning", None) == _thought(thought)
        assert not choice.message.tool_calls
