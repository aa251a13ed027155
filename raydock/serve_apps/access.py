"""Who may call a deployment, as the data plane knows it: plain data pushed by the platform.

The control plane publishes one `DeploymentAccess` snapshot per deployment (its key hashes,
whether it serves, its timeout and defaults, the adapters of its base it serves by request) to
the access hub actor; every replica holds the
snapshots it needs in an `AccessTable` and keeps it current by long-polling the hub, so a
request is authorized in memory: no database, no actor call on the request path. A key the
platform deletes stops working on every replica as soon as the hub's answer arrives
(milliseconds), and a replica starts with the snapshot its deploy carried.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import ray
from fastapi import Request

from raydock.errors import ApiError

log = logging.getLogger("raydock.access")

#: How long a hub holds a watch open without news (a replica then asks again)
WATCH_TIMEOUT_S = 30.0
#: A replica's first request waits this long for the hub's current snapshot, then goes on
#: with the one its deploy carried (the hub may be restarting)
FIRST_SYNC_WAIT_S = 2.0
#: A key this replica does not know makes it ask the hub at once (a key created a moment ago
#: may not have been pushed yet), at most this often: unknown keys cannot flood the hub
MISS_REFRESH_INTERVAL_S = 0.1


def hash_key(key: str) -> str:
    """How keys are stored and compared: never the key itself. A fast hash is enough: keys
    carry 256 bits of entropy, so there is nothing to brute-force."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class DeploymentAccess:
    """What a replica needs to know about its deployment to answer a request."""

    deployment_id: str
    name: str
    created: int  # epoch seconds (OpenAI's `created` in /v1/models)
    status: str
    serving: bool
    timeout_s: int
    defaults: Mapping[str, Any]  # the deploy body's hyperParameters
    keys: Mapping[str, str]  # key hash -> key id
    # adapters of the base model served by request: adapter id -> name, rank, prefix, digest
    adapters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # key id -> its rate limits and budget, for the keys that have any (metering/limits.py)
    limits: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    stamp: int = 0  # when the platform took it (ns): a newer snapshot replaces an older one

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DeploymentAccess:
        return cls(
            deployment_id=raw["deploymentId"],
            name=raw["name"],
            created=int(raw["created"]),
            status=raw["status"],
            serving=bool(raw["serving"]),
            timeout_s=int(raw["timeoutS"]),
            defaults=MappingProxyType(dict(raw.get("defaults") or {})),
            keys=MappingProxyType(dict(raw.get("keys") or {})),
            adapters=MappingProxyType(dict(raw.get("adapters") or {})),
            limits=MappingProxyType(dict(raw.get("limits") or {})),
            stamp=int(raw.get("stamp", 0)),
        )

    def adapter(self, ref: str, param: str) -> dict[str, Any]:
        """The adapter a request names (its id, or its name when no other has it) as
        {"id", "name", "rank", "prefix", "digest"}; 404 naming `param` otherwise."""
        if ref in self.adapters:
            return {"id": ref, **self.adapters[ref]}
        named = [a for a, entry in self.adapters.items() if entry["name"] == ref]
        if len(named) == 1:
            return {"id": named[0], **self.adapters[named[0]]}
        if named:
            raise ApiError(
                400,
                f"{len(named)} adapters of deployment {self.deployment_id} are named {ref!r}; "
                f"name one by its id ({', '.join(sorted(named))})",
                param,
                "ambiguous_adapter",
            )
        known = sorted(entry["name"] for entry in self.adapters.values())
        raise ApiError(
            404,
            f"deployment {self.deployment_id} has no adapter {ref!r} "
            f"(its adapters: {', '.join(known) or 'none'})",
            param,
            "model_not_found",
        )


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case, as
    RFC 7235 has it); None for another scheme or none. The one parser of the data plane and
    the management API."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _key_from(request: Request) -> str | None:
    return bearer_token(request.headers.get("authorization")) or request.headers.get("x-api-key")


@dataclass
class AccessTable:
    """The snapshots one replica holds: its own deployment's, or every one (the gateway)."""

    deployments: dict[str, DeploymentAccess] = field(default_factory=dict)
    _by_key: dict[str, str] = field(default_factory=dict)  # key hash -> deployment id

    def replace(self, snapshots: Mapping[str, Mapping[str, Any] | None]) -> None:
        for dep_id, raw in snapshots.items():
            if raw is None:
                self.deployments.pop(dep_id, None)
            else:
                self.deployments[dep_id] = DeploymentAccess.from_dict(raw)
        self._by_key = {h: d.deployment_id for d in self.deployments.values() for h in d.keys}

    def authorize(self, key: str | None, deployment_id: str | None) -> tuple[DeploymentAccess, str]:
        """The deployment `key` may use (`deployment_id`, or the key's own) and the key's id;
        raises 401/404/503 as OpenAI would."""
        if not key:
            raise ApiError(
                401, "missing API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key"
            )
        owner = self._by_key.get(hash_key(key))
        if owner is None:
            raise ApiError(401, "invalid API key", None, "invalid_api_key")
        target = deployment_id or owner
        dep = self.deployments.get(target)
        if dep is None:
            raise ApiError(404, f"deployment {target} does not exist", "model", "model_not_found")
        if owner != target:
            raise ApiError(
                401, "this API key is not valid for this deployment", None, "invalid_api_key"
            )
        if not dep.serving:
            raise NotServing(dep)
        return dep, dep.keys[hash_key(key)]


class NotServing(ApiError):
    """503 for a deployment the key may use but which is not serving; it names the
    deployment for the metrics even when the request did not (`/v1/*`: its key did)."""

    def __init__(self, dep: DeploymentAccess):
        message = f"deployment {dep.deployment_id} is {dep.status}, not serving"
        super().__init__(503, message, None, "deployment_not_ready")
        self.deployment_id = dep.deployment_id


class Auth:
    """Authorizes requests from an `AccessTable` that a background task keeps current.

    `deployment_id` None follows every deployment (the gateway); otherwise just that one.
    `hub` and `registry` are (actor name, namespace) pairs: plain data, looked up on use.
    """

    def __init__(
        self,
        hub: tuple[str, str],
        registry: tuple[str, str],
        deployment_id: str | None = None,
        initial: Mapping[str, Mapping[str, Any] | None] | None = None,
    ):
        self.hub, self.registry, self.deployment_id = hub, registry, deployment_id
        self.table = AccessTable()
        self.table.replace(initial or {})
        self.epoch, self.version = "", -1
        self.synced = asyncio.Event()
        self.touched: dict[str, float] = {}
        self._watch: asyncio.Task | None = None
        self._refresh: asyncio.Task | None = None
        self._refreshed_at = -1e9

    async def authorize(
        self, request: Request, deployment_id: str | None
    ) -> tuple[DeploymentAccess, str]:
        """The deployment the request's key may use, and the key's id."""
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._keep_current())
        if not self.synced.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.synced.wait(), FIRST_SYNC_WAIT_S)
        key = _key_from(request)
        try:
            dep, key_id = self.table.authorize(key, deployment_id)
        except ApiError as exc:
            # the table may be a push behind: a key made a moment ago, a deploy that just
            # ended (its job already says SUCCESS); one refresh decides
            behind = exc.status == 401 or isinstance(exc, NotServing)
            if not behind or not key or not await self._refreshed():
                raise
            dep, key_id = self.table.authorize(key, deployment_id)
        self._touch(key_id)
        return dep, key_id

    def known(self, deployment_id: str | None) -> str:
        """`deployment_id` when it names a deployment of the table, else "": the label of a
        refusal, so that ids made up by clients do not each make a metric series."""
        return deployment_id if deployment_id in self.table.deployments else ""

    async def _refreshed(self) -> bool:
        """Ask the hub for the current snapshots now (one call shared by concurrent requests,
        none within MISS_REFRESH_INTERVAL_S of the last); whether the table was refreshed."""
        if self._refresh is None or self._refresh.done():
            if time.monotonic() - self._refreshed_at < MISS_REFRESH_INTERVAL_S:
                return False
            self._refreshed_at = time.monotonic()
            self._refresh = asyncio.create_task(self._fetch(timeout_s=0))
        try:
            await asyncio.wait_for(asyncio.shield(self._refresh), FIRST_SYNC_WAIT_S)
            return True
        except Exception:  # the hub restarting: the table stays as it was
            return False

    async def _fetch(self, timeout_s: float) -> None:
        """One answer of the hub (at once when this replica is behind), applied."""
        hub = ray.get_actor(self.hub[0], namespace=self.hub[1])
        answer = await hub.watch.remote(self.epoch, self.version, self.deployment_id, timeout_s)
        if answer["snapshots"] is None:  # what this replica holds is current
            return
        if answer["epoch"] == self.epoch and answer["version"] < self.version:
            return  # an older answer than one the watch applied meanwhile
        if self.deployment_id is None:  # every deployment: what is missing is gone
            self.table = AccessTable()
        self.table.replace(answer["snapshots"])
        self.epoch, self.version = answer["epoch"], answer["version"]
        self.synced.set()

    async def _keep_current(self) -> None:
        """Long-poll the hub: it answers at once when this replica is behind, else at the
        next change (or after WATCH_TIMEOUT_S)."""
        while True:
            try:
                await self._fetch(WATCH_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the hub restarting: keep the last snapshot, retry
                log.debug("access watch failed: %r", exc)
                await asyncio.sleep(0.5)

    def _touch(self, key_id: str) -> None:
        """Record key use, at most once a minute per key, without waiting for the registry."""
        now = time.monotonic()
        if now - self.touched.get(key_id, -1e9) > 60:
            self.touched[key_id] = now
            # the supervisor replaces a registry that died (meanwhile this use goes unrecorded)
            with contextlib.suppress(ValueError):
                registry = ray.get_actor(self.registry[0], namespace=self.registry[1])
                registry.touch_keys.remote([key_id])
