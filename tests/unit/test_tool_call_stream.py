"""How a tool-mode stream reaches the client: a call is held until it ends, then sent as one
tool call; text that cannot be a call (`tool_choice: auto`) streams as it comes. Calls in a
chat template's own wrapper (`<tool_call>` ... `</tool_call>`) are calls too, one or several."""

from __future__ import annotations

import asyncio
import json

from raydock.serve_apps.openai_service import _as_tool_calls

CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})
OTHER = json.dumps({"name": "get_time", "arguments": {"tz": "CET"}})
WRAPPED = f"<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n{OTHER}\n</tool_call>"


def _ev(i: int, text: str, finish: str | None = None) -> dict:
    return {"index": i, "text": text, "logprobs": [(text, -0.5, [])], "finish_reason": finish}


def _run(batches: list[list[dict]], finish: str = "tool_calls") -> list[list[dict]]:
    """What `_as_tool_calls` yields after each input batch (empty: nothing yet)."""
    seen: list[list[dict]] = []

    async def main():
        fed = asyncio.Queue()

        async def source():
            for b in batches:
                yield b
                await fed.get()  # the next batch only after the consumer looked

        out = _as_tool_calls(source(), finish)
        step = asyncio.create_task(out.__anext__())
        for _ in batches:
            done, _ = await asyncio.wait({step}, timeout=0.2)
            if done:
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
    (ev,) = seen[2]
    assert ev["finish_reason"] == "stop" and ev["text"] == ""
    (call,) = ev["tool_calls"]
    assert call["index"] == 0 and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Rome"}


def test_a_call_cut_short_comes_back_as_its_text():
    seen = _run([[_ev(0, CALL[:8])], [_ev(0, CALL[8:12], "length")]])
    assert seen[0] == []
    assert "".join(e["text"] for e in seen[1]) == CALL[:12]
    assert seen[1][-1]["finish_reason"] == "length"


def test_choices_are_decided_each_on_its_own():
    seen = _run(
        [[_ev(0, CALL[:4]), _ev(1, "Sunny")], [_ev(0, CALL[4:], "stop"), _ev(1, ".", "stop")]]
    )
    assert [e["text"] for e in seen[0]] == ["Sunny"]
    assert [(e["index"], "tool_calls" in e) for e in seen[1]] == [(0, True), (1, False)]


def _pieces(text: str, size: int = 7) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def test_wrapped_calls_are_held_and_sent_as_one_call_each():
    parts = _pieces(WRAPPED)
    seen = _run([[_ev(0, p, "stop" if k == len(parts) - 1 else None)] for k, p in enumerate(parts)])
    assert all(b == [] for b in seen[:-1])  # nothing of the wrapper leaks while it comes
    first, second = seen[-1]
    assert [e["finish_reason"] for e in seen[-1]] == [None, "tool_calls"]
    assert [e["text"] for e in seen[-1]] == ["", ""]
    assert [c["index"] for e in seen[-1] for c in e["tool_calls"]] == [0, 1]
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


def test_wrapped_calls_cut_short_come_back_as_their_text():
    seen = _run([[_ev(0, WRAPPED[:20])], [_ev(0, WRAPPED[20:30], "length")]])
    assert seen[0] == [] and "".join(e["text"] for e in seen[1]) == WRAPPED[:30]
