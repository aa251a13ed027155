"""A CTranslate2 replica's merged adapter conversions live in the node cache (no Ray cluster):
bounded by cache_max_bytes like the models, kept while the replica serves them, made again
once evicted."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path

import pytest

from raydock.artifacts import LocalStore, NodeCache
from raydock.modelgen import cached_model_dir
from raydock.modelgen.adapters import cached_adapter_dir
from raydock.serve_apps.sampling import SamplingParams

pytest.importorskip("ctranslate2")

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


async def reply(engine, prompt: str = "the lighthouse keeper") -> list[int]:
    out: list[int] = []
    async for steps in engine.generate(engine.text_prompt(prompt), GREEDY):
        out += [t for ev in steps for t in ev.token_ids]
    return out


def test_merged_conversions_stay_within_the_node_cache_bound(tmp_path):
    """Each adapter a CTranslate2 replica served left a full converted model in the cache's
    adapters/ folder, counted nowhere: a node serving many adapters filled its disk."""
    from raydock.serve_apps.adapters import ReplicaAdapters
    from raydock.serve_apps.engine_app import merged_serving

    store = LocalStore(tmp_path / "store")
    base = store.put_dir(cached_model_dir("tiny"), "models/base")
    adapters = {}
    for seed in (1, 2):
        stored = store.put_dir(cached_adapter_dir("tiny", seed=seed), f"models/a{seed}")
        adapters[seed] = {"id": f"a{seed}", "name": f"lora{seed}", "rank": 8}
        adapters[seed] |= {"prefix": f"models/a{seed}", "digest": stored.digest}
    root = tmp_path / "cache"
    # room for the base, both adapters and one conversion (about the base's size), not two
    bound = int(base.total_bytes * 2.5)
    access = {"store": store.uri, "endpoint": None, "cache_dir": str(root)}
    access["cache_max_bytes"] = bound
    spec = {"engine": "ctranslate2", "quantization": "", "device": "cpu", "max_batch_size": 4}
    spec |= {"num_threads": 1, "source_artifact": {"prefix": "models/base", "digest": base.digest}}
    replica = ReplicaAdapters(
        types.SimpleNamespace(supports_adapters=False),
        "ctranslate2",
        access,
        max_loaded=1,
        max_rank=64,
        merged=merged_serving(spec),
    )
    loaded = {}  # what Serve's multiplexer holds (its wrapper needs a running replica)

    async def multiplexed(adapter_id: str) -> None:
        if adapter_id not in loaded:
            loaded[adapter_id] = await replica._load(adapter_id)

    replica._multiplexed = multiplexed

    async def serve(adapter: dict) -> list[int]:  # a request for the adapter
        engine, _ = await replica.ensure(adapter)
        return await reply(engine)

    async def main() -> None:
        first = await serve(adapters[1])
        # another fetch on the node, with room for nothing: the conversion in use stays
        NodeCache(root, max_bytes=1).evict(1)
        assert len(list(root.glob("*/model.bin"))) == 1  # CTranslate2 weights: a conversion
        assert await reply(replica.engines["a1"]) == first

        del loaded["a1"]  # Serve's multiplexer lets it go (max_loaded=1): released
        assert await serve(adapters[2]) != first  # two adapters, two conversions
        assert disk_bytes(root) <= bound  # the first conversion was evicted to make room

        del loaded["a2"]
        assert await serve(adapters[1]) == first  # made again
        assert disk_bytes(root) <= bound
        del loaded["a1"]

    asyncio.run(main())
    assert not list(root.glob(".tmp-*"))  # no work folder left
