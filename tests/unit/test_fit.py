"""The memory estimate against real catalog models' config.json figures, with every number
derived by hand in the comments (GiB = 2**30 bytes)."""

from __future__ import annotations

import pytest

from raydock.config import hardware_profiles
from raydock.model_memory import ModelShape
from raydock.optimizers import fit
from raydock.optimizers.plan import EnginePlan
from raydock.platform import catalog, deploy_checks

GiB = 2**30
TRANSFORMERS = EnginePlan("transformers", "")


def entry(entry_id: str) -> dict:
    return catalog.get(entry_id)


def estimate(entry_id: str, plan: EnginePlan, device: str, batch: int = 10) -> fit.Estimate:
    e = entry(entry_id)
    return fit.estimate(e["config"], plan, hardware_profiles()[device], batch, e["parameters"])


def test_llama_3_1_8b_fp16_fits_an_a10g_not_a_t4():
    # weights: 8,030,261,248 params x 2 bytes (float16 on CUDA) = 16,060,522,496 B = 14.96 GiB
    # KV per token: 2 (k, v) x 32 layers x 8 kv heads x 128 head_dim x 2 bytes = 131,072 B;
    #   10 sequences x (2048 + 256) tokens = 23,040 tokens -> 3,019,898,880 B = 2.81 GiB
    # runtime: 1 GiB + 5 % of the weights (803,026,124 B) = 1,876,767,948 B = 1.75 GiB
    # total 20,957,189,324 B = 19.52 GiB: fits 24 GiB (A10G), not 16 GiB (T4)
    est = estimate("llama-3.1-8b-instruct", TRANSFORMERS, "g5.xlarge")
    assert est.weights == 16_060_522_496
    assert est.kv_cache == 3_019_898_880
    assert est.runtime == GiB + 803_026_124
    assert est.total == 20_957_189_324
    assert est.fits and est.available == 24 * GiB
    assert not estimate("llama-3.1-8b-instruct", TRANSFORMERS, "g4dn.xlarge").fits


def test_qwen2_5_0_5b_float32_on_cpu_needs_the_medium_profile():
    # weights: 494,032,768 x 4 bytes (float32 on CPU) = 1,976,131,072 B = 1.84 GiB
    # KV per token: 2 x 24 layers x 2 kv heads x 64 head_dim (896 / 14) x 4 bytes = 24,576 B
    #   x 23,040 tokens = 566,231,040 B = 0.53 GiB
    # runtime: 0.5 GiB + 5 % of the weights (98,806,553 B) = 635,677,465 B
    # total 3,178,039,577 B = 2.96 GiB: more than cpu-small's 2 GiB, less than cpu-medium's 4
    est = estimate("qwen2.5-0.5b-instruct", TRANSFORMERS, "cpu-small")
    assert est.weights == 1_976_131_072
    assert est.kv_cache == 566_231_040
    assert est.total == 3_178_039_577
    assert not est.fits
    assert estimate("qwen2.5-0.5b-instruct", TRANSFORMERS, "cpu-medium").fits


def test_llama_3_1_70b_awq_fits_one_l40s():
    # weights: 70,553,706,496 x 0.5 bytes (4-bit) x 1.03 (group scales and zeros)
    #   = 36,335,158,845 B = 33.84 GiB: more than an A10G's 24 GiB
    # KV per token: 2 x 80 layers x 8 kv heads x 128 x 2 bytes = 327,680 B x 23,040 tokens
    #   = 7,549,747,200 B = 7.03 GiB
    # runtime: 1 GiB + 5 % of the weights (1,816,757,942 B)
    # total 46,775,405,811 B = 43.56 GiB: fits the L40S's 48 GiB
    awq = EnginePlan("vllm", "awq")
    est = estimate("llama-3.1-70b-instruct", awq, "g6e.xlarge")
    assert est.weights == 36_335_158_845
    assert est.kv_cache == 7_549_747_200
    assert est.total == 46_775_405_811
    assert est.fits
    assert not estimate("llama-3.1-70b-instruct", awq, "g5.xlarge").fits
    # unquantized (2 bytes a weight: 131 GiB, ~146 GiB in all) it fits no single GPU raydock
    # offers, but vLLM splits it over 8 x 24 GiB: a g5.48xlarge (tensor parallel 8) or two
    # g5.12xlarge (4 x 2 pipeline stages)
    fits = {
        d
        for d, p in hardware_profiles().items()
        if p.get("num_gpus") and estimate("llama-3.1-70b-instruct", EnginePlan("vllm", ""), d).fits
    }
    assert fits == {"g5.48xlarge", "g5.12xlarge-x2"}
    big = estimate("llama-3.1-70b-instruct", EnginePlan("vllm", ""), "g5.48xlarge")
    assert big.available == 8 * 24 * 2**30 and big.where == "8 A10G GPUs (24 GiB each)"
    # transformers runs on one of the instance's GPUs
    one = estimate("llama-3.1-70b-instruct", EnginePlan("transformers", ""), "g5.48xlarge")
    assert one.available == 24 * 2**30


def test_gemma_2_9b_int8_fits_a_t4_only_with_a_smaller_batch():
    # weights: 9,241,705,984 x 1 byte (CTranslate2 int8) = 8.61 GiB
    # KV per token: 2 x 42 layers x 8 kv heads x 256 head_dim (set in config.json) x 2 bytes
    #   = 344,064 B; batch 10: x 23,040 tokens = 7,927,234,560 B = 7.38 GiB
    # runtime: 1 GiB + 462,085,299 B; total 18,704,767,667 B = 17.42 GiB > 16 GiB (T4)
    # batch 4: KV 344,064 x 9,216 = 3,170,893,824 B; total 13,948,426,931 B = 12.99 GiB: fits
    int8 = EnginePlan("ctranslate2", "int8")
    est = estimate("gemma-2-9b-it", int8, "g4dn.xlarge", batch=10)
    assert est.kv_cache == 7_927_234_560
    assert est.total == 18_704_767_667 and not est.fits
    small = estimate("gemma-2-9b-it", int8, "g4dn.xlarge", batch=4)
    assert small.total == 13_948_426_931 and small.fits


def test_smollm2_135m_on_the_smallest_cpu_profile_depends_on_the_batch():
    # weights: 134,515,008 x 4 bytes = 538,060,032 B
    # KV per token: 2 x 30 layers x 3 kv heads x 64 head_dim (576 / 9) x 4 bytes = 46,080 B
    # batch 10: 46,080 x 23,040 = 1,061,683,200 B; runtime 536,870,912 + 26,903,001 B
    #   total 2,163,517,145 B = 2.01 GiB: just over cpu-small's 2 GiB
    # batch 8: KV 46,080 x 18,432 = 849,346,560 B; total 1,951,180,505 B = 1.82 GiB: fits
    assert estimate("smollm2-135m-instruct", TRANSFORMERS, "cpu-small").total == 2_163_517_145
    assert not estimate("smollm2-135m-instruct", TRANSFORMERS, "cpu-small").fits
    small = estimate("smollm2-135m-instruct", TRANSFORMERS, "cpu-small", batch=8)
    assert small.total == 1_951_180_505 and small.fits


def test_mixtral_counts_every_expert():
    # 8 experts x 3 x 4096 x 14336 x 32 layers = 45,097,156,608 MLP weights alone; the model
    # card's 46.7B total: the estimate must not count one expert as Mixtral's "7B"
    shape = ModelShape.from_config(entry("mixtral-8x7b-instruct-v0.1")["config"])
    assert shape.experts == 8
    assert abs(shape.parameters() - 46_702_792_704) / 46_702_792_704 < 0.001


@pytest.mark.parametrize("e", catalog.entries(), ids=lambda e: e["id"])
def test_catalog_figures_agree_with_the_published_parameter_count(e):
    """The config figures reproduce the published size: a wrong layer count, width or vocab
    would make every estimate of the entry wrong."""
    computed = ModelShape.from_config(e["config"]).parameters()
    assert abs(computed - e["parameters"]) / e["parameters"] < 0.03, (computed, e["parameters"])


def test_the_catalog_is_large_and_varied():
    entries = catalog.entries()
    assert len(entries) >= 30
    families = {e["family"] for e in entries}
    assert {"llama", "qwen", "mistral", "gemma", "phi", "smollm"} <= families
    for e in entries:
        assert e["license"] and e["context_length"] > 0 and "/" in e["repo"]


def test_the_smallest_fit_is_the_cheapest_profile_that_holds_the_model():
    model = catalog.as_model(entry("llama-3.1-8b-instruct"))
    report = deploy_checks.fit_report(model, {}, 10)
    # fits every 24 GiB A10G profile and the L40S; the single-GPU A10G with least host memory
    assert report["suggestedDeviceType"] == "g5.xlarge"
    assert report["deviceTypes"]["g5.12xlarge"]["fits"]
    assert not report["deviceTypes"]["cpu-large"]["fits"]


def test_a_deploy_that_does_not_fit_names_the_field_the_estimate_and_the_way_out():
    model = catalog.as_model(entry("qwen2.5-0.5b-instruct"))
    config = {
        "deviceType": "cpu-small",
        "scalingParameters": {"maxBatchSize": 10},
        "optimizationInfo": {},
    }
    with pytest.raises(fit.DoesNotFit) as caught:
        deploy_checks.check_deploy(model, config)
    err = caught.value
    assert err.status == 400 and err.param == "deviceType"
    assert "2.96 GiB" in err.message and "2 GiB of memory" in err.message
    assert "'cpu-medium'" in err.message  # the smallest deviceType that fits
    assert deploy_checks.check_deploy(model, config | {"deviceType": "cpu-medium"})


def test_a_catalog_model_offers_only_the_optimizations_of_its_architecture():
    model = catalog.as_model(entry("mixtral-8x7b-instruct-v0.1"))  # no CTranslate2 loader
    config = {
        "deviceType": "g6e.xlarge",
        "scalingParameters": {"maxBatchSize": 1},
        "optimizationInfo": {"optimizationType": "ctranslate2", "quantizationType": "int8"},
    }
    with pytest.raises(Exception) as caught:
        deploy_checks.check_deploy(model, config)
    assert caught.value.param == "optimizationInfo.optimizationType"


def test_unknown_figures_skip_the_estimate():
    # a model imported before raydock recorded its figures deploys as before
    assert fit.check(None, TRANSFORMERS, "cpu-small", hardware_profiles()["cpu-small"], 10) is None
    with pytest.raises(ValueError, match="hidden_size"):
        ModelShape.from_config({"num_hidden_layers": 2})


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_a_4_bit_checkpoint_is_estimated_from_its_shape_not_its_packed_tensors(method):
    """AWQ/GPTQ pack eight 4-bit weights into each int32 of a qweight: the headers' element
    count is far below the weights (the estimate was ~4x too small, so a deploy that could not
    fit was accepted). The estimate counts the config's shape, as for any model."""
    from raydock.modelgen import cached_model_dir
    from raydock.optimizers import plan
    from raydock.platform.model_archive import inspect_model_dir

    meta = inspect_model_dir(cached_model_dir("tiny", quantization=method)).to_dict()
    shape = ModelShape.from_config(meta["config_figures"])
    assert meta["parameters"] < 0.8 * shape.parameters()  # what the headers count
    vllm = {"optimizationType": "vllm", "quantizationType": method}
    found = deploy_checks.estimates({"metadata": meta}, vllm, 1)
    assert found
    for device, est in found.items():
        profile = hardware_profiles()[device]
        engine = plan.check(vllm, device, profile, meta["quantization_config"])
        assert est.weights == fit.estimate(meta["config_figures"], engine, profile, 1).weights


# Ray places an actor or a task on one node and waits without end for one that fits: a
# cluster of two 2-CPU workers has 4 CPUs, yet no node for a 4-CPU replica.
TWO_SMALL_WORKERS = [
    {"CPU": 2.0, "memory": 17 * GiB},
    {"CPU": 2.0, "memory": 17 * GiB},
    {"CPU": 0.0, "memory": 17 * GiB},  # a head that runs no work
]


def test_a_replica_needs_its_resources_on_one_node():
    profiles = hardware_profiles()
    assert deploy_checks._placement_problem(profiles["cpu-medium"], TWO_SMALL_WORKERS) is None
    assert deploy_checks._placement_problem(profiles["cpu-large"], TWO_SMALL_WORKERS) == (
        "needs 4 CPUs on one node; the largest node has 2 CPUs"
    )
    # every resource on some node, never together
    split = [{"CPU": 4.0, "memory": 6 * GiB}, {"CPU": 2.0, "memory": 9 * GiB}]
    assert deploy_checks._placement_problem(profiles["cpu-large"], split) == (
        "needs 4 CPUs, 8 GiB memory together on one node; no node of the cluster has them all"
    )


def test_pipeline_stages_need_a_node_each():
    profile = hardware_profiles()["g5.12xlarge-x2"]  # 8 GPUs as 2 stages of 4
    assert deploy_checks.one_node_share(profile) == {
        "CPU": 48,
        "GPU": 4,
        "accelerator_type:A10G": 0.001,
        "memory": 192 * GiB,
    }
    node = {"CPU": 48.0, "GPU": 4.0, "accelerator_type:A10G": 1.0, "memory": 192 * GiB}
    assert deploy_checks._placement_problem(profile, [node, node]) is None
    assert deploy_checks._placement_problem(profile, [node]) == (
        "needs 48 CPUs, 4 GPUs, A10G GPUs, 192 GiB memory on each of 2 nodes; "
        "the cluster's nodes hold 1 such share(s)"
    )


def test_the_gpus_must_be_of_the_model_on_one_node():
    """Four T4s on one node and an A10G on another: the cluster has 4 GPUs and an A10G,
    yet no node holds 4 A10Gs (a g5.12xlarge replica would wait without end)."""
    nodes = [
        {"CPU": 48.0, "GPU": 4.0, "accelerator_type:T4": 1.0, "memory": 192 * GiB},
        {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A10G": 1.0, "memory": 32 * GiB},
    ]
    profiles = hardware_profiles()
    assert deploy_checks._placement_problem(profiles["g4dn.12xlarge"], nodes) is None
    assert "no node of the cluster has them all" in deploy_checks._placement_problem(
        profiles["g5.12xlarge"], nodes
    )
