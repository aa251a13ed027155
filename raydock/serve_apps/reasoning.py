"""A thinking model's reasoning apart from its answer, as vLLM's reasoning parsers give it.

A chat reply of a model that thinks (the engine replica marks its events `structured.THINKS`;
any model's under tools, whose grammar takes a thinking block) that opens with a thinking
block (`<think>` … `</think>`: Qwen3, DeepSeek-R1, QwQ), or starts inside one its chat
template opened (marked `structured.IN_THINKING`), is split here, per choice, as its events
stream: the block's text becomes reasoning events (`"reasoning"`, no `text`; the tags shown
in neither), what follows its first `</think>` the content events (`"text"`), as before.
`structured.thinking_length` says where the block ends; this module adds the streaming: the
reasoning goes out as it comes, holding back only what may be the start of `</think>`. Chat
(`message.reasoning`, `delta.reasoning`) and the Responses API (a `reasoning` item) both read
these events.

Each piece keeps the logprobs of its own tokens (the tags' with the reasoning). The event
that ends a choice carries `REASONING_TOKENS`: the tokens of its thinking, for usage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from raydock.serve_apps.guided.grammars import THINK_CLOSE, THINK_OPEN
from raydock.serve_apps.structured import IN_THINKING, THINKS, thinking_length

#: the key of an event's reasoning text (such an event's `text` is "")
REASONING = "reasoning"
#: the key, on the event that ends a choice, of how many of its tokens were thinking
REASONING_TOKENS = "reasoning_tokens"


async def split_reasoning(
    batches: AsyncIterator[list[dict]], include_reasoning: bool = True, any_model: bool = False
) -> AsyncIterator[list[dict]]:
    """Each choice's events with its thinking as reasoning events (`ReasoningSplit`, one per
    choice) where its model thinks (or `any_model`: under tools); without `include_reasoning`
    those are left out (their logprobs too), and the content is the same."""
    splits: dict[int, ReasoningSplit] = {}
    begun: set[int] = set()  # the choices with an event sent
    try:
        async for batch in batches:
            out = []
            for ev in batch:
                if (split := splits.get(ev["index"])) is None:
                    thinks = any_model or bool(ev.get(THINKS) or ev.get(IN_THINKING))
                    split = splits[ev["index"]] = ReasoningSplit(bool(ev.get(IN_THINKING)), thinks)
                out.extend(split.take(ev))
            if not include_reasoning:
                out = [kept for ev in out if (kept := _without_reasoning(ev, begun)) is not None]
                begun.update(ev["index"] for ev in out)
            if out:
                yield out
    finally:
        await batches.aclose()


def _without_reasoning(ev: dict, begun: set[int]) -> dict | None:
    """A reasoning event as `include_reasoning: false` sends it: nothing, or an empty content
    event where it begins its choice (a stream's first chunk goes out while the model thinks,
    as OpenAI's does: a client waiting for its first byte does not time out) or ends it (the
    thinking was cut)."""
    if REASONING not in ev:
        return ev
    if ev["finish_reason"] or ev["index"] not in begun:
        return {k: v for k, v in ev.items() if k != REASONING} | {"text": "", "logprobs": []}
    return None


class ReasoningSplit:
    """One choice's events split into its thinking and the reply after it.

    Until the text says whether it opens a block (it is still a start of `<think>`) the events
    are held; an output that opens none passes through untouched from then on."""

    def __init__(self, in_thinking: bool = False, thinks: bool = True) -> None:
        self.in_thinking = in_thinking  # the prompt opened the block: the output starts in it
        self.text = ""  # the output so far, as long as the thinking lasts
        self.held: list[dict] = []  # events not sent yet, the first starting at `self.sent`
        self.sent = 0  # characters of `text` sent (as reasoning)
        self.passing = not thinks  # the thinking is over (or there is none): events pass
        self.tokens = 0  # the choice's tokens so far
        self.thought: int | None = None  # tokens of the thinking, once it ended

    def take(self, ev: dict) -> list[dict]:
        """The events to send now for `ev`, in order."""
        tokens_before = self.tokens
        self.tokens = max(
            self.tokens + len(ev.get("token_ids") or ()), ev.get("completion_tokens", 0)
        )
        if self.passing:
            return [self._ending(ev)]
        self.text += ev["text"]
        self.held.append(ev)
        end = thinking_length(self.text, self.in_thinking)
        if end == 0:  # no thinking block: the output is the reply
            return self._pass_held()
        if end is None and not (self.in_thinking or self.text.startswith(THINK_OPEN)):
            return self._pass_held() if ev["finish_reason"] else []  # may still open one
        if end is None:  # inside the thinking
            if ev["finish_reason"]:  # it never closed (max_tokens, or the model's end)
                return self._reasoning(len(self.text), closed=False)
            return self._reasoning(len(self.text) - _partial_close(self.text), closed=False)
        cut = end - (len(self.text) - len(ev["text"]))  # where in `ev` the thinking ends
        self.thought = tokens_before + _tokens_before(ev, cut, self.tokens - tokens_before)
        return self._reasoning(end, closed=True) + self._pass_held()

    def _reasoning(self, upto: int, closed: bool) -> list[dict]:
        """The held text up to `upto` as reasoning events (one per engine event, or part of
        one: an event is split where the thinking ends, with its logprobs), the tags left out
        of their text; an empty piece is sent only for its logprobs or its end."""
        opened = 0 if self.in_thinking else len(THINK_OPEN)
        shown_end = upto - len(THINK_CLOSE) if closed else upto
        out = []
        # an unclosed thinking also takes the events without text at its end (the model's end)
        while self.held and (self.sent < upto or not (closed or self.held[0]["text"])):
            ev = self.held.pop(0)
            cut = upto - self.sent
            # the rest is the reply's (its end too), or not sent yet
            if cut < len(ev["text"]) or (closed and ev["finish_reason"]):
                thinking, rest = split_logprobs(ev["logprobs"], cut)
                self.held.insert(0, ev | {"text": ev["text"][cut:], "logprobs": rest})
                ev = ev | {"text": ev["text"][:cut], "logprobs": thinking, "finish_reason": None}
            start, self.sent = self.sent, self.sent + len(ev["text"])
            shown = self.text[max(start, opened) : max(min(self.sent, shown_end), opened)]
            finish = None if closed else ev["finish_reason"]
            if shown or ev["logprobs"] or finish:
                piece = ev | {"text": "", REASONING: shown, "finish_reason": finish}
                out.append(self._ending(piece))
        return out

    def _pass_held(self) -> list[dict]:
        """The held events as content, passing every later one: the thinking is over."""
        self.passing, self.text = True, ""
        out, self.held = self.held, []
        return [
            self._ending(ev) for ev in out if ev["text"] or ev["logprobs"] or ev["finish_reason"]
        ]

    def _ending(self, ev: dict) -> dict:
        """`ev`, with the count of the thinking's tokens where it ends the choice."""
        if not ev["finish_reason"]:
            return ev
        thought = self.thought if self.thought is not None else (0 if self.passing else self.tokens)
        return ev | {REASONING_TOKENS: thought}


def _tokens_before(ev: dict, cut: int, tokens: int) -> int:
    """How many of `ev`'s `tokens` come before character `cut` of its text: by its logprobs'
    token texts where it has them; else all of them where its text is cut (the engines step
    a token at a time: only where several tokens' text came out together is it rounded up)."""
    if cut >= len(ev["text"]) or not ev["logprobs"]:
        return tokens
    return len(split_logprobs(ev["logprobs"], cut)[0])


def _partial_close(text: str) -> int:
    """How many characters at the end of `text` may be the start of THINK_CLOSE (held back
    until the next characters say)."""
    for size in range(min(len(THINK_CLOSE) - 1, len(text)), 0, -1):
        if THINK_CLOSE.startswith(text[-size:]):
            return size
    return 0


def split_logprobs(logprobs: list, cut: int) -> tuple[list, list]:
    """An event's per-token logprobs split where its text is cut at `cut` characters: each
    token goes with the part its own text begins in, by the lengths of the tokens' texts
    (the engines' token texts spell the event's text; where they do not, e.g. a token whose
    text decoding drops, the count is off by as much)."""
    at = 0
    for k, entry in enumerate(logprobs):
        if at >= cut:
            return logprobs[:k], logprobs[k:]
        at += len(entry[0])
    return logprobs, []


def reasoning_tokens(ev: dict[str, Any]) -> int:
    """The thinking's tokens an event that ends a choice counts (0 for any other)."""
    return ev.get(REASONING_TOKENS, 0) if ev.get("finish_reason") else 0
