"""The prefix-cache-aware routing rule (serve_apps/prefix_router.py) and when a deployment gets
it (engine_app.prefix_routing); the routing itself is shown end to end in
tests/e2e/test_prefix_routing.py."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve._private.request_router.common import PendingRequest
from ray.serve.request_router import ReplicaID

from raydock.platform import schemas
from raydock.serve_apps.engine_app import prefix_routing
from raydock.serve_apps.prefix_router import (
    BLOCK_CHARS,
    PrefixAffinityRouter,
    PrefixTable,
    known_queue_lens,
    pick,
    prefix_keys,
    routing_text,
)

LONG = "The keeper's log, page one. " * 40  # ~1,100 characters


def test_the_prompt_text_comes_from_messages_or_prompt():
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}
    assert routing_text([chat]) == "system\nS\nuser\nU\n"
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert routing_text([parts]) == "user\nhi\n"
    assert routing_text([{"prompt": "p"}]) == "p"
    assert routing_text([{"prompt": ["first", "second"]}]) == "first"
    assert routing_text(["not a request", {"other": 1}]) is None


def test_a_responses_body_routes_on_the_prefix_its_chat_translation_has():
    """HAProxy asks with the raw Responses body; the gateway's handle routes the chat request
    it becomes (with its messages as the engine reads them): both share the prefix."""
    from raydock.serve_apps.access import DeploymentAccess
    from raydock.serve_apps.openai_service import engine_request
    from raydock.serve_apps.protocol import ChatRequest
    from raydock.serve_apps.protocol import parse as parse_chat
    from raydock.serve_apps.responses_api import chat_body, parse

    body = {
        "instructions": LONG,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
            {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        ],
    }
    dep = DeploymentAccess("d", "d", 0, "DEPLOYED", True, 60, defaults={}, keys={})
    payload = engine_request("chat", parse_chat(ChatRequest, chat_body(parse(body))), dep)
    assert routing_text([body]) == routing_text([payload])
    assert len(prefix_keys(routing_text([body]))) >= len(LONG) // BLOCK_CHARS  # not balanced
    assert routing_text([{"input": "Hi"}]) == "user\nHi\n"


@pytest.mark.parametrize(
    "body",
    [
        {"input": 5},
        {"input": [5]},
        {"input": [{"role": "user"}]},
        {"input": [{"role": "user", "content": [{"text": 3}]}]},
        {"input": [{"type": "function_call"}]},
        {"input": None, "instructions": ["x"]},
    ],
)
def test_an_odd_responses_body_is_load_balanced_without_raising(body):
    assert routing_text([body]) is None


def test_texts_share_keys_exactly_as_far_as_they_share_whole_blocks():
    a = prefix_keys(LONG + "question A")
    b = prefix_keys(LONG + "question B, somewhat longer than A")
    shared = len(LONG) // BLOCK_CHARS
    assert a[:shared] == b[:shared]
    assert prefix_keys("short") == []  # under one block: nothing worth routing on
    other = prefix_keys("X" + LONG)
    assert not set(other) & set(a)


def test_the_longest_shared_prefix_decides_and_dead_replicas_are_forgotten():
    table = PrefixTable()
    base = prefix_keys(LONG)
    longer = prefix_keys(LONG + "more text " * 30)
    table.assign(base, "r1")
    table.assign(longer, "r2")  # r2 served a longer prompt with the same start
    assert table.longest_owner(longer, {"r1", "r2"}) == "r2"
    assert table.longest_owner(base, {"r1", "r2"}) == "r2"  # re-served: the blocks moved
    assert table.longest_owner(longer, {"r1"}) is None  # r2 is not a candidate now
    table.forget(["r2"])
    assert table.longest_owner(longer, {"r1", "r2"}) is None and "r2" not in table.held


def test_the_table_is_bounded():
    table = PrefixTable(max_entries=10)
    table.assign(prefix_keys(LONG), "r1")
    table.assign(prefix_keys("Y" + LONG), "r2")
    assert len(table.owner) == 10 and sum(table.held.values()) == 10


def test_owner_while_not_overloaded_else_least_loaded():
    held = Counter({"a": 5, "b": 1})
    assert pick("a", {"a": 3, "b": 0}, held, imbalance_threshold=4)[0] == "a"
    assert pick("a", {"a": 4, "b": 0}, held, imbalance_threshold=4)[0] == "a"
    assert pick("a", {"a": 5, "b": 0}, held, imbalance_threshold=4)[0] == "b"  # overloaded
    # a new prefix: least loaded; at equal load the replica holding fewer prefixes
    assert pick(None, {"a": 0, "b": 0}, held, imbalance_threshold=4) == ["b", "a"]
    assert pick(None, {"a": 0, "b": 1}, held, imbalance_threshold=4) == ["a", "b"]
    # an owner that is not a candidate now (gone, or its probe unanswered) is passed over
    assert pick("c", {"a": 1, "b": 0}, held, imbalance_threshold=4)[0] == "b"


def test_a_replica_too_busy_to_answer_its_probe_keeps_its_last_known_load():
    cached = {"a": 2}.get
    assert known_queue_lens([("a", None), ("b", 0)], cached) == {"a": 2, "b": 0}
    assert known_queue_lens([("a", 3), ("b", None)], cached) == {"a": 3}  # b: nothing known
    # so the owner keeps its prefix through a slow probe
    lens = known_queue_lens([("a", None), ("b", 0)], cached)
    assert pick("a", lens, Counter(), imbalance_threshold=4)[0] == "a"


def body(engine: str = "vllm", max_replicas: int = 2, **routing) -> dict:
    return {
        "scalingParameters": {"maxReplicas": max_replicas, "maxBatchSize": 8},
        "routingParameters": routing,
        "optimizationInfo": {"optimizationType": engine},
    }


def test_on_by_default_for_vllm_with_more_than_one_replica():
    assert prefix_routing(body(), "vllm") == {"imbalance_threshold": 4}  # half a batch
    assert prefix_routing(body(max_replicas=1), "vllm") is None  # nothing to choose from
    assert prefix_routing(body(), "transformers") is None  # no prefix cache there
    assert prefix_routing(body(prefixCacheAffinity=False), "vllm") is None
    on = body(prefixCacheAffinity=True, imbalanceThreshold=0)
    assert prefix_routing(on, "ctranslate2") == {"imbalance_threshold": 0}
    assert prefix_routing({"scalingParameters": body()["scalingParameters"]}, "vllm")


def test_the_routing_settings_are_validated():
    ok = schemas.RoutingParameters(prefixCacheAffinity=False, imbalanceThreshold=16)
    assert ok.model_dump() == {"prefixCacheAffinity": False, "imbalanceThreshold": 16}
    for bad in ({"imbalanceThreshold": 1025}, {"imbalanceThreshold": -1}):
        with pytest.raises(ValueError, match="imbalanceThreshold"):
            schemas.RoutingParameters(**bad)
    with pytest.raises(ValueError, match="prefixCacheAffinity"):
        schemas.RoutingParameters(prefixCacheAffinity="yes")


ENGINE = DeploymentID("engine", "app")
HANDLE = DeploymentHandleSource.REPLICA  # the gateway's handle lives in a replica


class Replica:
    """A running replica as Serve's routing loop sees it (the edge: no actor behind it); its
    queue-length probes answer after `probe_delays` seconds, one per probe, then at once."""

    def __init__(self, name: str, probe_delays: list[float]):
        self.replica_id = ReplicaID(name, ENGINE)
        self.probe_delays = probe_delays
        self.max_ongoing_requests = 41
        self.node_id, self.availability_zone = "", None
        self.multiplexed_model_ids: set[str] = set()
        self.is_cross_language = False
        self.routing_stats: dict = {}

    async def get_queue_len(self, *, deadline_s: float) -> int:
        await asyncio.sleep(self.probe_delays.pop(0) if self.probe_delays else 0)
        return 0


def chat(system: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]}


def request(system: str, n: int) -> PendingRequest:
    return PendingRequest(
        args=[chat(system)], kwargs={}, metadata=RequestMetadata(f"r{n}", f"i{n}")
    )


def test_each_request_gets_the_replica_chosen_for_its_own_prefix():
    """Routing tasks finish out of order when an older request's probes answer later: each
    request must still go to its own prefix's owner (Serve's FIFO mixin handed the younger
    request's pick to the older one and sent the younger one to its fallback replica)."""

    async def route() -> tuple[str, str]:
        # after the probe of a new replica, the first request's probes are slow: the second
        # request is chosen first
        a, b = Replica("a", [0, 0.05]), Replica("b", [0, 0.05])
        router = PrefixAffinityRouter(deployment_id=ENGINE, handle_source=HANDLE)
        router.initialize_state()
        router.update_replicas([a, b])
        await asyncio.sleep(0.01)  # its probe of new replicas
        first, second = LONG, "Y" + LONG
        router.table.assign(prefix_keys(routing_text([chat(first)])), a.replica_id)
        router.table.assign(prefix_keys(routing_text([chat(second)])), b.replica_id)
        picked = await asyncio.gather(
            router._choose_replica_for_request(request(first, 1)),
            router._choose_replica_for_request(request(second, 2)),
        )
        return tuple(r.replica_id.unique_id for r in picked)

    assert asyncio.run(route()) == ("a", "b")
