"""Tests for raydock.modelgen.adapters (generated LoRA adapters) and for
raydock.platform.adapter_check.check_adapter_against_base (an adapter against its base)."""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from raydock.modelgen import cached_model_dir
from raydock.modelgen.adapters import (
    ADAPTER_FILES,
    ADAPTER_GENERATOR_VERSION,
    DROP,
    adapter_tensors,
    build_adapter_zip,
    cached_adapter_dir,
    default_base_name,
    generate_adapter,
    lora_tensor_name,
)
from raydock.platform.adapter_check import check_adapter_against_base
from raydock.platform.model_archive import ArchiveError, ArchiveLimits, extract_model_archive

torch = pytest.importorskip("torch")

PROMPTS = ("The quick brown fox", "<|user|>\nHello there<|end|>\n<|assistant|>\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base() -> Path:
    return cached_model_dir("tiny")


def _extract(tmp_path: Path, name: str = "adapter", **build) -> Path:
    """Build an adapter archive, extract it (the archive-only checks pass); its folder."""
    archive = build_adapter_zip(tmp_path / f"{name}.zip", build.pop("size", "tiny"), **build)
    dest = tmp_path / name
    meta = extract_model_archive(archive, dest, kind="adapter")
    assert meta.kind == "adapter" and meta.adapter is None
    return dest


def _lora(layer: int, module: str, a_shape: tuple, b_shape: tuple) -> dict[str, np.ndarray]:
    return {
        lora_tensor_name(layer, module, "A"): np.ones(a_shape, np.float32),
        lora_tensor_name(layer, module, "B"): np.ones(b_shape, np.float32),
    }


# ----------------------------------------------------------------------------- generator


def test_generator_is_deterministic(tmp_path: Path) -> None:
    first = generate_adapter(tmp_path / "a", "tiny", seed=3)
    second = generate_adapter(tmp_path / "b" / "nested", "tiny", seed=3)
    other = generate_adapter(tmp_path / "c", "tiny", seed=4)
    for name in ADAPTER_FILES:
        assert _sha256(first / name) == _sha256(second / name)
    assert _sha256(first / "adapter_config.json") == _sha256(other / "adapter_config.json")
    assert _sha256(first / "adapter_model.safetensors") != _sha256(
        other / "adapter_model.safetensors"
    )
    zip_a = build_adapter_zip(tmp_path / "a.zip", "tiny", 3, cache_root=tmp_path / "cache")
    zip_b = build_adapter_zip(tmp_path / "b.zip", "tiny", 3, cache_root=tmp_path / "cache")
    assert zip_a.read_bytes() == zip_b.read_bytes()
    with zipfile.ZipFile(zip_a) as zf:
        assert sorted(zf.namelist()) == list(ADAPTER_FILES)
        assert zf.read("adapter_model.safetensors") == (first / ADAPTER_FILES[1]).read_bytes()


def test_generated_adapter_layout(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = generate_adapter(tmp_path, "tiny", seed=0, rank=4, alpha=8, target_modules=["v_proj"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert config["target_modules"] == ["v_proj"]
    assert config["base_model_name_or_path"] == default_base_name("tiny") == "raydock/modelgen-tiny"
    assert (config["bias"], config["fan_in_fan_out"], config["inference_mode"]) == (
        "none",
        False,
        True,
    )
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert set(tensors) == {
        f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_{m}.weight"
        for i in (0, 1)
        for m in "AB"
    }
    a = tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    assert a.shape == (4, 128) and b.shape == (64, 4) and b.dtype == torch.float32
    assert b.abs().min() > 0  # not peft's zero initialisation: the adapter changes the model
    # the update alpha / r * B @ A is as large as the base weights (std 0.02)
    assert 0.01 < (8 / 4 * b @ a).std().item() < 0.04
    assert torch.equal(
        a, adapter_tensors("tiny", 0, 4, 8, ["v_proj"])[lora_tensor_name(0, "v_proj", "A")]
    )


def test_generator_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model size"):
        generate_adapter(tmp_path, "huge")
    with pytest.raises(ValueError, match="unknown target module 'c_attn'"):
        generate_adapter(tmp_path, "tiny", target_modules=["c_attn"])
    with pytest.raises(ValueError, match="rank 65 exceeds"):
        generate_adapter(tmp_path, "tiny", rank=65)  # v_proj has 64 outputs
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        generate_adapter(tmp_path, "tiny", alpha=0)
    with pytest.raises(ValueError, match="overrides takes the keys"):
        build_adapter_zip(tmp_path / "x.zip", overrides={"cfg": {}}, cache_root=tmp_path)


def test_cached_adapter_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYDOCK_MODEL_CACHE", str(tmp_path))
    folder = cached_adapter_dir("tiny", 2)
    assert folder.parent == tmp_path
    assert folder.name == f"tiny-lora-s2-r8-a16-q_proj+v_proj-v1.{ADAPTER_GENERATOR_VERSION}"
    assert sorted(p.name for p in folder.iterdir()) == list(ADAPTER_FILES)
    mtime = (folder / "adapter_model.safetensors").stat().st_mtime_ns
    assert cached_adapter_dir("tiny", 2, target_modules=("v_proj", "q_proj")) == folder
    assert (folder / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    named = cached_adapter_dir("tiny", 2, base_name="org/other")
    assert named != folder and named.name.startswith(folder.name + "-b")
    config = json.loads((named / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/other"
    assert cached_adapter_dir("tiny", 2, rank=4, alpha=4.5).name.startswith("tiny-lora-s2-r4-a4.5-")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


# ----------------------------------------------------------------------------- with peft


def test_peft_loads_the_adapter_and_it_changes_greedy_output(base: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)

    def generate(model) -> list[list[int]]:
        outputs = []
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
            outputs.append(out[0, ids.shape[1] :].tolist())
        return outputs

    def with_adapter(seed: int):
        model = AutoModelForCausalLM.from_pretrained(base)
        return peft.PeftModel.from_pretrained(model, cached_adapter_dir("tiny", seed)).eval()

    plain = generate(AutoModelForCausalLM.from_pretrained(base).eval())
    first = with_adapter(1)
    config = first.peft_config["default"]
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (
        8,
        16,
        {"q_proj", "v_proj"},
    )
    state = first.state_dict()
    for name, tensor in adapter_tensors("tiny", 1).items():
        assert torch.equal(state[name.replace(".weight", ".default.weight")], tensor)
    outputs = {1: generate(first), 2: generate(with_adapter(2))}
    for seed, generated in outputs.items():
        assert generated != plain, f"adapter seed {seed} did not change the output"
        for ours, theirs in zip(generated, plain, strict=True):
            assert sum(a != b for a, b in zip(ours, theirs, strict=True)) >= 8
    assert outputs[1] != outputs[2]


# ----------------------------------------------------------------------------- against the base


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["q_proj", "embed_tokens"], "use_dora": True},
        {
            "target_modules": ["q_proj"],
            "lora_bias": True,
            "modules_to_save": ["lm_head"],
            "layers_to_transform": [0],
            "rank_pattern": {"q_proj": 2},
        },
        {"target_modules": "all-linear", "use_rslora": True, "alpha_pattern": {"down_proj": 3}},
        {"target_modules": r".*\.(k|o)_proj", "r": 16},
    ],
    ids=["dora-embedding", "bias-modules_to_save-rank_pattern", "all-linear", "regex"],
)
def test_adapters_saved_by_peft_fit(tmp_path: Path, base: Path, config: dict) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    config = {"r": 4, "task_type": "CAUSAL_LM", **config}
    with warnings.catch_warnings():  # peft's notes on lora_bias and saved embeddings
        warnings.simplefilter("ignore")
        peft.get_peft_model(model, peft.LoraConfig(**config)).save_pretrained(str(tmp_path))
    facts = check_adapter_against_base(tmp_path, base)
    assert facts["use_dora"] is bool(config.get("use_dora"))
    # what vLLM and PEFT's mixed batches cannot apply is recorded (a merge serves it)
    unsupported = [entry.split(":")[0] for entry in facts["per_request_unsupported"]]
    assert unsupported == [
        field for field in ("use_dora", "lora_bias", "modules_to_save") if config.get(field)
    ]
    with pytest.raises(ArchiveError, match="does not fit|replaces the base model's"):
        check_adapter_against_base(tmp_path, cached_model_dir("small"))


def test_generated_adapter_fits_its_base(tmp_path: Path, base: Path) -> None:
    archive = build_adapter_zip(tmp_path / "a.zip", "tiny", 1)
    meta = extract_model_archive(archive, tmp_path / "a", kind="adapter", base_dir=base)
    assert meta.adapter == {
        "peft_type": "LORA",
        "rank": 8,
        "alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "raydock/modelgen-tiny",
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "modules_to_save": None,
        "per_request_unsupported": [],
        "adapted_layers": 4,
        "warnings": [],
    }
    assert meta.to_dict()["adapter"]["rank"] == 8
    # the same facts from the folder, and a deeper model of the same widths fits as well
    assert check_adapter_against_base(tmp_path / "a", base) == meta.adapter
    assert check_adapter_against_base(tmp_path / "a", cached_model_dir("deep"))["rank"] == 8


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_adapter_fits_a_quantized_base(tmp_path: Path, method: str) -> None:
    modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapter = _extract(tmp_path, target_modules=modules)
    facts = check_adapter_against_base(adapter, cached_model_dir("tiny", quantization=method))
    assert facts["adapted_layers"] == 14 and facts["target_modules"] == sorted(modules)
    small = _extract(tmp_path, "small", size="small", target_modules=["down_proj"])
    with pytest.raises(ArchiveError, match=r"does not fit the base model's .*down_proj"):
        check_adapter_against_base(small, cached_model_dir("tiny", quantization=method))


def test_target_modules_all_linear_and_rank_pattern(tmp_path: Path, base: Path) -> None:
    adapter = _extract(
        tmp_path,
        overrides={"config": {"target_modules": "all-linear", "rank_pattern": {"q_proj": 8}}},
    )
    assert check_adapter_against_base(adapter, base)["rank_pattern"] == {"q_proj": 8}
    regex = _extract(tmp_path, "regex", overrides={"config": {"target_modules": r".*\.[qv]_proj"}})
    assert check_adapter_against_base(regex, base)["target_modules"] == ["q_proj", "v_proj"]


def test_rank_is_the_largest_of_r_and_rank_pattern(tmp_path: Path, base: Path) -> None:
    """vLLM bounds max(r, *rank_pattern.values()) by max_lora_rank: the recorded rank (what
    maxAdapterRank is compared with) is that one, not r."""
    q_rank_16 = {
        **_lora(0, "q_proj", (16, 128), (128, 16)),
        **_lora(1, "q_proj", (16, 128), (128, 16)),
    }
    adapter = _extract(
        tmp_path,
        rank=4,
        overrides={"config": {"rank_pattern": {"q_proj": 16}}, "tensors": q_rank_16},
    )
    facts = check_adapter_against_base(adapter, base)
    assert (facts["rank"], facts["rank_pattern"]) == (16, {"q_proj": 16})


@pytest.mark.parametrize(
    ("config", "recorded"),
    [
        ({"use_dora": True}, ["use_dora: true (DoRA; allowed: false)"]),
        ({"bias": "all"}, ['bias: "all" (allowed: "none")']),
        ({"bias": "lora_only"}, ['bias: "lora_only" (allowed: "none")']),
        ({"modules_to_save": ["lm_head"]}, ['modules_to_save: ["lm_head"] (allowed: null or [])']),
        ({"lora_bias": True}, ["lora_bias: true (allowed: false)"]),
        ({"layer_replication": [[0, 2]]}, ["layer_replication: [[0, 2]] (allowed: null or false)"]),
        ({"modules_to_save": [], "init_lora_weights": "gaussian", "bias": "none"}, []),
    ],
    ids=[
        "dora",
        "bias-all",
        "bias-lora_only",
        "modules_to_save",
        "lora_bias",
        "layer_replication",
        "plain",
    ],
)
def test_what_cannot_be_applied_per_request_is_recorded(
    tmp_path: Path, base: Path, config: dict, recorded: list[str]
) -> None:
    """The import accepts these (a merge applies them: the adapter's own deployment); the
    metadata names the adapter_config.json fields that keep it off per-request serving."""
    adapter = _extract(tmp_path, overrides={"config": config})
    assert check_adapter_against_base(adapter, base)["per_request_unsupported"] == recorded


@pytest.mark.parametrize(
    ("base_name", "warned"),
    [
        (None, False),
        ("raydock/modelgen-tiny", False),
        ("/models/ModelGen-Tiny/", False),
        ("modelgen-tiny", False),
        ("tiny-chat", True),
    ],
)
def test_base_name_is_only_a_hint(tmp_path: Path, base: Path, base_name, warned) -> None:
    adapter = _extract(tmp_path)
    warnings = check_adapter_against_base(adapter, base, base_name)["warnings"]
    assert bool(warnings) is warned
    if warned:
        assert (
            "made for 'raydock/modelgen-tiny', but its base model here is 'tiny-chat'"
            in (warnings[0])
        )


def test_base_name_from_config_name_or_path(tmp_path: Path) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(cached_model_dir("tiny"), base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/Llama-3-8B"}))
    adapter = _extract(tmp_path)
    [warning] = check_adapter_against_base(adapter, base)["warnings"]
    assert "'org/Llama-3-8B'" in warning


# (overrides or build arguments, message pattern): each must refuse the adapter
BAD_ADAPTERS = {
    "not lora": (
        {"config": {"peft_type": "PREFIX_TUNING"}},
        r"peft_type 'PREFIX_TUNING', but only",
    ),
    "lower-case lora": ({"config": {"peft_type": "lora"}}, r"write it in capitals"),
    # PEFT computes these from the base's weights and rewrites them when the adapter loads:
    # a shared base replica would answer every later request from altered weights
    "pissa init": (
        {"config": {"init_lora_weights": "pissa_niter_4"}},
        r'init_lora_weights is "pissa_niter_4": loading such an adapter rewrites the base',
    ),
    "loftq init": ({"config": {"init_lora_weights": "loftq"}}, r"rewrites the base model"),
    "activated lora": (
        {"config": {"alora_invocation_tokens": [12, 7]}},
        r"alora_invocation_tokens .* can be neither merged nor served per request",
    ),
    "r missing": ({"config": {"r": DROP}}, r"has no 'r' \(the LoRA rank\)"),
    "r null": ({"config": {"r": None}}, r"has no 'r'"),
    "r zero": ({"config": {"r": 0}}, r"'r' must be a positive whole number .* not 0"),
    "r negative": ({"config": {"r": -8}}, r"'r' must be a positive whole number"),
    "r float": ({"config": {"r": 8.0}}, r"'r' must be a positive whole number .* not 8\.0"),
    "r string": ({"config": {"r": "8"}}, r"'r' must be a positive whole number"),
    "r bool": ({"config": {"r": True}}, r"'r' must be a positive whole number"),
    "r absurd": ({"config": {"r": 4096}}, r"'r' is 4096, above the 1024 limit"),
    "r differs": ({"config": {"r": 4}}, r"have rank 8, but adapter_config\.json sets r .* to 4"),
    "rank_pattern differs": (
        {"config": {"rank_pattern": {"v_proj": 4}}},
        r"v_proj\.lora_A \[8, 128\] .* have rank 8, but .* \(or rank_pattern\) to 4",
    ),
    "rank_pattern bad": (
        {"config": {"rank_pattern": {"q_proj": 0}}},
        r"'rank_pattern' entry 'q_proj' must be a positive whole number",
    ),
    "alpha missing": ({"config": {"lora_alpha": DROP}}, r"has no 'lora_alpha'"),
    "alpha zero": ({"config": {"lora_alpha": 0}}, r"'lora_alpha' must be a positive number"),
    "alpha negative": ({"config": {"lora_alpha": -16}}, r"'lora_alpha' must be a positive"),
    "alpha string": ({"config": {"lora_alpha": "16"}}, r"'lora_alpha' must be a positive"),
    "alpha nan": ({"config": {"lora_alpha": float("nan")}}, r"'lora_alpha' must be a positive"),
    "alpha absurd": ({"config": {"lora_alpha": 1e6}}, r"'lora_alpha' is 1e\+06, above the 100000"),
    "alpha_pattern bad": (
        {"config": {"alpha_pattern": {"v_proj": -1}}},
        r"'alpha_pattern' entry 'v_proj' must be a positive number",
    ),
    "target absent": (
        {"config": {"target_modules": ["q_proj", "gate_projx"]}},
        r"target_modules names 'gate_projx', but the base model has no such layer "
        r"\(its weight layers are down_proj, embed_tokens, gate_proj, .*\)",
    ),
    "gpt2 targets": (
        {"config": {"target_modules": ["c_attn"]}},
        r"target_modules names 'c_attn', but the base model has no such layer",
    ),
    "target regex matches nothing": (
        {"config": {"target_modules": r".*\.c_attn"}},
        r"target_modules '\.\*\\\\\.c_attn' matches no layer of the base model",
    ),
    "target regex invalid": (
        {"config": {"target_modules": "q_proj["}},
        r"'target_modules' holds 'q_proj\[', which is not a valid regular expression",
    ),
    "target missing": ({"config": {"target_modules": DROP}}, r"'target_modules' must list"),
    "target does not cover weights": (
        {"config": {"target_modules": ["q_proj"]}},
        r"has LoRA weights for model\.layers\.0\.self_attn\.v_proj, but target_modules in "
        r"adapter_config\.json \(q_proj\) does not name that layer",
    ),
    "layer beyond base": (
        {"tensors": _lora(5, "q_proj", (8, 128), (128, 8))},
        r"weights for layers up to 5 .* but the base model has only 2 layers \(0 to 1\)",
    ),
    "lora_A in features": (
        {"tensors": {lora_tensor_name(0, "q_proj", "A"): np.ones((8, 96), np.float32)}},
        r"model\.layers\.0\.self_attn\.q_proj\.lora_A has shape \[8, 96\], which does not fit "
        r"the base model's model\.layers\.0\.self_attn\.q_proj with weight shape \[128, 128\]",
    ),
    "lora_B out features": (
        {"tensors": {lora_tensor_name(1, "v_proj", "B"): np.ones((128, 8), np.float32)}},
        r"v_proj\.lora_B has shape \[128, 8\], which does not fit .* \[64, 128\] \(out, in\)",
    ),
    "lora tensor 3-d": (
        {"tensors": {lora_tensor_name(0, "q_proj", "A"): np.ones((1, 8, 128), np.float32)}},
        r"q_proj\.lora_A has shape \[1, 8, 128\], which does not fit",
    ),
    "tensor rank differs from r": (
        {"tensors": _lora(0, "q_proj", (4, 128), (128, 4))},
        r"q_proj\.lora_A \[4, 128\] and \.lora_B \[128, 4\] have rank 4, but .* sets r",
    ),
    "lora_B dropped": (
        {"tensors": {lora_tensor_name(0, "q_proj", "B"): DROP}},
        r"has lora_A but no lora_B for model\.layers\.0\.self_attn\.q_proj; the weights file "
        r"is incomplete",
    ),
    "lora_A dropped": (
        {"tensors": {lora_tensor_name(1, "v_proj", "A"): None}},
        r"has lora_B but no lora_A for model\.layers\.1\.self_attn\.v_proj",
    ),
    "only a DoRA magnitude": (
        {
            "tensors": {
                "base_model.model.model.layers.0.self_attn.k_proj.lora_magnitude_vector": np.ones(
                    64, np.float32
                )
            }
        },
        r"has lora_magnitude_vector but no lora_A and lora_B for model\.layers\.0\.self_attn"
        r"\.k_proj",
    ),
    "all tensors dropped": (
        {"tensors": {n: DROP for n in adapter_tensors("tiny", 0)}},
        r"holds no LoRA weights",
    ),
    "module absent": (
        {
            "tensors": {
                "base_model.model.model.layers.0.self_attn.c_attn.lora_A.weight": np.ones(
                    (8, 128), np.float32
                )
            }
        },
        r"adapts 'c_attn' layers, which the base model does not have",
    ),
    "module path absent": (
        {
            "tensors": {
                "base_model.model.transformer.h.0.q_proj.lora_A.weight": np.ones(
                    (8, 128), np.float32
                )
            }
        },
        r"adapts 'transformer\.h\.0\.q_proj', which is not a layer of the base model \(whose "
        r"q_proj layers are named like 'model\.layers\.0\.self_attn\.q_proj'\)",
    ),
    "not peft naming": (
        {"tensors": {"model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((8, 128))}},
        r"'model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' does not follow peft's naming",
    ),
    "integer lora weights": (
        {"tensors": {lora_tensor_name(0, "q_proj", "A"): np.ones((8, 128), np.int32)}},
        r"has dtype I32; LoRA weights must be floating point",
    ),
    "full tensor of another shape": (
        {"tensors": {"base_model.model.lm_head.weight": np.ones((100, 128), np.float32)}},
        r"replaces the base model's 'lm_head\.weight' but has shape \[100, 128\] where the base "
        r"has \[2048, 128\]",
    ),
    "unknown extra tensor": (
        {"tensors": {"base_model.model.model.rotary.inv_freq": np.ones(32, np.float32)}},
        r"is neither a LoRA matrix nor a copy of a base model weight",
    ),
}


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_bad_adapter_is_refused(tmp_path: Path, base: Path, case: str) -> None:
    overrides, pattern = BAD_ADAPTERS[case]
    adapter = _extract(tmp_path, overrides=overrides)
    with pytest.raises(ArchiveError, match=pattern):
        check_adapter_against_base(adapter, base)


def test_rank_above_the_layer_size_is_refused(tmp_path: Path, base: Path) -> None:
    # consistent config and tensors, but r=65 on v_proj, whose weight is [64, 128]
    tensors = {}
    for layer in (0, 1):
        tensors.update(_lora(layer, "v_proj", (65, 128), (64, 65)))
    adapter = _extract(
        tmp_path,
        rank=4,
        target_modules=["v_proj"],
        overrides={"config": {"r": 65}, "tensors": tensors},
    )
    with pytest.raises(ArchiveError, match=r"rank 65 for .*v_proj, more than that layer's smaller"):
        check_adapter_against_base(adapter, base)


def test_adapter_for_another_model_size_fails_on_shapes(tmp_path: Path, base: Path) -> None:
    small = _extract(tmp_path, "small", size="small")
    with pytest.raises(
        ArchiveError,
        match=r"lora_A has shape \[8, 768\], which does not fit the base model's "
        r"model\.layers\.0\.self_attn\.q_proj with weight shape \[128, 128\] .* other layer "
        r"sizes .* \('raydock/modelgen-small'\)",
    ):
        check_adapter_against_base(small, base)
    # the same widths, more layers: the depth is what does not fit
    deep = _extract(tmp_path, "deep", size="deep")
    with pytest.raises(ArchiveError, match=r"layers up to 15 .* only 2 layers .* deeper model"):
        check_adapter_against_base(deep, base)
    # a tiny adapter on the small base fails the other way round
    with pytest.raises(ArchiveError, match=r"\[8, 128\], which does not fit .* \[768, 768\]"):
        check_adapter_against_base(_extract(tmp_path, "tiny"), cached_model_dir("small"))


def test_adapter_for_another_architecture(tmp_path: Path, base: Path) -> None:
    """A GPT-2 LoRA (Conv1D layers: fan_in_fan_out) fits a GPT-2 base, not a Llama one."""
    peft = pytest.importorskip("peft")
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=128, n_head=2, vocab_size=2048, n_positions=256)
    config.bos_token_id = config.eos_token_id = 0
    gpt2 = GPT2LMHeadModel(config)
    gpt2.save_pretrained(str(tmp_path / "gpt2"))
    lora = peft.LoraConfig(
        r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(gpt2, lora).save_pretrained(str(tmp_path / "lora"))
    adapter_config = tmp_path / "lora" / "adapter_config.json"
    # a model built in memory has no name; peft writes null
    adapter_config.write_text(
        json.dumps({**json.loads(adapter_config.read_text()), "base_model_name_or_path": "gpt2"})
    )
    facts = check_adapter_against_base(tmp_path / "lora", tmp_path / "gpt2")
    assert facts["target_modules"] == ["c_attn", "c_proj"] and facts["adapted_layers"] == 6
    with pytest.raises(ArchiveError, match=r"names 'c_attn', but the base model has no such layer"):
        check_adapter_against_base(tmp_path / "lora", base)
    with pytest.raises(ArchiveError, match=r"names 'q_proj', but .* are c_attn, c_fc, c_proj"):
        check_adapter_against_base(_extract(tmp_path), tmp_path / "gpt2")


def test_extraction_with_a_base_removes_a_misfit(tmp_path: Path, base: Path) -> None:
    archive = build_adapter_zip(tmp_path / "small.zip", "small")
    with pytest.raises(ArchiveError, match="does not fit the base model"):
        extract_model_archive(archive, tmp_path / "out", kind="adapter", base_dir=base)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.zip"]
    with pytest.raises(ValueError, match="base_dir is only for kind='adapter'"):
        extract_model_archive(archive, tmp_path / "out", base_dir=base)


def test_pickle_adapter_weights_are_refused(tmp_path: Path, base: Path) -> None:
    pickled = {"adapter_model.safetensors": None, "adapter_model.bin": b"\x80\x04N."}
    archive = build_adapter_zip(tmp_path / "p.zip", extra_files=pickled)
    with pytest.raises(ArchiveError, match=r"only in pickle format \(adapter_model\.bin\)"):
        extract_model_archive(archive, tmp_path / "p", kind="adapter")
    # an administrator may allow pickles, but their shapes still cannot be checked
    limits = ArchiveLimits(allow_pickle=True)
    extract_model_archive(archive, tmp_path / "p", limits, kind="adapter")
    with pytest.raises(ArchiveError, match=r"only in pickle format \(adapter_model\.bin\)"):
        check_adapter_against_base(tmp_path / "p", base)
    with pytest.raises(ArchiveError, match=r"only in pickle format"):
        extract_model_archive(archive, tmp_path / "q", limits, kind="adapter", base_dir=base)


def test_missing_folders(tmp_path: Path, base: Path) -> None:
    adapter = _extract(tmp_path)
    with pytest.raises(ArchiveError, match="base model folder .* does not exist"):
        check_adapter_against_base(adapter, tmp_path / "nope")
    with pytest.raises(ArchiveError, match="adapter folder .* does not exist"):
        check_adapter_against_base(tmp_path / "nope", base)
    with pytest.raises(ArchiveError, match="adapter_config.json is missing"):
        check_adapter_against_base(base, base)
