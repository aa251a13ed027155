"""Access data on the replicas: the table that authorizes requests, the hub that pushes it,
and the registry's snapshots (the serving rule, keys) — no Ray, no HTTP."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import ray
from starlette.requests import Request

from raydock.errors import ApiError
from raydock.platform.access_hub import AccessHub
from raydock.platform.registry import Registry
from raydock.platform.states import DeploymentStatus as D
from raydock.serve_apps.access import MISS_REFRESH_INTERVAL_S, AccessTable, Auth, hash_key


def snapshot(dep_id: str, keys: dict[str, str], serving: bool = True, stamp: int = 1) -> dict:
    return {
        "deploymentId": dep_id,
        "name": f"name-{dep_id}",
        "created": 0,
        "status": "DEPLOYED" if serving else "UNDEPLOYED",
        "serving": serving,
        "timeoutS": 60,
        "defaults": {"temperature": 0.5},
        "keys": {hash_key(k): f"id-{k}" for k in keys},
        "stamp": stamp,
    }


def refused(table: AccessTable, key, dep_id) -> tuple[int, str]:
    with pytest.raises(ApiError) as err:
        table.authorize(key, dep_id)
    return err.value.status, err.value.code


def test_the_table_answers_as_openai_would():
    table = AccessTable()
    table.replace({"a": snapshot("a", {"ka": ""}), "b": snapshot("b", {"kb": ""}, serving=False)})
    dep, key_id = table.authorize("ka", "a")
    assert (dep.deployment_id, key_id, dep.defaults["temperature"]) == ("a", "id-ka", 0.5)
    assert table.authorize("ka", None)[0].deployment_id == "a"  # /v1: the key names it
    assert refused(table, None, "a") == (401, "invalid_api_key")
    assert refused(table, "nope", "a") == (401, "invalid_api_key")
    assert refused(table, "ka", "b") == (401, "invalid_api_key")  # another deployment's key
    assert refused(table, "kb", "b") == (503, "deployment_not_ready")
    assert refused(table, "ka", "zz") == (404, "model_not_found")
    table.replace({"a": None})  # deleted
    assert refused(table, "ka", "a") == (401, "invalid_api_key")


def test_a_watch_returns_at_the_next_change_and_at_once_when_behind():
    async def scenario():
        hub = AccessHub()
        hub._loaded = True  # the registry's snapshots: none yet
        first = await hub.watch("", -1, "a", 5)
        assert first["snapshots"] == {"a": None}
        waiting = asyncio.create_task(hub.watch(first["epoch"], first["version"], "a", 5))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # nothing new: the watch stays open
        await hub.publish({"a": snapshot("a", {"k": ""}, stamp=2)})
        got = await asyncio.wait_for(waiting, 1)
        assert got["version"] == first["version"] + 1
        assert hash_key("k") in got["snapshots"]["a"]["keys"]
        # an older view (a publish overtaken by a newer one) does not win
        await hub.publish({"a": snapshot("a", {}, stamp=1)})
        now = await hub.watch("", -1, None, 1)
        assert hash_key("k") in now["snapshots"]["a"]["keys"]
        # deleted for good
        await hub.publish({"a": None})
        await hub.publish({"a": snapshot("a", {"k": ""}, stamp=3)})
        assert (await hub.watch("", -1, None, 1))["snapshots"] == {}
        # unchanged for timeout_s: the caller's view is current, and no snapshot comes back
        idle = await hub.watch(now["epoch"], hub.version, "a", 0.05)
        assert idle["version"] == hub.version and idle["snapshots"] is None
        assert (await hub.watch(now["epoch"], hub.version, None, 0))["snapshots"] is None

    asyncio.run(scenario())


def test_registry_snapshots_follow_keys_and_the_serving_rule(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    user = "u"
    model = reg.create_model("m", "file", user)
    reg.set_model_status(model["modelId"], "VALIDATING")
    reg.set_model_status(model["modelId"], "READY")
    dep = reg.create_deployment(model["modelId"], {"name": "d", "timeout": 45}, user)
    dep_id = dep["deploymentId"]

    def snap() -> dict:
        return reg.access_snapshots([dep_id])[dep_id]

    assert snap()["serving"] is False and snap()["timeoutS"] == 45
    key = reg.create_deployment_key(dep_id, "k", user)
    assert snap()["keys"] == {hash_key(key["apiKey"]): key["keyId"]}
    # first deploy: not serving until DEPLOYED
    reg.begin_deploy(dep_id, None, user, D.DEPLOYING)
    assert snap()["serving"] is False
    reg.set_deployment_status(dep_id, D.DEPLOYED)
    assert snap()["serving"] is True
    # a redeploy of a live version keeps serving (the old replicas answer meanwhile)
    reg.begin_deploy(dep_id, None, user, D.DEPLOYING)
    assert snap()["serving"] is True
    reg.set_deployment_status(dep_id, D.FAILED, "boom")
    assert snap()["serving"] is False
    reg.delete_deployment_key(dep_id, key["keyId"])
    assert snap()["keys"] == {}
    # a READY adapter of the base is served by its deployments; a deleted one no longer
    assert snap()["adapters"] == {}
    lora = reg.create_model("lora", "file", user, kind="adapter", base_model_id=model["modelId"])
    assert snap()["adapters"] == {}  # importing: not yet
    reg.set_model_status(lora["modelId"], "VALIDATING")
    reg.set_model_status(
        lora["modelId"],
        "READY",
        artifact_uri="models/lora",
        meta={"adapter": {"rank": 8}, "artifactDigest": "abc"},
    )
    assert snap()["adapters"] == {
        lora["modelId"]: {"name": "lora", "rank": 8, "prefix": "models/lora", "digest": "abc"}
    }
    reg.delete_model(lora["modelId"])
    assert snap()["adapters"] == {}
    reg.delete_deployment(dep_id)
    assert reg.access_snapshots([dep_id]) == {dep_id: None}


class _HubHandle:
    """What ray.get_actor returns (the hub, and the registry's touch_keys): methods behind
    `.remote` (Ray is the edge here; the hub itself is the real one). Counts watch calls."""

    def __init__(self, hub: AccessHub):
        self.calls = 0

        async def watch(*args):
            self.calls += 1
            return await hub.watch(*args)

        self.watch = SimpleNamespace(remote=watch)
        self.touch_keys = SimpleNamespace(remote=lambda key_ids: None)  # the registry's


def _request(key: str) -> Request:
    return Request({"type": "http", "headers": [(b"authorization", f"Bearer {key}".encode())]})


def test_a_key_created_a_moment_ago_works_before_its_push(monkeypatch):
    async def scenario():
        hub = AccessHub()
        hub._loaded = True
        await hub.publish({"a": snapshot("a", {"old": ""}, stamp=1)})
        handle = _HubHandle(hub)
        monkeypatch.setattr(ray, "get_actor", lambda *a, **k: handle)
        auth = Auth(("hub", "ns"), ("registry", "ns"), "a")
        assert (await auth.authorize(_request("old"), "a"))[0].deployment_id == "a"
        auth._watch.cancel()  # no push from here on: only the refresh on a miss can help
        auth._watch = asyncio.create_task(asyncio.sleep(3600))
        await hub.publish({"a": snapshot("a", {"old": "", "new": ""}, stamp=2)})
        assert (await auth.authorize(_request("new"), "a"))[0].deployment_id == "a"
        # unknown keys ask the hub at most once per interval
        await asyncio.sleep(MISS_REFRESH_INTERVAL_S)
        calls = handle.calls
        for _ in range(5):
            with pytest.raises(ApiError) as err:
                await auth.authorize(_request("nope"), "a")
            assert err.value.status == 401
        assert handle.calls == calls + 1

    asyncio.run(scenario())


def test_a_deploy_that_just_ended_serves_before_its_push(monkeypatch):
    async def scenario():
        hub = AccessHub()
        hub._loaded = True
        await hub.publish({"a": snapshot("a", {"k": ""}, serving=False, stamp=1)})
        monkeypatch.setattr(ray, "get_actor", lambda *a, **k: _HubHandle(hub))
        auth = Auth(("hub", "ns"), ("registry", "ns"), "a")
        with pytest.raises(ApiError) as err:
            await auth.authorize(_request("k"), "a")
        assert err.value.status == 503
        auth._watch.cancel()  # no push from here on: only the refresh on a refusal can help
        auth._watch = asyncio.create_task(asyncio.sleep(3600))
        await hub.publish({"a": snapshot("a", {"k": ""}, serving=True, stamp=2)})
        await asyncio.sleep(MISS_REFRESH_INTERVAL_S)
        assert (await auth.authorize(_request("k"), "a"))[0].deployment_id == "a"

    asyncio.run(scenario())


def test_a_request_names_an_adapter_by_id_or_unique_name():
    from raydock.errors import ApiError
    from raydock.serve_apps.access import DeploymentAccess

    entry = {"rank": 8, "prefix": "models/x", "digest": "d"}
    adapters = {
        "m-1": {"name": "legal", **entry},
        "m-2": {"name": "twin", **entry},
        "m-3": {"name": "twin", **entry},
    }
    dep = DeploymentAccess.from_dict(snapshot("d-1", {}) | {"adapters": adapters})
    assert dep.adapter("legal", "model")["id"] == "m-1"
    assert dep.adapter("m-3", "adapter")["name"] == "twin"
    with pytest.raises(ApiError) as exc:
        dep.adapter("twin", "adapter")
    assert exc.value.status == 400 and "m-2, m-3" in exc.value.message
    with pytest.raises(ApiError) as exc:
        dep.adapter("medical", "model")
    assert (exc.value.status, exc.value.param) == (404, "model")
    assert "legal, twin, twin" in exc.value.message


def test_refusals_of_unknown_deployments_share_one_metric_series(monkeypatch):
    """Made-up ids in the path must not each make a permanent series (nor history entry)."""
    from raydock.serve_apps import gateway
    from raydock.serve_apps.metering import ReplicaMeter

    async def scenario():
        hub = AccessHub()
        hub._loaded = True
        await hub.publish({"a": snapshot("a", {"ka": ""}), "b": snapshot("b", {"kb": ""}, False)})
        monkeypatch.setattr(ray, "get_actor", lambda *a, **k: _HubHandle(hub))
        monkeypatch.setattr(gateway.ctx, "auth", Auth(("hub", "ns"), ("r", "ns")), raising=False)
        monkeypatch.setattr(gateway.ctx, "meter", ReplicaMeter(None), raising=False)
        for dep_id in ("a", "random-1", "random-2"):
            with pytest.raises(ApiError):  # no key
                await gateway._serve("chat", Request({"type": "http", "headers": []}), dep_id)
        with pytest.raises(ApiError):  # /v1 with a wrong key
            await gateway._serve("chat", _request("nope"), None)
        with pytest.raises(ApiError):  # /v1 with b's key: b is not serving (its key names it)
            await gateway._serve("chat", _request("kb"), None)
        gateway.ctx.auth._watch.cancel()
        return gateway.ctx.meter.pending.counters

    counters = asyncio.run(scenario())
    assert counters == {
        ("raydock_requests_total", ("a", "", "", "401")): 1,
        ("raydock_requests_total", ("", "", "", "401")): 3,
        ("raydock_requests_total", ("b", "", "", "503")): 1,
    }


def test_one_bearer_parser_for_keys_and_the_metrics_token(monkeypatch):
    """RFC 7235: the scheme is case-insensitive (the management API: test_web_session_api)."""
    from fastapi.testclient import TestClient

    from raydock.serve_apps import gateway
    from raydock.serve_apps.access import bearer_token
    from raydock.serve_apps.metering import ReplicaMeter

    assert [bearer_token(h) for h in ("Bearer k", "bearer  k ", "BEARER k", " bearer k")] == [
        "k"
    ] * 4
    assert [bearer_token(h) for h in (None, "", "Bearer", "Bearer ", "Basic k", "Bearerk")] == [
        None
    ] * 6
    monkeypatch.setattr(gateway.ctx, "metrics_token", "tok", raising=False)
    monkeypatch.setattr(gateway.ctx, "meter", ReplicaMeter(None, enabled=False), raising=False)
    monkeypatch.setattr(gateway.ctx, "max_request_bytes", 1 << 20, raising=False)
    with TestClient(gateway.app) as client:
        for header, status in (("bearer tok", 404), ("Bearer tok", 404), ("bearer nope", 401)):
            # 404: past the token check, metering is off (meter None) in this test
            got = client.get("/metrics", headers={"authorization": header})
            assert got.status_code == status, header


def test_metrics_while_the_meter_is_started_again_are_a_503(monkeypatch):
    """Ray forgets the meter's name for a moment while it is started again: Prometheus gets
    a 503 with Retry-After (it was a 500), not a body it cannot parse."""
    import ray
    from fastapi.testclient import TestClient

    from raydock.serve_apps import gateway
    from raydock.serve_apps.metering import ReplicaMeter

    def no_such_actor(*args, **kwargs):
        raise ValueError("Failed to look up actor with name 'raydock-meter'")

    monkeypatch.setattr(ray, "get_actor", no_such_actor)
    monkeypatch.setattr(gateway.ctx, "metrics_token", "", raising=False)
    meter = ReplicaMeter(("raydock-meter", "raydock"), enabled=False)
    monkeypatch.setattr(gateway.ctx, "meter", meter, raising=False)
    monkeypatch.setattr(gateway.ctx, "max_request_bytes", 1 << 20, raising=False)
    with TestClient(gateway.app) as client:
        got = client.get("/metrics")
    assert got.status_code == 503 and got.headers["Retry-After"] == "5", got.text


def test_a_deployment_name_with_a_slash_is_retrieved_by_name(monkeypatch):
    """Served model names often hold "/" (meta-llama/Llama-3.1-8B): client.models.retrieve
    of such a name was a 404 "no such route"; one with ":" (a tag) was taken for a name and
    an adapter's."""
    from fastapi.testclient import TestClient

    from raydock.serve_apps import gateway
    from raydock.serve_apps.metering import ReplicaMeter

    hub = AccessHub()
    hub._loaded = True
    named = snapshot("dp-1", {"k1": ""}) | {"name": "acme/chat v2:cpu"}
    asyncio.run(hub.publish({"dp-1": named}))
    monkeypatch.setattr(ray, "get_actor", lambda *a, **k: _HubHandle(hub))
    monkeypatch.setattr(gateway.ctx, "auth", Auth(("hub", "ns"), ("r", "ns")), raising=False)
    monkeypatch.setattr(gateway.ctx, "meter", ReplicaMeter(None, enabled=False), raising=False)
    monkeypatch.setattr(gateway.ctx, "max_request_bytes", 1 << 20, raising=False)
    with TestClient(gateway.app) as client:
        got = client.get("/v1/models/acme/chat v2:cpu", headers={"authorization": "Bearer k1"})
        assert got.status_code == 200 and got.json()["id"] == "dp-1", got.text


def test_v1_names_adapters_whose_names_hold_colons_or_repeat():
    """`model: "d1:lora:v2"` was split at its last ":" (404), and /v1/models listed two
    adapters named alike as one id that a request could not use (400 ambiguous)."""
    from raydock.serve_apps import gateway, protocol
    from raydock.serve_apps.access import DeploymentAccess
    from raydock.serve_apps.openai_service import requested_adapter

    adapter = {"rank": 8, "prefix": "p", "digest": "d"}
    adapters = {
        "cm-a": {"name": "lora:v2", **adapter},
        "cm-b": {"name": "dup", **adapter},
        "cm-c": {"name": "dup", **adapter},
    }
    dep = DeploymentAccess.from_dict(
        snapshot("dp-1", {}) | {"name": "chat:prod", "adapters": adapters}
    )

    def picked(model: str) -> str | None:
        ask = [{"role": "user", "content": "hi"}]
        req = protocol.parse(protocol.ChatRequest, {"model": model, "messages": ask})
        found = requested_adapter(req, dep, by_model=True)
        return found and found["id"]

    assert picked("dp-1:lora:v2") == picked("chat:prod:lora:v2") == "cm-a"
    assert picked("chat:prod") is None
    listed = [m["id"] for m in gateway._models(dep)]
    assert listed == ["dp-1", "dp-1:lora:v2", "dp-1:cm-b", "dp-1:cm-c"]
    assert [picked(m) for m in listed] == [None, "cm-a", "cm-b", "cm-c"]  # each one usable
    # the replica's refusals of it name the field the request used
    ask = [{"role": "user", "content": "hi"}]
    req = protocol.parse(protocol.ChatRequest, {"model": "dp-1:lora:v2", "messages": ask})
    assert requested_adapter(req, dep, by_model=True)["param"] == "model"
