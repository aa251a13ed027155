"""Next-token selection: temperature, top-k, top-p, seeded generators, logprobs.

Operates on a [batch, vocab] logits tensor so every engine that exposes logits shares it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # vLLM's extension: fixed-length outputs for load tests


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token once the mass before it already reaches top_p (always keep the first)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@dataclass
class Choice:
    token: int
    logprob: float
    top: list[tuple[int, float]]


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> Choice:
    """Pick the next token from one sequence's logits (1-D, float32)."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.temperature <= 1e-5 or params.top_k == 1:
        token = int(torch.argmax(logits))
    else:
        filtered = _filter(logits / params.temperature, params.top_k, params.top_p)
        probs = torch.softmax(filtered, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    top: list[tuple[int, float]] = []
    if params.logprobs and params.top_logprobs:
        values, ids = torch.topk(logprobs, params.top_logprobs)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return Choice(token, float(logprobs[token]), top)
