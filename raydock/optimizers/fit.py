"""Whether a model fits a deviceType: weights, KV cache and runtime against its memory.

Asked before a deploy is accepted (a 400 that gives the estimate and the device's memory),
by the deploy form (the smallest deviceType that fits) and by the catalog (which deviceTypes
each entry fits), all from `config.json` figures, so nothing is downloaded to know.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raydock.errors import ApiError
from raydock.model_memory import DTYPE_BYTES, TRANSFORMERS_DTYPE, ModelShape, kv_cache_bytes
from raydock.optimizers.parallel import parallelism
from raydock.optimizers.plan import EnginePlan

GiB = 2**30
#: Memory a replica uses beyond weights and KV cache: the CUDA context and activations on a
#: GPU, the interpreter and libraries on a CPU; plus a share of the weights for activations.
RUNTIME_BYTES = {"cuda": 1 * GiB, "cpu": GiB // 2}
ACTIVATION_SHARE = 0.05
#: Bytes per weight of a CTranslate2 compute type.
_CT2_BYTES = {"int8": 1, "int8_float32": 1, "int8_float16": 1, "int8_bfloat16": 1, "int16": 2}


def _weight_bytes(plan: EnginePlan, device: str, config: dict) -> float:
    """Bytes per weight as the engine holds them."""
    if plan.engine == "transformers":
        return DTYPE_BYTES[TRANSFORMERS_DTYPE[device]]
    if plan.engine == "ctranslate2":
        if plan.quantization in _CT2_BYTES:
            return _CT2_BYTES[plan.quantization]
        return DTYPE_BYTES.get(plan.quantization, 4 if device == "cpu" else 2)
    if plan.quantization in ("awq", "gptq"):  # 4-bit groups of 128 with a scale and zero each
        bits = (config.get("quantization_config") or {}).get("bits", 4)
        return bits / 8 * 1.03
    if plan.quantization == "fp8":
        return 1
    return 2  # vLLM's "auto" dtype: float16 or bfloat16, also for float32 checkpoints


def _kv_width(plan: EnginePlan, device: str) -> int:
    if plan.engine == "transformers":
        return DTYPE_BYTES[TRANSFORMERS_DTYPE[device]]
    return 2


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    runtime: int
    available: int
    where: str  # what `available` is, e.g. "1 A10G GPU (24 GiB)"
    sequences: int
    context: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.runtime

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    def to_dict(self) -> dict[str, Any]:
        gib = lambda n: round(n / GiB, 2)  # noqa: E731
        return {
            "fits": self.fits,
            "requiredGiB": gib(self.total),
            "weightsGiB": gib(self.weights),
            "kvCacheGiB": gib(self.kv_cache),
            "runtimeGiB": gib(self.runtime),
            "availableGiB": gib(self.available),
            "memory": self.where,
            "kvCacheFor": f"{self.sequences} sequences of {self.context} tokens",
        }

    def describe(self) -> str:
        d = self.to_dict()
        return (
            f"about {d['requiredGiB']} GiB (weights {d['weightsGiB']} GiB + KV cache "
            f"{d['kvCacheGiB']} GiB for {d['kvCacheFor']} + runtime {d['runtimeGiB']} GiB)"
        )


def _available(profile: dict[str, Any], engine: str) -> tuple[int, str]:
    if profile.get("num_gpus"):
        # vLLM splits the model over the profile's GPUs (optimizers.parallel); the other
        # engines use one of them
        used = parallelism(engine, profile).devices
        per_gpu = float(profile.get("gpu_memory_gb") or 16)
        acc = profile.get("accelerator_type") or "GPU"
        many = profile["num_gpus"] > used
        where = f"{used} {acc} GPU{'s' if used > 1 else ''} ({per_gpu:g} GiB each)" + (
            f", of its {profile['num_gpus']}: the {engine} engine uses {used}" if many else ""
        )
        return int(per_gpu * used * GiB), where
    memory = float(profile.get("memory_gb") or 0)
    return int(memory * GiB), f"{memory:g} GiB of memory"


def estimate(
    config: dict[str, Any],
    plan: EnginePlan,
    profile: dict[str, Any],
    max_batch_size: int,
    parameters: int | None = None,
) -> Estimate:
    """The memory one replica needs for a model (its config.json figures; `parameters` as
    counted from its weights when known) on `profile`. ValueError when a figure is missing."""
    shape = ModelShape.from_config(config)
    device = profile.get("device", "cpu")
    weights = int((parameters or shape.parameters()) * _weight_bytes(plan, device, config))
    context = shape.serving_context()
    kv = kv_cache_bytes(shape, context, max_batch_size, _kv_width(plan, device))
    runtime = RUNTIME_BYTES[device] + int(ACTIVATION_SHARE * weights)
    available, where = _available(profile, plan.engine)
    return Estimate(weights, kv, runtime, available, where, max_batch_size, context)


def by_device(
    config: dict[str, Any],
    plans: dict[str, EnginePlan],
    profiles: dict[str, dict[str, Any]],
    max_batch_size: int,
    parameters: int | None = None,
) -> dict[str, Estimate]:
    """The estimate on every deviceType (`plans`: the engine plan each would run)."""
    return {
        name: estimate(config, plans[name], profile, max_batch_size, parameters)
        for name, profile in profiles.items()
        if name in plans
    }


def smallest_fit(estimates: dict[str, Estimate], profiles: dict[str, dict[str, Any]]) -> str | None:
    """The deviceType with the least memory that holds the model; at a tie the one with the
    fewest GPUs, then the least host memory (the cheapest)."""

    def cost(name: str) -> tuple:
        p = profiles[name]
        return (estimates[name].available, p.get("num_gpus", 0), p.get("memory_gb", 0), name)

    fitting = [name for name, e in estimates.items() if e.fits]
    return min(fitting, key=cost) if fitting else None


class DoesNotFit(ApiError):
    def __init__(self, message: str, estimate: Estimate):
        super().__init__(400, message, "deviceType", "insufficient_memory")
        self.estimate = estimate


def check(
    config: dict[str, Any] | None,
    plan: EnginePlan,
    device_type: str,
    profile: dict[str, Any],
    max_batch_size: int,
    parameters: int | None = None,
    suggest: Callable[[], str | None] = lambda: None,
) -> Estimate | None:
    """Raise DoesNotFit (400, naming deviceType and, from `suggest`, the smallest that fits)
    when the model cannot fit; None when its figures are unknown (a model imported before
    raydock recorded them)."""
    if not config:
        return None
    try:
        est = estimate(config, plan, profile, max_batch_size, parameters)
    except ValueError:
        return None
    if not est.fits:
        smallest = suggest()
        hint = f"; the smallest deviceType that fits is {smallest!r}" if smallest else ""
        raise DoesNotFit(
            f"the model needs {est.describe()} on deviceType {device_type!r}, which has "
            f"{est.where}{hint}; choose a larger deviceType, a quantization, or a smaller "
            "maxBatchSize",
            est,
        )
    return est
