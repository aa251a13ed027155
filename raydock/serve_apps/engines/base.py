"""The one engine interface; engines differ only behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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
