"""Prefix-cache-aware routing: requests whose prompts share a long prefix go to the replica
that served that prefix last (its engine holds the prefix's KV cache), unless that replica
has `imbalance_threshold` more requests in flight than the least-loaded one; then, and for
prefixes not seen yet, the least-loaded replica (ties: the one holding fewest prefixes).

Both inference paths use it (README "Prefix-cache-aware routing"):

- `/v1/*` reaches the engine app through the gateway's DeploymentHandle, whose Serve
  request router is `PrefixAffinityRouter` (the request dict is its first argument);
- `/deployments/{id}/…` reaches a replica through HAProxy, which first asks the app's ingress
  request router (`PrefixRouteServer`, `POST /internal/route`, with the request body) which
  replica to send it to; it answers with the same router's pick.

Each handle keeps its own table (no shared actor, nothing on the request path but local
hashing and one queue-length probe per replica): two paths may place a new prefix on
different replicas, which costs one cache miss, not correctness.

Ray's own `PrefixCacheAffinityRouter` (ray.llm._internal) does not fit: it reads
`arg.messages` attributes (raydock passes dicts), calls `ray.get` on a detached prefix-tree
actor per deployment inside the router's event loop, and that actor outlives an undeployed
app (it is only cleaned up by `serve.shutdown()`).
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from ray import serve
from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from raydock.serve_apps.responses_api import conversation_messages

#: A prefix is compared in blocks of this many characters (~32-64 tokens: a few of vLLM's
#: 16-token KV blocks); a prompt shorter than one block has no prefix worth routing on.
BLOCK_CHARS = 128
#: Only the first this-many blocks (32 KiB of text) decide: enough to tell long prefixes apart
MAX_BLOCKS = 256
#: Prefix blocks remembered per router (least recently used leave): ~100 bytes each
MAX_ENTRIES = 200_000


def routing_text(args: Sequence[Any]) -> str | None:
    """The prompt text of a request: its `messages` (role and text of each, in order), a
    Responses body's `instructions` and `input` as the chat messages they become, or its
    `prompt`, from the first argument that is a request dict; None if there is none."""
    for arg in args:
        if not isinstance(arg, dict):
            continue
        messages = arg.get("messages")
        if not isinstance(messages, list) and "input" in arg:
            messages = _responses_messages(arg)
        if isinstance(messages, list):
            parts = []
            for message in messages:
                if isinstance(message, dict):
                    parts.append(f"{message.get('role', '')}\n{_text(message.get('content'))}\n")
            return "".join(parts)
        if isinstance(arg.get("prompt"), str):
            return arg["prompt"]
        if isinstance(arg.get("prompt"), list) and arg["prompt"]:
            return _text(arg["prompt"][0])
    return None


def _responses_messages(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A Responses body's conversation as its chat translation has it (HAProxy's question
    carries the raw body; the gateway's handle, the translated one); None for a body it
    cannot read."""
    try:
        return conversation_messages(body.get("instructions"), body["input"])
    except Exception:  # an odd body is load-balanced here; the replica refuses it, naming why
        return None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def prefix_keys(text: str) -> list[int]:
    """One key per whole block of `text`: key i stands for the first i+1 blocks, so two texts
    share key i exactly when (hash collisions aside) they share those blocks."""
    keys: list[int] = []
    key = 0
    for i in range(min(len(text) // BLOCK_CHARS, MAX_BLOCKS)):
        key = hash((key, text[i * BLOCK_CHARS : (i + 1) * BLOCK_CHARS]))
        keys.append(key)
    return keys


class PrefixTable:
    """Prefix key -> the replica that served it last, least recently used first out."""

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self.owner: OrderedDict[int, Any] = OrderedDict()
        self.held: Counter = Counter()  # replica -> keys it owns

    def longest_owner(self, keys: Sequence[int], live: Iterable[Any]) -> Any | None:
        """The live replica that served the longest of `keys` (the longest shared prefix)."""
        live = set(live)
        for key in reversed(keys):
            owner = self.owner.get(key)
            if owner is not None and owner in live:
                return owner
        return None

    def assign(self, keys: Sequence[int], replica: Any) -> None:
        for key in keys:
            old = self.owner.pop(key, None)
            if old is not None:
                self.held[old] -= 1
            self.owner[key] = replica
            self.held[replica] += 1
        while len(self.owner) > self.max_entries:
            _, old = self.owner.popitem(last=False)
            self.held[old] -= 1

    def forget(self, replicas: Iterable[Any]) -> None:
        gone = set(replicas)
        if not gone:
            return
        for key in [k for k, r in self.owner.items() if r in gone]:
            del self.owner[key]
        for replica in gone:
            self.held.pop(replica, None)


def known_queue_lens(
    probed: Iterable[tuple[Any, int | None]], cached: Callable[[Any], int | None]
) -> dict[Any, int]:
    """Each replica's requests in flight: its probe's answer, else the last figure it gave
    (fresh within Serve's queue-length cache timeout, 10 s). A probe has 0.1 s to answer and a
    replica busy prefilling a long prompt can miss that; without the fallback its prefixes
    would move to the other replica whenever it is busiest with them."""
    lens = {}
    for replica, queue_len in probed:
        if queue_len is None:
            queue_len = cached(replica)
        if queue_len is not None:
            lens[replica] = queue_len
    return lens


def pick(
    owner: Any | None,
    queue_lens: dict[Any, int],
    held: Counter,
    imbalance_threshold: int,
) -> list[Any]:
    """Replicas in order of preference: the prefix's owner while it has at most
    `imbalance_threshold` more requests in flight than the least-loaded replica, then the
    others by load (ties: fewest prefixes held, so new prefixes spread)."""
    by_load = sorted(queue_lens, key=lambda r: (queue_lens[r], held[r]))
    if owner in queue_lens and queue_lens[owner] - queue_lens[by_load[0]] <= imbalance_threshold:
        return [owner, *(r for r in by_load if r != owner)]
    return by_load


class PrefixAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Serve request router (`request_router_config`) implementing the rule above. Adapter
    requests (multiplexed) and requests without a prefix keep Serve's power of two choices.

    No `FIFOMixin`: its pick is for one request's prefix, so it must go to that request. With
    the mixin, a pick that came first went to the oldest waiting request (of whatever prefix)
    and its own request went on to the next, fallback, rank."""

    def initialize_state(self, imbalance_threshold: int = 4) -> None:
        self.imbalance_threshold = imbalance_threshold
        self.table = PrefixTable()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        keys = self._keys(pending_request)
        if not keys or pending_request.metadata.multiplexed_model_id:
            return await PowerOfTwoChoicesRequestRouter.choose_replicas(
                self, candidate_replicas, pending_request
            )
        # probe every candidate: the ingress route server only picks (HAProxy sends the
        # request), so its cached queue lengths would never be refreshed by its own sends
        probed = await self._probe_queue_lens(candidate_replicas, 0)
        by_id = {r.replica_id: r for r, _ in probed}
        # a full replica stays a candidate: it answers the request itself with raydock's 429
        lens = known_queue_lens(
            ((r.replica_id, q) for r, q in probed), self.replica_queue_len_cache.get
        )
        if not lens:  # none has answered for 10 s: Serve's own choice
            return await PowerOfTwoChoicesRequestRouter.choose_replicas(
                self, candidate_replicas, pending_request
            )
        owner = self.table.longest_owner(keys, lens)
        order = pick(owner, lens, self.table.held, self.imbalance_threshold)
        # recorded at once: the route server's pick-only path never calls on_request_routed
        self.table.assign(keys, order[0])
        return [[by_id[order[0]]], [by_id[r] for r in order[1:]]]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        keys = self._keys(pending_request)  # where it really went (the first pick may be full)
        if keys and not pending_request.metadata.multiplexed_model_id:
            self.table.assign(keys, replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = set(self._replica_id_set)
        super().update_replicas(replicas)
        self.table.forget(before - set(self._replica_id_set))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget([replica_id])

    @staticmethod
    def _keys(pending_request: PendingRequest | None) -> list[int]:
        if pending_request is None or not pending_request.args:
            return []
        text = routing_text(pending_request.args)
        return prefix_keys(text) if text else []


# ------------------------------------------------------------------ HAProxy's route server

route_http = FastAPI(title="raydock prefix route server", docs_url=None, openapi_url=None)


class _Ctx:
    handle: Any


ctx = _Ctx()


@route_http.post("/internal/route")
async def route(request: Request) -> dict[str, Any]:
    """HAProxy's question (Serve's ingress request router contract): which replica gets this
    request body? A body without a prompt (or one HAProxy truncated past its routing buffer,
    RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_BUFSIZE) is load-balanced."""
    try:
        body = json.loads(await request.body())
    except ValueError:
        body = None
    args = (body,) if isinstance(body, dict) else ()
    try:
        async with ctx.handle.choose_replica(*args, _reserve=False) as selection:
            replica = selection._replica
            endpoint = replica.backend_http_endpoint
            if endpoint is None:
                raise HTTPException(503, f"replica {selection.replica_id} has no HTTP endpoint")
            host, port = endpoint
            return {"host": host, "port": port, "replica_id": replica.replica_id.to_full_id_str()}
    except (RuntimeError, DeploymentUnavailableError) as exc:
        raise HTTPException(503, str(exc)) from None


def asgi_app() -> FastAPI:
    return route_http


def _configure(handle: Any) -> None:
    ctx.handle = handle
    handle._init()


# Serve pickles the class by value; the route (module level) is pickled by reference.
@serve.deployment(name="router", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress(asgi_app)
class PrefixRouteServer:
    def __init__(self, engine: Any):
        _configure(engine)
