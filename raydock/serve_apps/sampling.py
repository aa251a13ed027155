"""Next-token selection: penalties and logit bias, temperature, top-k/top-p, seeds, logprobs.

Operates on a [batch, vocab] logits tensor so every engine that exposes logits shares it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

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
    # Penalties, with vLLM's meaning: presence / frequency subtract from the logit of each
    # token already in the output (once / per occurrence, as OpenAI's); repetition divides
    # positive logits (multiplies negative ones) of every token in the prompt or the output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, added to its logit)

    def adjusts_logits(self) -> bool:
        return any(getattr(self, name) != DEFAULTS[name] for name in LOGIT_ADJUSTMENTS)


# Each parameter's neutral value: a request that leaves it there does not use it
DEFAULTS: dict[str, object] = {f.name: f.default for f in fields(SamplingParams)}
# What `adjust` applies to the logits before sampling
LOGIT_ADJUSTMENTS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias")


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
        # drop a token once the mass before it already reaches top_p (always keep the first:
        # a top_p that float32 rounds to 0 would drop every token, and sample from NaNs)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@dataclass
class Choice:
    token: int
    logprob: float
    top: list[tuple[int, float]]


def adjust(
    logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int], output: Sequence[int]
) -> torch.Tensor:
    """One sequence's logits (1-D) with `params`' penalties for its prompt and output, then
    its logit_bias."""
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long)
        values = logits[seen]
        r = params.repetition_penalty
        logits = logits.index_put((seen,), torch.where(values > 0, values / r, values * r))
    if output and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output), minlength=logits.shape[-1]).float()
        logits = logits - params.frequency_penalty * counts
        logits = logits - params.presence_penalty * (counts > 0).float()
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias, strict=True)
        logits = logits.index_put((torch.tensor(ids),), torch.tensor(bias), accumulate=True)
    return logits


def choose(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
) -> Choice:
    """Pick the next token from one sequence's logits (1-D, float32), given the sequence's
    prompt and output so far (for penalties). Logprobs are the model's, before `adjust`, and
    only computed when the request asks for them (0.0 otherwise: a softmax over the vocabulary
    per sequence and token is a sizeable part of a step's time at batch 64)."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1) if params.logprobs else None
    if params.adjusts_logits():
        logits = adjust(logits, params, prompt, output)
    if params.temperature <= 1e-5 or params.top_k == 1:
        token = int(torch.argmax(logits))
    else:
        filtered = _filter(logits / params.temperature, params.top_k, params.top_p)
        probs = torch.softmax(filtered, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    if logprobs is None:
        return Choice(token, 0.0, [])
    top: list[tuple[int, float]] = []
    if params.top_logprobs:
        values, ids = torch.topk(logprobs, params.top_logprobs)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return Choice(token, float(logprobs[token]), top)
