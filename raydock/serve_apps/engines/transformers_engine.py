"""Hugging Face transformers engine (CPU or CUDA), with a hand-written decode loop.

The loop (rather than `model.generate`) gives per-step control: sampling and logprobs from
sampling.py, stop sequences from detok.py, and cancellation between any two steps.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raydock.serve_apps.detok import TextTracker
from raydock.serve_apps.engines.base import StepEvent
from raydock.serve_apps.sampling import SamplingParams, choose, make_generator


def _eos_ids(model_dir: Path, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


class TransformersEngine:
    def __init__(self, model_dir: str, device: str = "cpu", num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        path = Path(model_dir)
        self.device = device if device != "cuda" or torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device)
        self.model.eval()
        self.eos = _eos_ids(path, self.tokenizer)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        # torch runs in one thread of its own so the replica's event loop stays responsive
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._lock = asyncio.Lock()

    # ---- prompts
    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- decoding
    @torch.inference_mode()
    def _forward(self, ids: list[int], past) -> tuple[torch.Tensor, Any]:
        inp = torch.tensor([ids], device=self.device)
        out = self.model(input_ids=inp, past_key_values=past, use_cache=True)
        return out.logits[0, -1].float().cpu(), out.past_key_values

    async def _step(self, ids: list[int], past) -> tuple[torch.Tensor, Any]:
        # one forward at a time per replica; the lock is FIFO, so concurrent requests interleave
        async with self._lock:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._forward, ids, past)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[StepEvent]:
        gen = make_generator(params.seed)
        tracker = TextTracker(self._decode, params.stop)
        logits, past = await self._step(prompt_ids, None)
        n_prompt, produced = len(prompt_ids), 0
        budget = min(params.max_tokens, self.max_context - n_prompt)
        while True:
            if produced >= budget:
                yield StepEvent(
                    tracker.flush(),
                    finish_reason="length",
                    prompt_tokens=n_prompt,
                    completion_tokens=produced,
                )
                return
            pick = choose(logits, params, gen)
            if pick.token in self.eos and not params.ignore_eos:
                yield StepEvent(
                    tracker.flush(),
                    finish_reason="stop",
                    prompt_tokens=n_prompt,
                    completion_tokens=produced,
                )
                return
            produced += 1
            delta = tracker.add(pick.token)
            logprobs = []
            if params.logprobs:
                tok = self.tokenizer.decode([pick.token])
                alts = [(self.tokenizer.decode([t]), lp) for t, lp in pick.top]
                logprobs = [(tok, pick.logprob, alts)]
            finish = "stop" if tracker.stopped else None
            yield StepEvent(delta, [pick.token], logprobs, finish, n_prompt, produced)
            if finish:
                return
            logits, past = await self._step([pick.token], past)
