"""Adapters served by request on a base deployment's replicas.

A request names an adapter of the deployment's base model (`model: "<deployment>:<adapter>"`
on /v1, `adapter` on /deployments/{id}/…); the access snapshot says where each one is in the
artifact store. A replica fetches an adapter through its node cache on first use and hands it
to its engine; Serve's model multiplexing keeps at most `maxLoadedAdapters` per replica
(least recently used leave) and routes handle calls to a replica that already holds the
adapter. An engine keeps an evicted adapter until its running sequences finish.

An engine without runtime LoRA (CTranslate2) serves an adapter with an engine of its own: the
adapter merged into the base's weights with PEFT and converted, once per node for each (base,
adapter, quantization), as an entry of the node cache: held while its engine is loaded, then
evictable like any other (a later load makes it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydock.errors import ApiError

log = logging.getLogger("raydock.adapters")


class LoadedAdapter:
    """An adapter a replica holds. Serve's multiplexer calls `__del__` when it evicts the
    adapter (in a worker thread); the engine then lets it go once no sequence uses it."""

    def __init__(self, engine: Any, adapter_id: str):
        self.engine, self.adapter_id = engine, adapter_id
        self._released = False

    def __del__(self) -> None:  # called by Serve on eviction, then by the garbage collector
        if not self._released:
            self._released = True
            self.engine.release_adapter(self.adapter_id)


@dataclass(frozen=True)
class MergedServing:
    """How a replica whose engine has no runtime LoRA serves an adapter: `base` is the base
    model's own artifact ({"prefix", "digest"}), `convert(merged_dir, out_dir)` turns a merge
    into what `make_engine(out_dir)` loads."""

    base: Mapping[str, str]
    label: str  # names the conversion in the cache (e.g. the quantization)
    convert: Callable[[Path, Path], Any]
    make_engine: Callable[[str], Any]


class ReplicaAdapters:
    """One replica's adapters: checks a request's adapter, then loads it through Serve's
    multiplexer (one load per adapter however many requests wait for it)."""

    def __init__(
        self,
        engine: Any,
        engine_name: str,
        artifact: Mapping[str, Any],
        max_loaded: int,
        max_rank: int,
        merged: MergedServing | None = None,
    ):
        from ray import serve

        self.engine, self.engine_name, self.merged = engine, engine_name, merged
        self.engines: dict[str, Any] = {}  # adapter id -> its own engine (merged serving)
        self.holds: dict[str, contextlib.ExitStack] = {}  # its conversion, kept from eviction
        self.artifact = dict(artifact)  # the store and cache settings; prefix/digest replaced
        self.max_loaded, self.max_rank = max_loaded, max_rank
        self.entries: dict[str, Mapping[str, Any]] = {}
        self.loads = 0  # adapters fetched and loaded by this replica (evictions reload)

        # a plain function, not a bound method: Serve keeps its LRU wrapper as an attribute
        async def _load_adapter(adapter_id: str) -> LoadedAdapter:
            return await self._load(adapter_id)

        self._multiplexed = (
            serve.multiplexed(max_num_models_per_replica=max_loaded)(_load_adapter)
            if max_loaded
            else None
        )

    def check(self, adapter: Mapping[str, Any], param: str = "adapter") -> None:
        """Refuse (400) an adapter this deployment cannot apply."""
        if not self.engine.supports_adapters and self.merged is None:
            raise ApiError(
                400,
                f"this deployment's {self.engine_name} engine cannot apply an adapter per "
                "request; deploy the adapter as its own deployment (it is merged into the "
                "base at conversion), or deploy the base without optimization or with vLLM",
                param,
                "unsupported_parameter",
            )
        if self._multiplexed is None:
            raise ApiError(
                400,
                "this deployment serves no adapters (adapterParameters.maxLoadedAdapters is "
                "0, the vLLM engine's default: deploy with it set to serve adapters)",
                param,
                "unsupported_parameter",
            )
        unsupported = adapter.get("perRequestUnsupported")  # adapter_check's list
        if unsupported and self.merged is None:  # a merge applies them
            raise ApiError(
                400,
                f"adapter {adapter['name']!r} cannot be applied per request: its "
                f"adapter_config.json sets {'; '.join(unsupported)}; deploy the adapter as its "
                "own deployment (it is merged into the base), or retrain it without them",
                param,
                "unsupported_parameter",
            )
        if adapter["rank"] > self.max_rank:
            raise ApiError(
                400,
                f"adapter {adapter['name']!r} has rank {adapter['rank']} (the largest of r and "
                f"rank_pattern); this deployment loads ranks up to {self.max_rank} "
                "(adapterParameters.maxAdapterRank)",
                param,
                "unsupported_parameter",
            )

    async def ensure(self, adapter: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Load `adapter` on this replica unless it holds it already; the engine to generate
        with and its keyword arguments. One that cannot be loaded is a 503 naming why."""
        param = adapter.get("param", "adapter")  # what the request named it in
        self.check(adapter, param)
        adapter_id = adapter["id"]
        self.entries[adapter_id] = adapter
        for _ in range(3):  # evicted by another request's load the moment it was loaded: again
            try:
                await self._multiplexed(adapter_id)
            except Exception:  # a missing artifact, a merge or conversion that failed
                # the reason names store paths and files: for the replica's log, not the client
                log.exception("adapter %s (%s) cannot be loaded", adapter_id, adapter["name"])
                raise ApiError(
                    503,
                    f"adapter {adapter['name']!r} cannot be loaded on this deployment's replica "
                    "(its stored files are missing or damaged, or it did not convert); the "
                    "replica's log says why",
                    param,
                    "adapter_unavailable",
                ) from None
            if self.merged is None:  # the engine itself reloads an adapter it let go
                return self.engine, {"adapter": adapter_id}
            if (engine := self.engines.get(adapter_id)) is not None:
                return engine, {}
        raise ApiError(
            503,
            f"adapter {adapter['name']!r} was evicted as it loaded; this replica holds too "
            "few adapters for its load (adapterParameters.maxLoadedAdapters)",
            param,
            "adapter_unavailable",
        )

    def release_adapter(self, adapter_id: str) -> None:
        """Let an adapter's own engine go (merged serving) once the requests streaming from
        it finish."""
        engine, hold = self.engines.pop(adapter_id, None), self.holds.pop(adapter_id, None)
        try:
            if engine is not None:
                engine.close()
        finally:
            if hold is not None:
                hold.close()  # after the engine: its conversion may be evicted now

    async def _load(self, adapter_id: str) -> LoadedAdapter:
        from raydock.artifacts import fetch_cached

        entry = self.entries[adapter_id]
        where = {**self.artifact, "prefix": entry["prefix"], "digest": entry["digest"]}
        path = await asyncio.to_thread(fetch_cached, where, None, True)  # loaded: held
        if self.merged is None:
            await self.engine.load_adapter(adapter_id, str(path))
            self.loads += 1
            return LoadedAdapter(self.engine, adapter_id)
        hold = contextlib.ExitStack()
        try:
            conversion = self._merged_conversion(path, entry["digest"])
            served = await asyncio.to_thread(hold.enter_context, conversion)
            engine = await asyncio.to_thread(self.merged.make_engine, str(served))
        except BaseException:
            hold.close()
            raise
        self.engines[adapter_id], self.holds[adapter_id] = engine, hold
        self.loads += 1
        return LoadedAdapter(self, adapter_id)

    @contextlib.contextmanager
    def _merged_conversion(self, adapter_dir: Path, adapter_digest: str) -> Iterator[Path]:
        """The adapter merged into the base and converted: a node cache entry, made once per
        node (a replica that finds it there reuses it, one that finds it evicted makes it
        again) and kept from eviction while the block runs."""
        from raydock.artifacts.cache import held_cached, made_cached
        from raydock.optimizers.merge import merge_adapter

        merged = self.merged
        recipe = f"merged adapter {adapter_digest} into {merged.base['digest']}, {merged.label}"

        def build(work: Path) -> Path:
            with held_cached({**self.artifact, **merged.base}) as base_dir:  # while it merges
                merge_adapter(base_dir, adapter_dir, work / "merged")
            merged.convert(work / "merged", work / "served")
            return work / "served"

        with made_cached(self.artifact, recipe, build) as served:
            yield served
