"""The access hub: pushes each deployment's access snapshot to the replicas that serve it.

The registry publishes a snapshot after every change to a deployment's keys, status, timeout
or defaults; replicas long-poll `watch` (see serve_apps/access.py). The hub holds no state of
its own worth keeping: a new hub (after a crash, created by the supervisor) loads every
snapshot from the registry and starts a new epoch, which tells replicas to take its view.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import ray

from raydock import names


class AccessHub:
    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex
        self.version = 0
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.stamps: dict[str, int] = {}  # the newest snapshot's stamp per deployment
        self.deleted: set[str] = set()
        self._changed: asyncio.Event | None = None
        self._loaded = False

    async def ping(self) -> bool:
        return True

    async def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        registry = ray.get_actor(names.REGISTRY, namespace=names.NAMESPACE)
        self._apply(await registry.access_snapshots.remote())
        self._loaded = True

    def _apply(self, snapshots: dict[str, dict[str, Any] | None]) -> None:
        changed = False
        for dep_id, snap in snapshots.items():
            if snap is None:  # deleted for good: ids are never reused
                self.deleted.add(dep_id)
                changed |= self.snapshots.pop(dep_id, None) is not None
            elif dep_id in self.deleted or snap["stamp"] < self.stamps.get(dep_id, 0):
                continue  # an older view than one already applied
            else:
                changed |= self.snapshots.get(dep_id) != snap
                self.snapshots[dep_id] = snap
                self.stamps[dep_id] = snap["stamp"]
        if changed:
            self.version += 1
            if self._changed is not None:
                self._changed.set()
                self._changed = None

    async def publish(self, snapshots: dict[str, dict[str, Any] | None]) -> None:
        """Snapshots the registry took after a change (None: the deployment is gone)."""
        await self._ensure_loaded()
        self._apply(snapshots)

    async def watch(
        self, epoch: str, version: int, deployment_id: str | None, timeout_s: float
    ) -> dict[str, Any]:
        """The current snapshots (one deployment's, or all) once they differ from what the
        caller holds (`epoch`, `version`); after `timeout_s` unchanged, `snapshots` is None:
        what the caller holds is current (a miss of an unknown key, which anyone can send,
        asked for every deployment's key hashes, up to ten times a second)."""
        await self._ensure_loaded()
        if epoch == self.epoch and version == self.version:
            if self._changed is None:
                self._changed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            if version == self.version:
                return {"epoch": self.epoch, "version": self.version, "snapshots": None}
        if deployment_id is None:
            snapshots: dict[str, Any] = dict(self.snapshots)
        else:
            snapshots = {deployment_id: self.snapshots.get(deployment_id)}
        return {"epoch": self.epoch, "version": self.version, "snapshots": snapshots}
