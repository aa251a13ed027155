"""When a redeploy replaces a deployment's running replicas and when Serve reconfigures them
in place (engine_app.versioned), and how its job says which it did; a redeploy that keeps
them is shown end to end in tests/e2e/test_prefix_routing.py."""

from __future__ import annotations

from raydock.client import default_deploy_body
from raydock.config import hardware_profiles
from raydock.optimizers.plan import EnginePlan
from raydock.platform.lifecycle import replicas_said, running_replicas
from raydock.serve_apps.engine_app import build_engine_app

CONTROL_PLANE = {"access_hub": ("hub", "ns"), "registry": ("reg", "ns"), "meter": ("m", "ns")}
ARTIFACT = {"prefix": "models/m1", "digest": "d1"}


def versions(engine: str = "vllm", access: dict | None = None, artifact=ARTIFACT, **overrides):
    """The Serve version of each deployment of the app a deploy body builds."""
    config = default_deploy_body("dep", **overrides)
    app = build_engine_app(
        "dep-1",
        access or {"keys": {}},
        CONTROL_PLANE,
        artifact,
        EnginePlan(engine, ""),
        config,
        hardware_profiles()["cpu-small"],
    )
    found = {app._bound_deployment.name: app._bound_deployment.version}
    router = getattr(app, "_ingress_request_router", None)
    if router is not None:
        found[router._bound_deployment.name] = router._bound_deployment.version
    return found


def test_scaling_routing_defaults_and_keys_keep_the_running_replicas():
    two = {"minReplicas": 2, "maxReplicas": 2}
    before = versions(scalingParameters=two)
    assert all(before.values())  # never Serve's random one
    assert versions(scalingParameters=two) == before
    assert versions(scalingParameters=two, access={"keys": {"h": "k1"}}) == before
    assert versions(scalingParameters=two, hyperParameters={"topK": 40}) == before
    wider = versions(scalingParameters={"minReplicas": 1, "maxReplicas": 3, "scaleUpDelay": 5})
    assert wider == before
    # the routing switch drops the route server (where HAProxy runs); the engine replicas stay
    off = versions(scalingParameters=two, routingParameters={"prefixCacheAffinity": False})
    assert off == {"engine": before["engine"]}


def test_what_a_replica_is_built_from_replaces_it():
    before = versions()
    assert versions(artifact={"prefix": "models/m1", "digest": "d2"}) != before
    assert versions(engine="transformers")["engine"] != before["engine"]
    assert versions(scalingParameters={"maxBatchSize": 4})["engine"] != before["engine"]


def details(app: str, replicas: dict[str, str]) -> dict:
    """serve_details with one app whose engine has `replicas` (id -> state)."""
    engine = {"replicas": [{"replica_id": r, "state": s} for r, s in replicas.items()]}
    return {"applications": {app: {"deployments": {"engine": engine, "router": {}}}}}


def test_a_deploy_job_says_which_replicas_serve_it_kept_or_started():
    running = running_replicas(details("dep-1", {"a": "RUNNING", "b": "STOPPING"}), "dep-1")
    assert running == {"a"}
    assert running_replicas({"applications": {}}, "dep-1") == set()
    assert replicas_said(set(), {"a", "b"}) == "2 replicas started"
    assert replicas_said({"a"}, {"c"}) == "1 replica started"
    assert replicas_said({"a", "b"}, {"a", "b"}) == (
        "2 replicas kept running (the change was applied to them)"
    )
    assert replicas_said({"a"}, {"a", "c"}) == "1 replica kept running, 1 started"
