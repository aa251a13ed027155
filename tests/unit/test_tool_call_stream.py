"""How a tool-mode stream reaches the client: a call is held until it ends, then sent as one
tool call; text that cannot be a call (`tool_choice: auto`) streams as it comes."""

from __future__ import annotations

import asyncio
import json

from raydock.serve_apps.openai_service import _as_tool_calls

CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})


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
    assert seen[-1][0]["finish_reason"] == "stop" and "tool_call" not in seen[-1][0]


def test_a_call_is_held_and_sent_whole_with_the_given_finish_reason():
    parts = [CALL[:5], CALL[5:20], CALL[20:]]
    seen = _run([[_ev(0, parts[0])], [_ev(0, parts[1])], [_ev(0, parts[2], "stop")]], "stop")
    assert seen[:2] == [[], []]
    (ev,) = seen[2]
    assert ev["finish_reason"] == "stop" and ev["text"] == ""
    assert ev["tool_call"]["function"]["name"] == "get_weather"
    assert json.loads(ev["tool_call"]["function"]["arguments"]) == {"city": "Rome"}


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
    assert [(e["index"], "tool_call" in e) for e in seen[1]] == [(0, True), (1, False)]
