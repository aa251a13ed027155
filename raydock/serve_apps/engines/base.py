"""The one engine interface; engines differ only behind it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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


class Engine(Protocol):
    max_context: int

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]: ...

    def text_prompt(self, prompt: str) -> list[int]: ...

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, regex: str | None = None
    ) -> AsyncIterator[list[StepEvent]]: ...


async def drain_steps(out: asyncio.Queue) -> AsyncIterator[list[StepEvent]]:
    """A sequence's steps from its output queue until one finishes it; steps that are ready
    together come as one list, so a slow reader catches up in one go. An exception the
    scheduler put in the queue is raised here."""
    while True:
        ready = [await out.get()]
        while not out.empty():
            ready.append(out.get_nowait())
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

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
