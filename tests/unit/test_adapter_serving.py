"""Serving LoRA adapters per request on one transformers engine (no Ray): a batch mixes
sequences of several adapters and of the plain base, each equal to its PEFT-merged reference;
an evicted adapter stays until its sequences finish."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from raydock.modelgen import cached_model_dir
from raydock.modelgen.adapters import cached_adapter_dir
from raydock.optimizers.merge import merge_adapter
from raydock.serve_apps.engine_app import loaded_adapters
from raydock.serve_apps.engines.transformers_engine import TransformersEngine
from raydock.serve_apps.sampling import SamplingParams

PROMPTS = ["the lighthouse keeper", "bread and tides", "a game of chess"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _tokens(engine: TransformersEngine, prompt: str, adapter: str | None = None) -> list[int]:
    async def main() -> list[int]:
        out: list[int] = []
        async for steps in engine.generate(engine.text_prompt(prompt), GREEDY, adapter=adapter):
            out += [t for ev in steps for t in ev.token_ids]
        return out

    return asyncio.run(main())


@pytest.fixture(scope="module")
def adapters() -> dict[str, Path]:
    return {f"a{seed}": cached_adapter_dir("tiny", seed=seed) for seed in (1, 2, 3)}


@pytest.fixture(scope="module")
def references(tmp_path_factory, adapters) -> dict[str | None, list[list[int]]]:
    """Greedy tokens of each prompt on the base alone and on each adapter merged with PEFT."""
    base = cached_model_dir("tiny")
    out = {None: [_tokens(TransformersEngine(str(base), num_threads=1), p) for p in PROMPTS]}
    for name, adapter_dir in adapters.items():
        merged = tmp_path_factory.mktemp(name)
        merge_adapter(base, adapter_dir, merged)
        engine = TransformersEngine(str(merged), num_threads=1)
        out[name] = [_tokens(engine, p) for p in PROMPTS]
    return out


def test_one_batch_mixes_adapters_and_the_base(adapters, references):
    engine = TransformersEngine(str(cached_model_dir("tiny")), num_threads=1, max_batch_size=16)

    async def main():
        for name, adapter_dir in adapters.items():
            await engine.load_adapter(name, str(adapter_dir))

        async def tokens(prompt, adapter):
            out = []
            async for steps in engine.generate(engine.text_prompt(prompt), GREEDY, adapter=adapter):
                out += [t for ev in steps for t in ev.token_ids]
            return out

        asks = [(p, a) for a in (None, *adapters) for p in PROMPTS]
        return asks, await asyncio.gather(*(tokens(p, a) for p, a in asks))

    asks, got = asyncio.run(main())
    assert engine.stats()["max_batch"] == len(asks)  # one batch: every sequence together
    for (prompt, adapter), tokens in zip(asks, got, strict=True):
        assert tokens == references[adapter][PROMPTS.index(prompt)], (prompt, adapter)
    # the adapters change the output: the comparison above is not base against base
    assert references["a1"] != references[None] and references["a1"] != references["a2"]


def test_a_released_adapter_waits_for_its_sequences_then_leaves(adapters, references):
    engine = TransformersEngine(str(cached_model_dir("tiny")), num_threads=1, max_batch_size=4)
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def main():
        await engine.load_adapter("a1", str(adapters["a1"]))
        await engine.load_adapter("a2", str(adapters["a2"]))
        stream = engine.generate(engine.text_prompt(PROMPTS[0]), long, adapter="a1")
        first = await stream.__anext__()  # a1 is in the batch now
        engine.release_adapter("a1")  # evicted while its sequence decodes
        rest = [
            t for steps in [first] + [s async for s in stream] for ev in steps for t in ev.token_ids
        ]
        await asyncio.sleep(0)
        loaded_after = engine.stats()["adapters"]
        return rest, loaded_after

    tokens, loaded_after = asyncio.run(main())
    assert tokens[:12] == references["a1"][0]  # the adapter stayed for the whole sequence
    assert loaded_after == ["a2"]  # then it left; the other one stays
    # asked for again after it left, it is loaded again from its directory
    assert _tokens(engine, PROMPTS[1], "a1") == references["a1"][1]
    # a plain request while adapters are loaded gets the base alone
    assert _tokens(engine, PROMPTS[2]) == references[None][2]
    # and with every adapter gone, the engine serves the plain base
    for name in ("a1", "a2"):
        engine.release_adapter(name)
    assert _tokens(engine, PROMPTS[2]) == references[None][2]
    assert engine.stats()["adapters"] == []


class _NoLoRA:
    supports_adapters = False


@pytest.mark.parametrize(
    ("engine", "max_loaded", "rank", "says"),
    [
        (_NoLoRA(), 4, 8, "deploy the adapter as its own deployment"),
        (TransformersEngine.__new__(TransformersEngine), 0, 8, "maxLoadedAdapters is 0"),
        (TransformersEngine.__new__(TransformersEngine), 4, 128, "ranks up to 64"),
    ],
)
def test_adapters_a_deployment_cannot_apply_are_refused(engine, max_loaded, rank, says):
    from raydock.errors import ApiError
    from raydock.serve_apps.adapters import ReplicaAdapters

    replica = ReplicaAdapters(engine, "ctranslate2", {}, max_loaded, max_rank=64)
    with pytest.raises(ApiError) as exc:
        replica.check({"id": "m-1", "name": "lora", "rank": rank}, "model")
    assert exc.value.status == 400 and exc.value.param == "model" and says in exc.value.message


@pytest.fixture
def imported(tmp_path):
    """Import generated adapters (their archives checked against the tiny base, as an import
    does) onto a base deployment; `imported(name, **build)` is the adapter as the
    deployment's replicas see it in their access snapshot."""
    from raydock.modelgen.adapters import build_adapter_zip
    from raydock.platform.model_archive import extract_model_archive
    from raydock.platform.registry import Registry
    from raydock.serve_apps.access import DeploymentAccess

    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    base = reg.create_model("base", "file", "u")["modelId"]
    reg.set_model_status(base, "VALIDATING")
    reg.set_model_status(base, "READY")
    dep = reg.create_deployment(base, {"name": "d"}, "u")["deploymentId"]

    def imported_adapter(name: str, **build) -> dict:
        archive = build_adapter_zip(tmp_path / f"{name}.zip", "tiny", **build)
        meta = extract_model_archive(
            archive, tmp_path / name, kind="adapter", base_dir=cached_model_dir("tiny")
        )
        lora = reg.create_model(name, "file", "u", kind="adapter", base_model_id=base)["modelId"]
        reg.set_model_status(lora, "VALIDATING")
        facts = {"adapter": meta.adapter, "artifactDigest": "0" * 64}
        reg.set_model_status(lora, "READY", artifact_uri=f"models/{lora}", meta=facts)
        return DeploymentAccess.from_dict(reg.access_snapshots([dep])[dep]).adapter(name, "model")

    yield imported_adapter
    reg.close()


def test_dora_bias_and_saved_modules_are_refused_per_request_but_not_merged(imported):
    """vLLM refuses them when it loads the adapter, and a DoRA adapter in a PEFT mixed batch
    fails every sequence of the batch: refused before either, naming the config field. A
    CTranslate2 replica merges the adapter, which applies them."""
    from raydock.errors import ApiError
    from raydock.serve_apps.adapters import MergedServing, ReplicaAdapters

    unsupported = {
        "dora": ({"use_dora": True}, "use_dora: true (DoRA; allowed: false)"),
        "bias": ({"bias": "all"}, 'bias: "all" (allowed: "none")'),
        "saves": ({"modules_to_save": ["lm_head"]}, 'modules_to_save: ["lm_head"]'),
    }
    adapters = {
        name: imported(name, overrides={"config": c}) for name, (c, _) in unsupported.items()
    }
    plain = imported("plain")
    runtime = TransformersEngine.__new__(TransformersEngine)
    for engine_name in ("transformers", "vllm"):
        replica = ReplicaAdapters(runtime, engine_name, {}, max_loaded=4, max_rank=64)
        for name, (_, says) in unsupported.items():
            with pytest.raises(ApiError) as exc:
                replica.check(adapters[name], "model")
            assert (exc.value.status, exc.value.param) == (400, "model")
            assert says in exc.value.message and "as its own deployment" in exc.value.message
        replica.check(plain, "model")
    merged = MergedServing({}, "int8", lambda merged, out: None, lambda out: None)
    ct2 = ReplicaAdapters(_NoLoRA(), "ctranslate2", {}, max_loaded=4, max_rank=64, merged=merged)
    for adapter in adapters.values():
        ct2.check(adapter, "model")


def test_a_rank_pattern_above_the_deployments_rank_is_refused(imported):
    """vLLM bounds max(r, *rank_pattern.values()) by max_lora_rank: so does the replica."""
    from raydock.errors import ApiError
    from raydock.serve_apps.adapters import ReplicaAdapters

    q_rank_16 = {  # r is 4, but q_proj has rank 16
        f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_{m}.weight": torch.ones(shape)
        for layer in (0, 1)
        for m, shape in (("A", (16, 128)), ("B", (128, 16)))
    }
    pattern = {"config": {"rank_pattern": {"q_proj": 16}}, "tensors": q_rank_16}
    adapter = imported("wide", rank=4, overrides=pattern)
    engine = TransformersEngine.__new__(TransformersEngine)
    ReplicaAdapters(engine, "vllm", {}, max_loaded=4, max_rank=16).check(adapter)
    with pytest.raises(ApiError) as exc:
        ReplicaAdapters(engine, "vllm", {}, max_loaded=4, max_rank=8).check(adapter)
    assert exc.value.status == 400 and "has rank 16" in exc.value.message


def test_an_adapter_that_cannot_load_is_a_503_without_internals(tmp_path):
    from raydock.errors import ApiError
    from raydock.serve_apps.adapters import ReplicaAdapters

    engine = TransformersEngine.__new__(TransformersEngine)
    store = {"store": str(tmp_path / "store"), "endpoint": None}
    artifact = store | {"cache_dir": str(tmp_path / "cache"), "cache_max_bytes": 2**30}
    replica = ReplicaAdapters(engine, "transformers", artifact, max_loaded=2, max_rank=64)
    replica._multiplexed = replica._load  # Serve's LRU wrapper needs a replica; load directly
    digest = "0" * 64  # a well-formed digest of an artifact the store does not have
    missing = {"id": "m-1", "name": "lora", "rank": 8, "prefix": "models/m-1", "digest": digest}
    with pytest.raises(ApiError) as exc:
        asyncio.run(replica.ensure(missing))
    assert exc.value.status == 503 and exc.value.code == "adapter_unavailable"
    assert "'lora'" in exc.value.message
    assert str(tmp_path) not in exc.value.message and "models/m-1" not in exc.value.message


def test_adapter_slots_are_on_by_default_except_on_vllm_where_they_cost_every_step():
    def config(**adapters) -> dict:
        return {"adapterParameters": adapters}

    assert loaded_adapters(config(), "transformers") == 4
    assert loaded_adapters(config(), "ctranslate2") == 4
    assert loaded_adapters(config(), "vllm") == 0
    assert loaded_adapters({}, "vllm") == 0  # a deployment from before adapter serving
    assert loaded_adapters(config(maxLoadedAdapters=None), "transformers") == 4
    assert loaded_adapters(config(maxLoadedAdapters=3), "vllm") == 3
    assert loaded_adapters(config(maxLoadedAdapters=0), "transformers") == 0
