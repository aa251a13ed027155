"""CTranslate2 engine: a converted (optionally quantized) model behind the same interface as
the transformers engine.

Batching. CTranslate2 decodes a static batch per `generate_batch` call; sequences cannot
join a running call. The scheduler therefore runs one call ("run") at a time on an executor
thread with up to `max_batch_size` sequences; requests that arrive meanwhile wait and form
the next run. A per-step callback (on CTranslate2's worker thread) streams each token,
applies stop strings, EOS, budgets and cancellation, and returns True to stop a sequence
at once; a run ends when all its sequences stopped. CTranslate2 takes the sampling settings
per call, so a run only holds requests with the same temperature / top-k / top-p (and
guided or not); the oldest waiting request picks the next run's settings. Prompts of
different lengths share a run, but CTranslate2 feeds the part of a longer prompt beyond the
shortest one token per step, so such a sequence starts generating that many steps later.

Seeds. CTranslate2 samples with one mt19937 per worker thread, seeded from the global
`set_random_seed` value the first time that thread samples and never again, so a request's
`seed` cannot make CTranslate2's sampling reproducible (greedy decoding is deterministic and
independent of batching). The engine's own `seed` argument sets that (process-wide) value
before the engine's worker thread exists: a fresh engine fed the same requests, batched the
same way, reproduces its sampled outputs. Request seeds drive the guided-decoding fallback
sampler only.

Logprobs. The chosen token's logprob comes from CTranslate2 (`return_scores`). Alternatives
(top_logprobs) come from the step's logits (`return_logits_vocab`); CTranslate2 hands a step's
logits over for the whole batch in its own row order, so requests with top_logprobs run one
sequence per run (no batching for them), in runs of at most LOGITS_RUN_STEPS steps because
CTranslate2 also keeps every step's logits until the call returns. Logprobs are the model's,
before temperature and before any guided mask; tokens forced by a guide carry logprob 0.0
(their probability under the constraint).

Guided decoding (rejection with fallback; CTranslate2 has no logits hook). CTranslate2
samples freely; a sampled token the sequence's llguidance matcher allows is accepted (it
advances); a disallowed one is discarded and the sequence stops in that run. After the run,
the engine takes that step's logits (guided runs keep them: `return_logits_vocab`, at most
LOGITS_RUN_STEPS steps and LOGITS_BUDGET bytes, otherwise one prefill of the prefix before the
next run), applies CTranslate2's top-k/top-p/temperature filter, masks it to the allowed tokens
and samples with the request's seeded generator; the sequence resumes in the next run.
Sampling from p and accepting iff allowed, else sampling from p restricted to the allowed set,
yields exactly p restricted to the allowed set (when top-k/top-p leave no allowed token, the
filter is applied to the allowed tokens alone); greedy decoding picks the best allowed token,
exactly like the transformers engine's masked argmax. Tokens the grammar forces (its
fast-forward tokens) are appended without calling the model; EOS is only allowed in a final
state, and a grammar that can only end finishes the sequence with "stop". A guided run ends
once half its sequences wait for a fallback, so they are not held back by the others. The
price is one re-prefill of the run per rejection round: small when the model mostly follows
the format (the usual case for a prompted model), large for a model that ignores it (the random test
models reject most tokens).

Shutdown. CTranslate2's worker thread releases the step callback (which takes the GIL) only
after `generate_batch` returned; the engine waits for that after every run, because a worker
thread taking the GIL while the interpreter exits aborts the process.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import ctranslate2
import numpy as np
import torch
from transformers import AutoTokenizer

from raydock.model_memory import serving_context
from raydock.optimizers.ctranslate2 import MANIFEST, NO_QUANTIZATION
from raydock.serve_apps.detok import TextTracker
from raydock.serve_apps.engines.base import (
    ADMITTED,
    StepEvent,
    TokenizerPrompts,
    append_token,
    budget_end,
    drain_steps,
    end_event,
    eos_ids,
)
from raydock.serve_apps.guided import GuidedChecks, GuidedDecoder, Matcher
from raydock.serve_apps.sampling import (
    LOGIT_ADJUSTMENTS,
    SamplingParams,
    _filter,
    choose,
    make_generator,
)

# CTranslate2 keeps every step's logits of a call that returns them (steps x vocab floats per
# sequence): such calls (guided, top_logprobs) stop after this many steps and resume, and a
# guided call only asks for them while they fit in LOGITS_BUDGET bytes.
LOGITS_RUN_STEPS = 64
LOGITS_BUDGET = 256 * 2**20


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _max_context(model_dir: Path, tokenizer) -> int:
    manifest = _read_json(model_dir / MANIFEST)
    if isinstance(manifest.get("maxContext"), int):
        return manifest["maxContext"]
    hf = _read_json(model_dir / "hf_config.json")
    if isinstance(hf.get("max_position_embeddings"), int):
        return hf["max_position_embeddings"]
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else 2048


def _filter_then_mask(
    logits: torch.Tensor, allowed: torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    """CTranslate2's sampling distribution (top-k / top-p on the temperature-scaled logits)
    restricted to the allowed tokens; when the filter leaves no allowed token, the filter is
    applied to the allowed tokens alone. Returns logits for `choose` at temperature 1."""
    masked = logits.masked_fill(~allowed, float("-inf"))
    if params.temperature <= 1e-5 or params.top_k == 1:
        return masked  # greedy: the best allowed token
    scaled = logits / params.temperature
    kept = _filter(scaled, params.top_k, params.top_p).masked_fill(~allowed, float("-inf"))
    if torch.isfinite(kept).any():
        return kept
    return _filter(masked / params.temperature, params.top_k, params.top_p)


_SAMPLE = SamplingParams(max_tokens=1, temperature=1.0)  # on already filtered logits
_GREEDY = SamplingParams(max_tokens=1, temperature=0.0)


class _Outbox:
    """Events on their way from CTranslate2's threads to the consumers on one event loop: one
    wake-up of the loop carries every event queued since the last. (A wake-up per sequence
    and token cost more than the rest of a step's Python at batch 64.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, StepEvent | BaseException]] = []
        self._lock = threading.Lock()

    def put(self, out: asyncio.Queue, ev: StepEvent | BaseException) -> None:
        """Queue `ev` for `out`; RuntimeError when the loop is closed."""
        with self._lock:
            self._items.append((out, ev))
            if len(self._items) > 1:
                return  # the wake-up the first of them asked for delivers this one too
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            with self._lock:
                self._items.clear()
            raise

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for out, ev in items:
            out.put_nowait(ev)


@dataclass(eq=False)
class _Seq:
    order: int  # arrival order: the oldest waiting sequence picks the next run
    prompt: list[int]
    params: SamplingParams
    tracker: TextTracker
    generator: torch.Generator  # guided fallback sampling (seeded by the request)
    budget: int
    key: tuple
    outbox: _Outbox
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)  # generated so far (the prefix's tail)
    produced: int = 0
    guide: Matcher | None = None
    needs_sample: bool = False  # guided: its free sample was rejected; sample from the mask
    paused: bool = False  # stopped by us in this run, to resume in the next one
    done: bool = False
    cancelled: bool = False


@dataclass(eq=False)
class _Run:
    seqs: list[_Seq]
    live: int = 0
    paused: int = 0
    calls: list[int] = field(default_factory=list)  # callbacks per sequence
    stop_all: bool = False
    last_step: int = -1
    error: BaseException | None = None


class CTranslate2Engine(TokenizerPrompts, GuidedChecks):
    # CTranslate2 samples inside generate_batch with no logits hook, and its own
    # repetition_penalty counts a different history (not the prompt, and not across the
    # runs a sequence resumes in), so the engine refuses these instead of bending them
    unsupported_params: ClassVar[frozenset[str]] = frozenset(LOGIT_ADJUSTMENTS)
    # no runtime LoRA: an adapter is merged into the base at conversion (its own deployment)
    supports_adapters: ClassVar[bool] = False

    def __init__(
        self,
        model_dir: str,
        device: str = "cpu",
        num_threads: int | None = None,
        max_batch_size: int = 8,
        compute_type: str = "default",
        seed: int | None = None,
    ):
        path = Path(model_dir)
        if not (path / "model.bin").is_file():
            raise ValueError(
                f"{path} is not a CTranslate2 model directory (no model.bin); convert it with "
                "raydock.optimizers.ctranslate2.convert"
            )
        if device == "cuda" and ctranslate2.get_cuda_device_count() == 0:
            device = "cpu"
        self.device = device
        if compute_type in NO_QUANTIZATION:
            compute_type = "float32"
        if seed is not None:
            # read by CTranslate2's worker thread when it first samples (see the module doc)
            ctranslate2.set_random_seed(seed)
        self.generator = ctranslate2.Generator(
            str(path),
            device=device,
            compute_type=compute_type,
            inter_threads=1,
            intra_threads=num_threads or 0,
        )
        self.compute_type = compute_type
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.vocab: list[str] = json.loads((path / "vocabulary.json").read_text())
        self.eos = eos_ids(path, self.tokenizer)
        self.max_context = serving_context(_max_context(path, self.tokenizer))
        self.max_batch_size = max_batch_size
        self.guided = GuidedDecoder(self.tokenizer, self.eos, len(self.vocab))
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ct2-engine")
        self._order = itertools.count()
        self._waiting: list[_Seq] = []  # touched only on the event loop
        self._current: _Run | None = None  # the run in progress (executor thread)
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: _Outbox | None = None
        self._closing = False  # stop scheduling once nothing is left (close)
        self.counters = {
            "finished": 0,
            "cancelled": 0,
            "steps": 0,
            "max_batch": 0,
            "runs": 0,
            "guided_rejected": 0,
            "guided_forced": 0,
            "guided_prefills": 0,
        }

    def stats(self) -> dict[str, Any]:
        return {
            "running": self._current.live if self._current is not None else 0,
            # cancelled ones leave the queue when the scheduler next looks: not waiting any more
            "waiting": sum(not s.cancelled for s in self._waiting),
            "maxBatchSize": self.max_batch_size,
            "computeType": self.compute_type,
            **self.counters,
        }

    # ------------------------------------------------------------------ public API

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        regex: str | None = None,
        grammar: str | None = None,
        announce_admission: bool = False,
    ) -> AsyncIterator[list[StepEvent]]:
        """Stream one sequence's steps; with `regex` or a Lark / GBNF `grammar`, the output
        is constrained to match it; with `announce_admission`, an empty list first when a run
        takes it (`Engine.generate`).

        Steps that are ready together come as one list, so a slow reader catches up in one go.
        """
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < len(self.vocab) for t in prompt):
            raise ValueError(f"prompt token ids must lie in [0, {len(self.vocab)})")
        guide = await self._matcher(regex, grammar)
        seq = _Seq(
            order=next(self._order),
            guide=guide,
            prompt=prompt,
            params=params,
            tracker=TextTracker(self._decode, params.stop, prompt),
            generator=make_generator(params.seed),
            budget=min(params.max_tokens, self.max_context - len(prompt)),
            key=self._key(params, guide is not None),
            outbox=self._outbox_of(asyncio.get_running_loop()),
        )
        if seq.budget <= 0:
            seq.done = True
            yield [StepEvent("", [], [], "length", len(prompt), 0)]
            return
        self._waiting.append(seq)
        self._start()
        try:
            async for ready in drain_steps(seq.out, announce_admission):
                yield ready
        finally:
            if not seq.done:  # the caller went away: stop at its next step
                seq.cancelled = True
                if self._wake is not None:
                    self._wake.set()

    def _outbox_of(self, loop: asyncio.AbstractEventLoop) -> _Outbox:
        """The outbox for `loop`'s consumers (a sequence keeps its own, if the loop changes)."""
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = _Outbox(loop)
        return self._outbox

    @staticmethod
    def _key(params: SamplingParams, guided: bool) -> tuple:
        """Requests with equal keys can share a run (CTranslate2 samples per call)."""
        if params.temperature <= 1e-5 or params.top_k == 1:
            sampling: tuple = ("greedy",)
        else:
            sampling = ("sample", params.temperature, params.top_k, params.top_p)
        return (*sampling, guided, bool(params.logprobs and params.top_logprobs))

    # ------------------------------------------------------------------ scheduling (loop)

    def _start(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            self._loop_task = self._loop.create_task(self._schedule())
        self._wake.set()

    def close(self) -> None:
        """Let the engine go once its sequences finish (thread-safe): the scheduler stops,
        so nothing keeps the engine, and its model, alive."""
        self._closing = True
        if self._loop is not None and self._loop_task is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _take(self) -> list[_Seq]:
        """The next run: the oldest waiting sequence and the next ones with its key."""
        keep = []
        for seq in self._waiting:
            if seq.cancelled:
                self.counters["cancelled"] += 1
            else:
                keep.append(seq)
        keep.sort(key=lambda s: s.order)
        if not keep:
            self._waiting = []
            return []
        key = keep[0].key
        # top_logprobs read the step's batch logits: CTranslate2 hands them over in its own
        # row order, unambiguous only for a run of one sequence
        size = 1 if key[-1] else self.max_batch_size
        batch = [s for s in keep if s.key == key][:size]
        chosen = set(map(id, batch))
        self._waiting = [s for s in keep if id(s) not in chosen]
        for seq in batch:
            seq.out.put_nowait(ADMITTED)  # its prompt is (re)computed in this run
        return batch

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._take()
            if not batch:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as exc:  # fail the run's sequences; the engine carries on
                for seq in batch:
                    if not seq.done:
                        seq.done = True
                        self._emit(seq, exc)
                continue
            for seq in batch:
                if seq.done:
                    continue
                if seq.cancelled:
                    self.counters["cancelled"] += 1
                else:  # paused (guided rejection, step limit): resume in a later run
                    self._waiting.append(seq)

    def _emit(self, seq: _Seq, ev: StepEvent | BaseException) -> None:
        """Hand an event to the sequence's consumer (callable from any thread)."""
        try:
            seq.outbox.put(seq.out, ev)
        except RuntimeError:  # its event loop is gone: nobody is listening
            seq.cancelled = True

    # ------------------------------------------------------------------ one run (executor)

    def _run(self, batch: list[_Seq]) -> None:
        guided = batch[0].guide is not None
        if guided:
            self._prepare_guided(batch)
        seqs = [s for s in batch if not s.done and not s.cancelled]
        if not seqs:
            return
        run = _Run(seqs, live=len(seqs), calls=[0] * len(seqs))
        params = seqs[0].params
        greedy = params.temperature <= 1e-5 or params.top_k == 1
        prompts = [[self.vocab[t] for t in s.prompt + s.tokens] for s in seqs]
        top_logprobs = bool(params.logprobs and params.top_logprobs)  # runs of one (see _take)
        steps = max(s.budget - s.produced for s in seqs)
        if guided or top_logprobs:
            steps = min(steps, LOGITS_RUN_STEPS)
        # rows CTranslate2 keeps per sequence: the part of its prompt beyond the shortest
        # (fed one token per step), then one per generated token
        shortest = min(map(len, prompts))
        rows = [len(p) - shortest + steps for p in prompts]
        want_logits = top_logprobs or (guided and sum(rows) * len(self.vocab) * 4 <= LOGITS_BUDGET)
        started = [s.produced for s in seqs]
        for seq in seqs:
            seq.paused = False
        self._current = run
        self.counters["runs"] += 1
        self.counters["max_batch"] = max(self.counters["max_batch"], len(seqs))

        def callback(step) -> bool:
            return self._on_step(run, step)

        # CTranslate2's worker thread drops its reference to the callback (which takes the
        # GIL) only after generate_batch has returned; wait for that, so no worker thread
        # ever needs the GIL while the interpreter exits (that aborts the process).
        released = threading.Event()
        weakref.finalize(callback, released.set)
        try:
            results = self.generator.generate_batch(
                prompts,
                max_length=steps,
                include_prompt_in_result=False,
                end_token=[],  # EOS is decided per sequence in the callback
                sampling_topk=1 if greedy else max(params.top_k, 0),
                sampling_topp=1.0 if greedy else params.top_p,
                sampling_temperature=1.0 if greedy else params.temperature,
                return_scores=any(s.params.logprobs for s in seqs),
                return_logits_vocab=want_logits,
                callback=callback,
            )
        finally:
            self._current = None
            del callback
            released.wait(5)
        if run.error is not None:
            raise run.error
        for i, (seq, before) in enumerate(zip(seqs, started, strict=True)):
            if seq.done or seq.cancelled:
                continue
            if seq.needs_sample and want_logits:
                # the rejected step's distribution is the last row CTranslate2 kept for it
                logits = np.asarray(results[i].logits[0]) if results[i].logits else None
                expected = len(prompts[i]) - shortest + run.calls[i]
                if logits is not None and logits.size == expected * len(self.vocab):
                    seq.needs_sample = False
                    last = logits.reshape(expected, -1)[-1]
                    self._sample_allowed(seq, torch.from_numpy(last.astype(np.float32)))
                continue  # otherwise the next run computes them (`_prepare_guided`)
            if seq.paused or seq.needs_sample:
                continue
            if before < seq.produced < seq.budget:
                seq.paused = True  # the call's step limit: resume in the next run
            else:  # CTranslate2 ended it without a token: do not loop on it
                seq.done = True
                tail, finish = budget_end(seq.tracker)
                self._finish(seq, StepEvent(tail, [], [], finish))

    def _on_step(self, run: _Run, step) -> bool:
        """CTranslate2's per-token callback (its worker thread). True stops the sequence."""
        try:
            seq = run.seqs[step.batch_id]
            run.calls[step.batch_id] += 1
            if step.step > run.last_step:
                run.last_step = step.step
                self.counters["steps"] += 1
            if seq.done or seq.paused:
                return True
            if seq.cancelled:
                run.live -= 1
                return True
            token = step.token_id
            if seq.guide is not None and not seq.guide.allows(token):
                self.counters["guided_rejected"] += 1
                seq.needs_sample = seq.paused = True
                run.live -= 1
                run.paused += 1
                if 2 * run.paused >= run.live + run.paused:
                    run.stop_all = True  # resume the paused half without waiting
                return True
            top: list[tuple[int, float]] = []
            if seq.params.logprobs and seq.params.top_logprobs and step.logits is not None:
                # the step's logits for the whole batch: a run of one sequence (see _take)
                logits = np.asarray(step.logits)
                if logits.shape and logits.shape[0] == 1:
                    logprobs = torch.log_softmax(torch.from_numpy(logits[0].copy()), -1)
                    values, ids = torch.topk(logprobs, seq.params.top_logprobs)
                    top = list(zip(ids.tolist(), values.tolist(), strict=True))
            ev = self._advance(seq, token, step.log_prob if step.log_prob is not None else 0.0, top)
            if not seq.done and seq.guide is not None and self._only_eos(seq):
                ev = self._merge(ev, end_event(seq))
            stop = seq.done or run.stop_all
            if stop:
                run.live -= 1
                seq.paused = not seq.done
            self._finish(seq, ev)
            return stop
        except BaseException as exc:  # surface errors from the run; stop everything
            run.error = run.error or exc
            run.stop_all = True
            return True

    def _advance(
        self, seq: _Seq, token: int, logprob: float, top: list[tuple[int, float]]
    ) -> StepEvent:
        """Append `token` to `seq` and describe what the client sees."""
        ev = append_token(seq, token, logprob, top, self.eos, self.tokenizer)
        if ev.token_ids:  # not an end token: part of the prefix a later run resumes from
            seq.tokens.append(token)
        return ev

    @staticmethod
    def _merge(first: StepEvent, last: StepEvent) -> StepEvent:
        return StepEvent(
            first.text + last.text,
            first.token_ids + last.token_ids,
            first.logprobs + last.logprobs,
            last.finish_reason,
            last.prompt_tokens,
            last.completion_tokens,
        )

    def _finish(self, seq: _Seq, ev: StepEvent) -> None:
        ev.prompt_tokens, ev.completion_tokens = len(seq.prompt), seq.produced
        if seq.done:
            self.counters["finished"] += 1
        self._emit(seq, ev)

    # ------------------------------------------------------------------ guided (executor)

    def _only_eos(self, seq: _Seq) -> bool:
        return self.guided.only_end(seq.guide)

    def _force(self, seq: _Seq) -> None:
        """Append the tokens the grammar forces without the model; end a sequence whose
        grammar can only end."""
        while not seq.done and not seq.cancelled:
            if self._only_eos(seq):
                self._finish(seq, end_event(seq))
                return
            forced = seq.guide.forced()
            if not forced:
                return
            for token in forced:
                if seq.done or seq.cancelled:
                    return
                self.counters["guided_forced"] += 1
                self._finish(seq, self._advance(seq, token, 0.0, []))

    def _prepare_guided(self, batch: list[_Seq]) -> None:
        """Before a guided run: forced tokens, and a masked sample (one prefill) for any
        sequence whose rejected step's logits were not kept."""
        for seq in batch:
            self._force(seq)
            if seq.needs_sample and not (seq.done or seq.cancelled):
                seq.needs_sample = False
                self.counters["guided_prefills"] += 1
                self._sample_allowed(seq, self._next_logits(seq.prompt + seq.tokens))

    def _sample_allowed(self, seq: _Seq, logits: torch.Tensor) -> None:
        """Append a token sampled from `logits` restricted to what the guide allows, then
        the tokens the guide forces."""
        allowed = self._allowed(seq, logits.shape[-1])
        greedy = seq.params.temperature <= 1e-5 or seq.params.top_k == 1
        pick = choose(
            _filter_then_mask(logits, allowed, seq.params),
            _GREEDY if greedy else _SAMPLE,
            seq.generator,
        )
        raw = torch.log_softmax(logits, -1)
        top: list[tuple[int, float]] = []
        if seq.params.logprobs and seq.params.top_logprobs:
            values, ids = torch.topk(raw, seq.params.top_logprobs)
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        self._finish(seq, self._advance(seq, pick.token, float(raw[pick.token]), top))
        self._force(seq)

    def _allowed(self, seq: _Seq, vocab: int) -> torch.Tensor:
        probe = torch.zeros(1, vocab)
        return torch.isfinite(self.guided.apply(probe, [seq.guide]))[0]

    def _next_logits(self, ids: list[int]) -> torch.Tensor:
        """Raw next-token logits after `ids` ([vocab], float32), one prefill."""
        result = self.generator.generate_batch(
            [[self.vocab[t] for t in ids]],
            max_length=1,
            include_prompt_in_result=False,
            end_token=[],
            sampling_topk=1,
            return_logits_vocab=True,
        )[0]
        return torch.from_numpy(np.array(result.logits[0], dtype=np.float32).reshape(-1))
