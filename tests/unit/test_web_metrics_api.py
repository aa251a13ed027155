"""The dashboard's Metrics route (platform/api_web.py) when the meter cannot answer: over HTTP
(FastAPI's test client on the API app) with a real registry on SQLite, without Ray."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import ray
from fastapi.testclient import TestClient
from ray.exceptions import ActorUnavailableError, RayActorError

from raydock.client import default_deploy_body
from raydock.config import load_settings
from raydock.platform import api_deps, api_web
from raydock.platform.api import app
from raydock.platform.registry import Registry
from tests.unit.registry_handle import RegistryHandle


class _Meter:
    """The meter actor's handle as Ray gives it: `series.remote` fails or is slow."""

    def __init__(self, answer):
        self.answer = answer

        async def series(deployment_id):
            return await self.answer()

        self.series = type("M", (), {"remote": staticmethod(series)})


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYDOCK_SECRET_KEY", raising=False)
    reg = Registry(f"sqlite:///{tmp_path / 'raydock.db'}")
    admin_key = reg.ensure_admin()
    uid = reg.authenticate_management(admin_key)["userId"]
    model = reg.create_model("tiny", "file", uid)
    reg.set_model_status(model["modelId"], "VALIDATING")
    meta = {"artifactDigest": "d"}
    reg.set_model_status(model["modelId"], "READY", artifact_uri="/x", checksum="c", meta=meta)
    dep = reg.create_deployment(model["modelId"], default_deploy_body("a"), uid)
    monkeypatch.setattr(api_deps.ctx, "settings", load_settings(home=str(tmp_path)), raising=False)
    monkeypatch.setattr(api_deps.ctx, "registry", RegistryHandle(reg), raising=False)
    with TestClient(app, base_url="http://raydock.test") as c:
        c.headers["X-api-key"] = admin_key
        c.url_of = f"/public/deployments/{dep['deploymentId']}/metrics/history"
        yield c
    reg.close()


async def _dead():
    raise RayActorError()


async def _restarting():
    raise ActorUnavailableError("the actor is restarting", None)


async def _slow():
    await asyncio.sleep(5)


@pytest.mark.parametrize("answer", [_dead, _restarting, _slow])
def test_a_meter_that_cannot_answer_is_a_503_not_a_500(client, monkeypatch, answer):
    monkeypatch.setattr(ray, "get_actor", lambda *a, **k: _Meter(answer))
    monkeypatch.setattr(api_web, "METER_WAIT_S", 0.05)
    reply = client.get(client.url_of)
    assert reply.status_code == 503, reply.text
    assert "meter" in reply.json()["error"]["message"]
    assert reply.headers["Retry-After"] == "5"


def test_a_meter_between_two_lives_is_a_503_and_metering_off_a_404(client, monkeypatch):
    """Ray forgets the actor's name while the meter is started again: that is not "metering
    is off", which the settings say."""

    def no_such_actor(*args, **kwargs):
        raise ValueError("Failed to look up actor with name 'raydock-meter'")

    monkeypatch.setattr(ray, "get_actor", no_such_actor)
    assert client.get(client.url_of).status_code == 503
    off = dataclasses.replace(api_deps.ctx.settings, metering=False)
    monkeypatch.setattr(api_deps.ctx, "settings", off)
    reply = client.get(client.url_of)
    assert reply.status_code == 404 and "metering is off" in reply.json()["error"]["message"]
