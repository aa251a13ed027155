"""The one engine interface; engines differ only behind it."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from raydock.serve_apps import chat_render
from raydock.serve_apps.detok import TextTracker
from raydock.serve_apps.sampling import SamplingParams


@dataclass
class StepEvent:
    """What one decode step produced for one sequence."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    # per token: (token text, logprob, [(alt text, alt logprob), ...])
    logprobs: list[tuple[str, float, list[tuple[str, float]]]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class ConstraintError(ValueError):
    """The engine cannot enforce a regex or grammar: its syntax is outside the engine's dialect
    (Rust `regex`: no look-arounds or backreferences), the model's vocabulary cannot spell it,
    or it does not compile in time."""


class Engine(Protocol):
    max_context: int
    # SamplingParams fields the engine cannot honour; a request setting one gets a 400
    unsupported_params: ClassVar[frozenset[str]]
    # whether `generate` applies a LoRA adapter per sequence (load_adapter / release_adapter)
    supports_adapters: ClassVar[bool]

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of the rendered chat; raises chat_render.ChatTemplateError."""

    def rendered_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> tuple[str, list[int]]:
        """The rendered chat's text and token ids; raises chat_render.ChatTemplateError."""

    @property
    def longest_token_chars(self) -> int: ...

    def text_prompt(self, prompt: str) -> list[int]: ...

    @property
    def vocab_size(self) -> int: ...

    async def check_regex(self, regex: str) -> None:
        """Raise ConstraintError if `generate` could not enforce `regex`."""

    async def check_grammar(self, grammar: str) -> None:
        """Raise ConstraintError if `generate` could not enforce the Lark / GBNF `grammar`
        (JSON schemas, tools and choices arrive as such grammars: `raydock.serve_apps.guided`)."""

    async def load_adapter(self, adapter_id: str, adapter_dir: str) -> None:
        """Make the PEFT adapter in `adapter_dir` usable as `generate(adapter=adapter_id)`."""

    def release_adapter(self, adapter_id: str) -> None:
        """Let the adapter go once no sequence uses it (called from any thread)."""

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        regex: str | None = None,
        grammar: str | None = None,
        adapter: str | None = None,
        announce_admission: bool = False,
    ) -> AsyncIterator[list[StepEvent]]:
        """The sequence's steps. With `announce_admission`, an empty list comes first, once,
        when the sequence joins a batch (its prefill begins), not while it waits for a slot:
        what the replica's meter charges the prompt from. An engine whose scheduler does not
        say (vLLM) sends none; its first step is then the first sign."""


class Decoding(Protocol):
    """What `append_token` reads and updates of an engine's per-sequence state."""

    prompt: list[int]
    params: SamplingParams
    tracker: TextTracker
    guide: Any  # guided.Matcher, or None when unconstrained
    budget: int
    produced: int
    done: bool


def end_event(seq: Decoding) -> StepEvent:
    """Finish `seq` with "stop" (an end token, or a guide that can only end); "length" when
    its guide hit a per-step bound (the output may be incomplete: never "stop")."""
    seq.done = True
    finish = "length" if seq.guide is not None and seq.guide.failed else "stop"
    return StepEvent(seq.tracker.flush(), [], [], finish, len(seq.prompt), seq.produced)


def budget_end(tracker: TextTracker) -> tuple[str, str]:
    """The held-back text of a sequence cut short (its token budget, or the engine's own
    limit), and its finish_reason: "stop" when that text completed a stop sequence, else
    "length"."""
    tail = tracker.flush()
    return tail, "stop" if tracker.stopped else "length"


def append_token(
    seq: Decoding,
    token: int,
    logprob: float,
    top: list[tuple[int, float]],
    eos: set[int],
    tokenizer: Any,
) -> StepEvent:
    """Add a chosen token to `seq` and describe what the client sees: an end token finishes
    it (unless `ignore_eos` on an unguided sequence); otherwise the guide advances and a stop
    string or the token budget may finish it. `top` are (token, logprob) alternatives."""
    if token in eos and (seq.guide is not None or not seq.params.ignore_eos):
        return end_event(seq)
    if seq.guide is not None:
        seq.guide.advance(token)
    seq.produced += 1
    text = seq.tracker.add(token)
    finish = None
    if seq.tracker.stopped:
        finish = "stop"
    elif seq.produced >= seq.budget:
        tail, finish = budget_end(seq.tracker)
        text += tail
    seq.done = finish is not None
    logprobs = []
    if seq.params.logprobs:
        ids = seq.tracker.ids
        before = ids[-2] if len(ids) > 1 else (seq.prompt[-1] if seq.prompt else None)
        alts = [(token_text(tokenizer, before, t), lp) for t, lp in top]
        logprobs = [(token_text(tokenizer, before, token), float(logprob), alts)]
    return StepEvent(text, [token], logprobs, finish, len(seq.prompt), seq.produced)


def token_text(tokenizer: Any, before: int | None, token: int) -> str:
    """A token's text as it reads after the token `before` (detok.TextTracker's reason: a
    SentencePiece token decoded alone loses its leading space)."""
    if before is not None:
        head = tokenizer.decode([before], skip_special_tokens=True)
        both = tokenizer.decode([before, token], skip_special_tokens=True)
        if head and both.startswith(head):
            return both[len(head) :]
    return tokenizer.decode([token])


#: what a scheduler puts in a sequence's output queue each time it takes the sequence into a
#: batch (`Engine.generate`'s `announce_admission`)
ADMITTED = object()


async def drain_steps(out: asyncio.Queue, announce: bool = False) -> AsyncIterator[list[StepEvent]]:
    """A sequence's steps from its output queue until one finishes it; steps that are ready
    together come as one list, so a slow reader catches up in one go. An exception the
    scheduler put in the queue is raised here. With `announce`, its first admission into a
    batch comes as an empty list."""
    while True:
        ready = [await out.get()]
        while not out.empty():
            ready.append(out.get_nowait())
        if any(ev is ADMITTED for ev in ready):
            ready = [ev for ev in ready if ev is not ADMITTED]
            if announce:
                announce = False  # once: a sequence resumed in a later run is no new prompt
                yield []
            if not ready:
                continue
        for ev in ready:
            if isinstance(ev, BaseException):
                raise ev
        yield ready
        if ready[-1].finish_reason:
            return


def eos_ids(model_dir: Path, tokenizer) -> set[int]:
    """The tokenizer's EOS plus every eos_token_id of generation_config.json."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


class TokenizerPrompts:
    """Prompt building and decoding with the model's own Hugging Face tokenizer."""

    tokenizer: Any

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        return self.rendered_chat(messages, tools)[1]

    def rendered_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> tuple[str, list[int]]:
        text = chat_render.render(self.tokenizer, messages, tools)
        return text, self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """Characters of the vocabulary's longest token: a text longer than this times the
        context cannot fit, however it tokenizes (checked before tokenizing it)."""
        return max(len(t) for t in self.tokenizer.get_vocab())

    def text_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    @property
    def vocab_size(self) -> int:
        """Token ids a request may name (logit_bias): the tokenizer's, added tokens included."""
        return len(self.tokenizer)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
