"""How a tool-mode stream reaches the client: a call is held until it ends, then sent as one
tool call; text that cannot be a call (`tool_choice: auto`) streams as it comes. Calls in a
chat template's own wrapper (`<tool_call>` ... `</tool_call>`) are calls too, one or several.
A thinking block before the reply streams as reasoning (`chat_events`: the reasoning split,
then the tool calls)."""

from __future__ import annotations

import asyncio
import json

from raydock.serve_apps.openai_service import _as_tool_calls, chat_events

CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})
OTHER = json.dumps({"name": "get_time", "arguments": {"tz": "CET"}})
WRAPPED = f"<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n{OTHER}\n</tool_call>"


def _ev(i: int, text: str, finish: str | None = None) -> dict:
    return {"index": i, "text": text, "logprobs": [(text, -0.5, [])], "finish_reason": finish}


def _run(
    batches: list[list[dict]], finish: str = "tool_calls", via=_as_tool_calls
) -> list[list[dict]]:
    """What `via` (`_as_tool_calls`) yields after each input batch (empty: nothing yet)."""
    seen: list[list[dict]] = []

    async def main():
        fed = asyncio.Queue()

        async def source():
            for b in batches:
                yield b
                await fed.get()  # the next batch only after the consumer looked

        out = via(source(), finish)
        step = asyncio.create_task(out.__anext__())
        for _ in batches:
            for _ in range(20):  # all in this loop: a few turns decide it, however busy the host
                await asyncio.sleep(0)
            if step.done():
                seen.append(step.result())
                step = asyncio.create_task(out.__anext__())
            else:
                seen.append([])
            fed.put_nowait(None)
        step.cancel()

    asyncio.run(main())
    return seen


def test_auto_text_streams_from_its_first_token_with_logprobs():
    seen = _run([[_ev(0, "Hel")], [_ev(0, "lo")], [_ev(0, "!", "stop")]])
    assert [[e["text"] for e in b] for b in seen] == [["Hel"], ["lo"], ["!"]]
    assert all(b[0]["logprobs"] for b in seen)
    assert seen[-1][0]["finish_reason"] == "stop" and "tool_calls" not in seen[-1][0]


def test_a_call_is_held_and_sent_whole_with_the_given_finish_reason():
    parts = [CALL[:5], CALL[5:20], CALL[20:]]
    seen = _run([[_ev(0, parts[0])], [_ev(0, parts[1])], [_ev(0, parts[2], "stop")]], "stop")
    assert seen[:2] == [[], []]
    # as OpenAI: the call, then a chunk of its own ends the choice (openai-python's stream
    # helper sends a call's arguments.done only when a later chunk finishes the choice)
    ev, end = seen[2]
    assert ev["finish_reason"] is None and ev["text"] == ""
    assert end["finish_reason"] == "stop" and end["text"] == "" and "tool_calls" not in end
    (call,) = ev["tool_calls"]
    assert call["index"] == 0 and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Rome"}


def test_a_call_cut_short_comes_back_as_the_call_so_far():
    cut = CALL.index("Rome") + 2  # max_tokens reached inside the arguments
    seen = _run([[_ev(0, CALL[:8])], [_ev(0, CALL[8:cut], "length")]])
    assert seen[0] == []
    ev, end = seen[1]
    assert ev["text"] == "" and end["finish_reason"] == "length"  # as OpenAI: not "tool_calls"
    (call,) = ev["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Ro'}


def test_choices_are_decided_each_on_its_own():
    seen = _run(
        [[_ev(0, CALL[:4]), _ev(1, "Sunny")], [_ev(0, CALL[4:], "stop"), _ev(1, ".", "stop")]]
    )
    assert [e["text"] for e in seen[0]] == ["Sunny"]
    assert [(e["index"], "tool_calls" in e) for e in seen[1]] == [(0, True), (0, False), (1, False)]


def _pieces(text: str, size: int = 7) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def test_wrapped_calls_are_held_and_sent_as_one_call_each():
    parts = _pieces(WRAPPED)
    seen = _run([[_ev(0, p, "stop" if k == len(parts) - 1 else None)] for k, p in enumerate(parts)])
    assert all(b == [] for b in seen[:-1])  # nothing of the wrapper leaks while it comes
    first, second, end = seen[-1]
    assert [e["finish_reason"] for e in seen[-1]] == [None, None, "tool_calls"]
    assert [e["text"] for e in seen[-1]] == ["", "", ""]
    assert [c["index"] for e in seen[-1] for c in e.get("tool_calls", [])] == [0, 1]
    (a,), (b,) = first["tool_calls"], second["tool_calls"]
    assert a["id"] != b["id"] and a["type"] == b["type"] == "function"
    assert (a["function"]["name"], b["function"]["name"]) == ("get_weather", "get_time")
    assert json.loads(b["function"]["arguments"]) == {"tz": "CET"}


def test_text_that_starts_like_a_wrapper_streams_once_it_is_not_one():
    seen = _run([[_ev(0, "<to")], [_ev(0, "ol")], [_ev(0, "box> is")], [_ev(0, " it", "stop")]])
    assert seen[:2] == [[], []]  # "<tool" may still open a call
    assert [e["text"] for e in seen[2]] == ["<to", "ol", "box> is"]  # then all of it, in order
    assert [e["text"] for e in seen[3]] == [" it"] and "tool_calls" not in seen[3][0]


def test_a_mention_of_the_wrapper_later_in_the_text_is_text():
    text = "You could use <tool_call>{} here"
    seen = _run([[_ev(0, p)] for p in _pieces(text, 5)[:-1]] + [[_ev(0, text[-2:], "stop")]])
    assert [e["text"] for b in seen for e in b] == _pieces(text, 5)[:-1] + [text[-2:]]
    assert all(len(b) == 1 for b in seen)  # each piece as it came
    assert not any("tool_calls" in e for b in seen for e in b)


def _texts(seen: list[list[dict]]) -> str:
    return "".join(e["text"] for b in seen for e in b)


def _calls(seen: list[list[dict]]) -> list[tuple[str, str]]:
    return [
        (c["function"]["name"], c["function"]["arguments"])
        for b in seen
        for e in b
        for c in e.get("tool_calls") or ()
    ]


def test_wrapped_calls_cut_short_come_back_as_the_calls_so_far_without_tags():
    second = WRAPPED.index("get_time") + 5  # inside the second call's name: not a call yet
    seen = _run(
        [[_ev(0, p)] for p in _pieces(WRAPPED[:second])[:-1]]
        + [[_ev(0, _pieces(WRAPPED[:second])[-1], "length")]]
    )
    assert _texts(seen) == ""  # no tag, no JSON as text
    assert _calls(seen) == [("get_weather", '{"city":"Rome"}')]
    assert [e["finish_reason"] for e in seen[-1]] == [None, "length"]


def test_a_reply_cut_inside_the_opening_tag_has_no_call_and_no_tag():
    seen = _run([[_ev(0, "<tool")], [_ev(0, "_ca", "length")]])
    assert _texts(seen) == "" and _calls(seen) == []
    assert seen[-1][-1]["finish_reason"] == "length"


def test_whitespace_before_a_wrapped_call_is_held_and_dropped():
    text = "\n\n" + WRAPPED
    parts = _pieces(text, 1)[:3] + _pieces(text[3:])
    seen = _run([[_ev(0, p, "stop" if k == len(parts) - 1 else None)] for k, p in enumerate(parts)])
    assert _texts(seen) == ""
    assert [name for name, _ in _calls(seen)] == ["get_weather", "get_time"]


def test_whitespace_then_text_streams_the_whitespace_with_it():
    seen = _run([[_ev(0, "\n")], [_ev(0, " Sunny")], [_ev(0, ".", "stop")]])
    assert seen[0] == [] and [e["text"] for e in seen[1]] == ["\n", " Sunny"]
    assert _texts(seen) == "\n Sunny." and _calls(seen) == []


def test_text_after_whitespace_the_grammar_does_not_allow_before_a_call_is_text():
    # a no-break space or a vertical tab then `{`: text to the grammar (unchecked against any
    # tool's schema), so text here too, never a call of whatever name it holds
    for space in ("\u00a0", "\x0b", "\u2003"):
        seen = _run([[_ev(0, space + CALL[:9])], [_ev(0, CALL[9:], "stop")]])
        assert _texts(seen) == space + CALL and _calls(seen) == []


def test_a_whole_call_that_reached_max_tokens_on_its_last_token_is_that_call():
    seen = _run([[_ev(0, CALL[:8])], [_ev(0, CALL[8:], "length")]])
    ev, end = seen[1]
    assert end["finish_reason"] == "length"
    (call,) = ev["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Rome"}


THINKING = "<think>\nThe user wants <tool_call> weather; call get_weather.\n</think>"
THOUGHT = THINKING.removeprefix("<think>").removesuffix("</think>")  # what the client reads


def _thinking_run(batches: list[list[dict]], finish: str = "tool_calls") -> list[list[dict]]:
    return _run(batches, finish, via=chat_events)


def _reasoning(seen: list[list[dict]]) -> str:
    return "".join(e.get("reasoning", "") for b in seen for e in b)


def test_thinking_streams_as_reasoning_then_the_call_is_held():
    """Qwen3: `<think>`…`</think>` (a tag may be mentioned inside), whitespace, the call. The
    thinking streams as reasoning as it comes, without its tags; the event the thinking ends
    in is split there; the content has none of it."""
    text = THINKING + "\n\n" + WRAPPED
    parts = _pieces(text, 9)
    seen = _thinking_run(
        [[_ev(0, p, "stop" if k == len(parts) - 1 else None)] for k, p in enumerate(parts)]
    )
    assert _reasoning(seen) == THOUGHT and _texts(seen) == ""
    assert [e["reasoning"] for e in seen[0]] == [parts[0].removeprefix("<think>")]  # at once
    assert [name for name, _ in _calls(seen)] == ["get_weather", "get_time"]
    assert seen[-1][-1]["finish_reason"] == "tool_calls"


def test_thinking_then_text_is_reasoning_then_the_text():
    text = THINKING + "\n\nIt is sunny in Rome."
    parts = _pieces(text, 9)
    seen = _thinking_run(
        [[_ev(0, p, "stop" if k == len(parts) - 1 else None)] for k, p in enumerate(parts)]
    )
    assert _reasoning(seen) == THOUGHT
    assert _texts(seen) == "\n\nIt is sunny in Rome." and _calls(seen) == []
    assert seen[-1][-1]["finish_reason"] == "stop"


def test_thinking_cut_short_is_reasoning_and_no_content():
    seen = _thinking_run([[_ev(0, "<think>\nHm")], [_ev(0, "m, the", "length")]])
    assert _reasoning(seen) == "\nHmm, the" and _texts(seen) == "" and _calls(seen) == []
    assert seen[0] and seen[-1][-1]["finish_reason"] == "length"


# an output that starts inside the thinking its prompt opened (the template's generation prompt
# ends in `<think>\n`): the replica marks its events so
OPENED = "The user wants {} weather; call get_weather.\n</think>"


def _in_thinking(text: str, size: int, finish: str | None = "stop") -> list[list[dict]]:
    parts = _pieces(text, size)
    return [
        [_ev(0, p, finish if k == len(parts) - 1 else None) | {"in_thinking": True}]
        for k, p in enumerate(parts)
    ]


def test_thinking_the_prompt_opened_streams_as_reasoning_then_the_call_is_held():
    """No `<think>` comes: the output is thinking from its first event, which streams at once,
    to the first `</think>` (a call-like `{` in it included); the event it ends in is split."""
    seen = _thinking_run(_in_thinking(OPENED + "\n\n" + WRAPPED, 9))
    assert _reasoning(seen) == OPENED.removesuffix("</think>") and _texts(seen) == ""
    assert [e["reasoning"] for e in seen[0]] == [OPENED[:9]]
    assert [name for name, _ in _calls(seen)] == ["get_weather", "get_time"]
    assert seen[-1][-1]["finish_reason"] == "tool_calls"


def test_the_end_of_thinking_split_between_events_is_found():
    at = OPENED.index("</think>") + 3  # "</t" | "hink>"
    batches = _in_thinking(OPENED[:at], 100, None) + _in_thinking(OPENED[at:] + CALL, 100)
    seen = _thinking_run(batches)
    # what may be the start of `</think>` is held back
    assert [e["reasoning"] for e in seen[0]] == [OPENED[: at - 3]]
    assert _reasoning(seen) == OPENED.removesuffix("</think>") and _texts(seen) == ""
    assert _calls(seen) == [("get_weather", '{"city":"Rome"}')]


def test_text_after_thinking_the_prompt_opened_is_the_content():
    text = OPENED + "\n\nIt is sunny in Rome."
    seen = _thinking_run(_in_thinking(text, 9))
    assert _reasoning(seen) == OPENED.removesuffix("</think>")
    assert _texts(seen) == "\n\nIt is sunny in Rome." and _calls(seen) == []
    assert seen[-1][-1]["finish_reason"] == "stop"


def test_thinking_the_prompt_opened_cut_short_is_reasoning_only():
    seen = _thinking_run(_in_thinking("Hmm, the user wants", 6, "length"))
    assert _reasoning(seen) == "Hmm, the user wants" and _texts(seen) == ""
    assert _calls(seen) == []
    assert all(seen) and seen[-1][-1]["finish_reason"] == "length"


def test_a_call_after_thinking_the_prompt_opened_cut_short_is_the_call_so_far():
    cut = WRAPPED.index("Rome") + 2
    seen = _thinking_run(_in_thinking(OPENED + "\n" + WRAPPED[:cut], 9, "length"))
    assert _reasoning(seen) == OPENED.removesuffix("</think>") and _texts(seen) == ""
    assert _calls(seen) == [("get_weather", '{"city": "Ro')]
    assert seen[-1][-1]["finish_reason"] == "length"
