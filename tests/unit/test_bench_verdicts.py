"""Benchmark verdicts over several rounds: the median decides, every round is shown."""

from __future__ import annotations

from benchmarks import gpu_engines, serving, vllm_serving


def _row(c: int, tok_s: float, ttft_ms: float = 50.0, **extra) -> dict:
    return {
        "concurrency": c,
        "output_token_throughput": tok_s,
        "ttft_ms_p50": ttft_ms,
        "requests": 16,
        "errors": 0,
        "wall_s": 16 * 64 / tok_s,  # every request made 64 tokens
        "request_throughput": 16 / (16 * 64 / tok_s),
        "tpot_ms_p50": 20.0,
        "e2e_ms_p50": 1500.0,
        **extra,
    }


def _serving_round(engine16: float, served16: float, served_ttft1: float) -> dict:
    return {
        "engine": [_row(1, 50, 60), _row(16, engine16)],
        "served": [_row(1, 45, served_ttft1), _row(16, served16)],
        "beside": [],
    }


def test_serving_targets_are_judged_on_the_median_round():
    rounds = [
        _serving_round(300, 240, 90),  # 0.80, c16/c1 5.33, +30 ms
        _serving_round(300, 270, 70),  # 0.90, 6.00, +10 ms
        _serving_round(300, 264, 72),  # 0.88, 5.87, +12 ms
    ]
    lines = serving.verdicts(rounds)
    assert lines[0] == (
        "raydock throughput c16 / c1 = 5.87x (rounds: 5.33, 6.00, 5.87) (target >= 5x: met)"
    )
    assert lines[1].startswith("raydock / in-process throughput at c16 = 0.880 (rounds: 0.800")
    assert lines[1].endswith("(target >= 0.85: met)")
    assert lines[2].startswith("TTFT p50 added by serving at c1 = 12.0 ms")
    assert lines[2].endswith("(target <= 15 ms: met)")

    one = serving.verdicts(rounds[:1])
    assert one[1] == "raydock / in-process throughput at c16 = 0.800 (target >= 0.85: NOT met)"
    assert one[2] == "TTFT p50 added by serving at c1 = 30.0 ms (target <= 15 ms: NOT met)"


def _vllm_round(
    vllm16: float, raydock16: float, order=("vllm_serve", "raydock"), number: int = 1
) -> dict:
    side = {"vllm_serve": vllm_serving.VLLM_SIDE, "raydock": vllm_serving.RAYDOCK_SIDE}
    return {
        "round": number,
        "order": list(order),
        "vllm_serve": {"rows": [_row(16, vllm16, side=side["vllm_serve"])], "prompt_tokens": 73},
        "raydock": {"rows": [_row(16, raydock16, side=side["raydock"])], "prompt_tokens": 73},
    }


def test_vllm_side_by_side_verdict_is_the_median_ratio():
    rounds = [
        _vllm_round(800, 600),
        _vllm_round(700, 660, order=("raydock", "vllm_serve"), number=2),
        _vllm_round(750, 690, number=3),
    ]
    lines = vllm_serving.verdicts(rounds, max_tokens=64)
    assert lines == [
        "raydock / vllm serve output tok/s at c16 = 0.920, median of 3 round(s): "
        "0.750, 0.943, 0.920 (target >= 0.9: met)"
    ]
    table = vllm_serving.render(rounds)
    assert "| 2 | raydock (vllm) | 16 |" in table and "| 0.943 |" in table


def test_vllm_verdict_flags_short_outputs_and_prompt_mismatch():
    rnd = _vllm_round(800, 600)
    rnd["raydock"]["rows"][0]["wall_s"] /= 2  # as if every request stopped at 32 tokens
    rnd["raydock"]["prompt_tokens"] = 80
    lines = vllm_serving.verdicts([rnd], max_tokens=64)
    assert "raydock (vllm) c16: 32.00 output tokens per request, not 64" in lines
    assert any("prompt lengths differ" in line for line in lines)


def test_gpu_report_shows_each_engine_against_its_library_and_why_one_did_not_run():
    rows = [
        _row(64, 8000.0) | {"row": "hf generate", "device": "cuda", "rounds_tok_s": [8000.0]},
        _row(64, 3200.0)
        | {"row": "raydock transformers", "device": "cuda", "rounds_tok_s": [3200.0]},
    ]
    error = "RuntimeError: Library libcublas.so.12 is not found or cannot be loaded"
    record = {
        "environment": {"machine": "m", "torch": "t", "transformers": "x", "gpu": "NVIDIA H200"},
        "size": "small",
        "compute_type": "int8_float16",
        "max_tokens": 128,
        "rounds": 1,
        "rows": rows,
        "errors": {"ctranslate2": error},
        "checks": {},
    }
    md = gpu_engines.render(record)
    assert "| raydock transformers | cuda | 64 |" in md and "| 0.40x |" in md
    assert f"**ctranslate2 did not run**: `{error}`" in md
