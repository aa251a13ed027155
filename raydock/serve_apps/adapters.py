"""Adapters served by request on a base deployment's replicas.

A request names an adapter of the deployment's base model (`model: "<deployment>:<adapter>"`
on /v1, `adapter` on /deployments/{id}/…); the access snapshot says where each one is in the
artifact store. A replica fetches an adapter through its node cache on first use and hands it
to its engine; Serve's model multiplexing keeps at most `maxLoadedAdapters` per replica
(least recently used leave) and routes handle calls to a replica that already holds the
adapter. An engine keeps an evicted adapter until its running sequences finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from raydock.errors import ApiError


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
    ):
        from ray import serve

        self.engine, self.engine_name = engine, engine_name
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
        if not self.engine.supports_adapters:
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
                "this deployment serves no adapters (adapterParameters.maxLoadedAdapters is 0)",
                param,
                "unsupported_parameter",
            )
        if adapter["rank"] > self.max_rank:
            raise ApiError(
                400,
                f"adapter {adapter['name']!r} has rank {adapter['rank']}; this deployment "
                f"loads ranks up to {self.max_rank} (adapterParameters.maxAdapterRank)",
                param,
                "unsupported_parameter",
            )

    async def ensure(self, adapter: Mapping[str, Any]) -> str:
        """Load `adapter` on this replica unless it holds it already; its id for the engine.
        An adapter that cannot be fetched is a 503 naming why."""
        from raydock.artifacts import ArtifactError

        self.check(adapter)
        self.entries[adapter["id"]] = adapter
        try:
            await self._multiplexed(adapter["id"])
        except ArtifactError as exc:
            raise ApiError(
                503,
                f"adapter {adapter['name']!r} cannot be loaded: {exc}",
                "adapter",
                "adapter_unavailable",
            ) from None
        return adapter["id"]

    async def _load(self, adapter_id: str) -> LoadedAdapter:
        from raydock.artifacts import fetch_cached

        entry = self.entries[adapter_id]
        where = {**self.artifact, "prefix": entry["prefix"], "digest": entry["digest"]}
        path = await asyncio.to_thread(fetch_cached, where)
        await self.engine.load_adapter(adapter_id, str(path))
        self.loads += 1
        return LoadedAdapter(self.engine, adapter_id)
