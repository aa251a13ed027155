"""Hugging Face transformers engine with continuous batching (CPU or CUDA).

One scheduler loop per replica decodes every running sequence in a single batched forward
pass. Between two steps, finished and cancelled sequences leave the batch and waiting ones
join it (prefilled together in one left-padded pass, then merged into the batch's KV cache),
up to `max_batch_size` sequences.

All torch work runs on one executor thread; the event loop only queues requests and hands
out step events, so the replica stays responsive while the model computes.
"""

from __future__ import annotations

import asyncio
import warnings
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from raydock.model_memory import MAX_SERVING_CONTEXT, TRANSFORMERS_DTYPE, serving_context
from raydock.serve_apps.detok import TextTracker
from raydock.serve_apps.engines.base import (
    ADMITTED,
    StepEvent,
    TokenizerPrompts,
    append_token,
    drain_steps,
    eos_ids,
)
from raydock.serve_apps.guided import GuidedChecks, GuidedDecoder, Matcher
from raydock.serve_apps.sampling import SamplingParams, choose, make_generator


@dataclass(eq=False)
class _Seq:
    prompt: list[int]
    params: SamplingParams
    tracker: TextTracker
    generator: torch.Generator
    budget: int
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    produced: int = 0
    pending: int = -1  # sampled token not yet fed to the model
    length: int = 0  # real (unpadded) tokens in the KV cache
    guide: Matcher | None = None  # structured output: the allowed tokens of each step
    adapter: str | None = None  # a LoRA adapter applied to this sequence only
    output: list[int] = field(default_factory=list)  # chosen so far (for penalties)
    done: bool = False
    cancelled: bool = False


# Prefill passes stay under this many (padded) prompt tokens; larger bursts take several.
PREFILL_TOKENS = 4096


#: PEFT's name for "no adapter" in a mixed batch
_BASE = "__base__"


class TransformersEngine(TokenizerPrompts, GuidedChecks):
    unsupported_params: ClassVar[frozenset[str]] = frozenset()
    supports_adapters: ClassVar[bool] = True

    def __init__(
        self,
        model_dir: str,
        device: str = "cpu",
        num_threads: int | None = None,
        max_batch_size: int = 8,
    ):
        if num_threads:
            torch.set_num_threads(num_threads)
        path = Path(model_dir)
        self.device = device if device != "cuda" or torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        dtype = getattr(torch, TRANSFORMERS_DTYPE[self.device])
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device)
        self.model.eval()
        self.eos = eos_ids(path, self.tokenizer)
        # any id will do for left padding: the attention mask hides it
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(self.eos), 0)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_context = serving_context(int(limit or MAX_SERVING_CONTEXT))
        self.max_batch_size = max_batch_size
        self.guided = GuidedDecoder(self.tokenizer, self.eos, self.model.config.vocab_size)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # touched only on the executor thread
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [batch, cache length], 0 = left padding
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        # LoRA adapters (PEFT, injected into self.model on the first load), touched only on
        # the executor thread: id -> directory of those loaded or once loaded, and those
        # released (evicted) but still used by a sequence
        self._peft: Any = None
        self._adapter_dirs: dict[str, str] = {}
        self._loaded: set[str] = set()
        self._releasing: set[str] = set()
        self.counters = {
            "finished": 0,
            "cancelled": 0,
            "steps": 0,
            "max_batch": 0,
            "prefill_passes": 0,
        }

    def stats(self) -> dict[str, Any]:
        return {
            "running": len(self._running),
            # cancelled ones leave the queue when the scheduler next looks: not waiting any more
            "waiting": sum(not s.cancelled for s in self._waiting),
            "maxBatchSize": self.max_batch_size,
            "adapters": sorted(self._loaded),
            **self.counters,
        }

    # ------------------------------------------------------------------ adapters

    async def load_adapter(self, adapter_id: str, adapter_dir: str) -> None:
        """Load a PEFT LoRA adapter under `adapter_id` (between two decode steps)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load_adapter, adapter_id, adapter_dir)

    def release_adapter(self, adapter_id: str) -> None:
        """Unload `adapter_id` once no sequence uses it (thread-safe: Serve's multiplexer
        calls this from a worker thread when it evicts the adapter)."""
        self._executor.submit(self._release_adapter, adapter_id)

    def _load_adapter(self, adapter_id: str, adapter_dir: str | None = None) -> None:
        from peft import PeftModel

        if adapter_dir is not None:
            self._adapter_dirs[adapter_id] = adapter_dir
        self._releasing.discard(adapter_id)
        if adapter_id in self._loaded:
            return
        path = self._adapter_dirs[adapter_id]
        if self._peft is None:  # wraps self.model, injecting LoRA layers into it in place
            self._peft = PeftModel.from_pretrained(self.model, path, adapter_name=adapter_id)
            self._peft.eval()
        else:
            self._peft.load_adapter(path, adapter_name=adapter_id)
        self._loaded.add(adapter_id)

    def _release_adapter(self, adapter_id: str) -> None:
        self._releasing.add(adapter_id)
        self._unload_unused()

    def _unload_unused(self) -> None:
        """Unload released adapters that no running or waiting sequence uses any more."""
        if not self._releasing:
            return
        used = {s.adapter for s in (*self._running, *list(self._waiting))}
        for adapter_id in self._releasing - used:
            self._releasing.discard(adapter_id)
            if adapter_id in self._loaded:
                self._loaded.discard(adapter_id)
                with warnings.catch_warnings():  # "… was active, now deleted": by design
                    warnings.simplefilter("ignore")
                    self._peft.delete_adapter(adapter_id)

    def _forward(self, adapters: list[str | None], **inputs: Any):
        """The model's forward pass; each row with its own adapter (None: the plain base).
        With no adapter loaded, the LoRA layers PEFT injected hold nothing: the base alone."""
        if not self._loaded:
            return self.model(**inputs)
        used = set(adapters)
        for adapter_id in used - self._loaded - {None}:
            self._load_adapter(adapter_id)  # released and unloaded, then asked for again
        if len(used) > 1:  # PEFT's mixed batch: each adapter on its rows
            return self._peft(**inputs, adapter_names=[a or _BASE for a in adapters])
        # one adapter (or none) for the whole batch: PEFT's plain forward, without the mixed
        # batch's per-layer hooks and row gathers (c16 with one adapter: 0.79 -> 0.88 of the
        # base's tokens/s, benchmarks.adapters)
        (only,) = used
        if only is None:
            with self._peft.disable_adapter():
                return self._peft(**inputs)
        if self._peft.active_adapter != only:
            self._peft.set_adapter(only)
        return self._peft(**inputs)

    # ------------------------------------------------------------------ public API

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        regex: str | None = None,
        grammar: str | None = None,
        adapter: str | None = None,
        announce_admission: bool = False,
    ) -> AsyncIterator[list[StepEvent]]:
        """Stream one sequence's steps; with `regex` or a Lark / GBNF `grammar`, the output
        is constrained to match it; with `adapter` (loaded by `load_adapter`), that LoRA
        adapter applies to this sequence; with `announce_admission`, an empty list first
        when it joins the batch (`Engine.generate`).

        Steps that are ready together come as one list, so a slow reader catches up in one go.
        """
        guide = await self._matcher(regex, grammar)
        seq = _Seq(
            guide=guide,
            adapter=adapter,
            prompt=list(prompt_ids),
            params=params,
            tracker=TextTracker(self._decode, params.stop, list(prompt_ids)),
            generator=make_generator(params.seed),
            budget=min(params.max_tokens, self.max_context - len(prompt_ids)),
        )
        self._waiting.append(seq)
        self._start()
        try:
            async for ready in drain_steps(seq.out, announce_admission):
                yield ready
        finally:
            if not seq.done:  # the caller went away: leave the batch at the next step
                seq.cancelled = True
                self._wake.set()

    def _start(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._schedule())
        self._wake.set()

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            admit: list[_Seq] = []
            while self._waiting and len(self._running) + len(admit) < self.max_batch_size:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    self.counters["cancelled"] += 1
                else:
                    admit.append(seq)
                    seq.out.put_nowait(ADMITTED)  # prefilled in the step below
            if not admit and not self._running:  # only cancelled ones were waiting
                continue
            try:
                emitted = await loop.run_in_executor(self._executor, self._step, admit)
            except Exception as exc:  # fail every sequence in flight; start clean
                for seq in [*self._running, *admit]:
                    seq.done = True
                    seq.out.put_nowait(exc)
                self._running, self._cache, self._mask = [], None, None
                continue
            for seq, ev in emitted:
                seq.out.put_nowait(ev)

    # ------------------------------------------------------------------ one step (executor)

    @torch.inference_mode()
    def _step(self, admit: list[_Seq]) -> list[tuple[_Seq, StepEvent]]:
        events: list[tuple[_Seq, StepEvent]] = []
        self._drop(lambda s: s.cancelled, "cancelled")
        if self._running:
            logits = self.guided.apply(self._decode_running(), [s.guide for s in self._running])
            for i, seq in enumerate(self._running):
                events.append((seq, self._advance(seq, logits[i])))
        for group in self._prefill_groups(admit):
            logits, cache, mask = self._prefill(group)
            self.counters["prefill_passes"] += 1
            logits = self.guided.apply(logits, [s.guide for s in group])
            for i, seq in enumerate(group):
                events.append((seq, self._advance(seq, logits[i])))
            self._join(group, cache, mask)
        self._drop(lambda s: s.done, "finished")
        self._unload_unused()
        self.counters["steps"] += 1
        self.counters["max_batch"] = max(self.counters["max_batch"], len(self._running))
        return events

    def _advance(self, seq: _Seq, logits: torch.Tensor) -> StepEvent:
        """Sample one token for `seq` and describe what the client sees."""
        pick = choose(logits, seq.params, seq.generator, seq.prompt, seq.output)
        seq.output.append(pick.token)
        seq.pending = pick.token  # a sequence this finishes leaves before the next decode
        return append_token(seq, pick.token, pick.logprob, pick.top, self.eos, self.tokenizer)

    @staticmethod
    def _prefill_groups(admit: list[_Seq]) -> list[list[_Seq]]:
        """Admitted sequences in groups prefilled together, each at most PREFILL_TOKENS
        (padded) tokens, so a burst of long prompts cannot exhaust memory in one pass."""
        groups: list[list[_Seq]] = []
        for seq in sorted(admit, key=lambda s: len(s.prompt)):
            group = groups[-1] if groups else None
            if group and (len(group) + 1) * len(seq.prompt) <= PREFILL_TOKENS:
                group.append(seq)
            else:
                groups.append([seq])
        return groups

    def _prefill(self, group: list[_Seq]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """One forward pass over left-padded prompts: each one's next-token logits, the
        batch's KV cache and its mask (0 = padding)."""
        prompts = [s.prompt for s in group]
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward(
            [s.adapter for s in group],
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
        )
        return out.logits[:, -1].float().cpu(), out.past_key_values, mask.to(self.device)

    def _decode_running(self) -> torch.Tensor:
        batch = self._running
        ids = torch.tensor([[s.pending] for s in batch], device=self.device)
        mask = F.pad(self._mask, (0, 1), value=1)
        positions = torch.tensor([[s.length] for s in batch], device=self.device)
        width = self._mask.shape[1]
        out = self._forward(
            [s.adapter for s in batch],
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache_position=torch.tensor([width], device=self.device),
            past_key_values=self._cache,
            use_cache=True,
        )
        self._cache, self._mask = out.past_key_values, mask
        for s in batch:
            s.length += 1
        return out.logits[:, -1].float().cpu()

    def _join(self, group: list[_Seq], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Merge prefilled sequences' KV cache into the batch (left-padding the narrower),
        keeping only those still generating."""
        keep = [i for i, s in enumerate(group) if not s.done]
        self.counters["finished"] += len(group) - len(keep)
        if not keep:
            return
        if len(keep) < len(group):
            index = torch.tensor(keep, device=self.device)
            mask = mask[index]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
        joining = [group[i] for i in keep]
        for seq in joining:
            seq.length = len(seq.prompt)
        if self._cache is None:
            self._cache, self._mask = cache, mask
            self._running.extend(joining)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        pad_old, pad_new = width - self._mask.shape[1], width - mask.shape[1]
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat(
                [F.pad(old.keys, (0, 0, pad_old, 0)), F.pad(new.keys, (0, 0, pad_new, 0))]
            )
            old.values = torch.cat(
                [F.pad(old.values, (0, 0, pad_old, 0)), F.pad(new.values, (0, 0, pad_new, 0))]
            )
        self._mask = torch.cat([F.pad(self._mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])
        self._running.extend(joining)

    def _drop(self, leaving, counter: str) -> None:
        """Remove sequences from the batch, then trim padding no sequence needs any more."""
        keep = [i for i, s in enumerate(self._running) if not leaving(s)]
        if len(keep) == len(self._running):
            return
        self.counters[counter] += len(self._running) - len(keep)
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self.device)
        self._mask = self._mask[index]
        start = int((self._mask.sum(0) > 0).nonzero()[0])
        self._mask = self._mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
