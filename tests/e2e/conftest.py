"""One real local Ray cluster and one raydock platform for the whole test session."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import ray

from raydock.client import Client, default_deploy_body
from raydock.config import Settings, load_settings
from raydock.modelgen import build_model_zip
from raydock.platform.bootstrap import connect, free_port, start_platform, stop_platform
from raydock.platform.store import ArtifactStore

pytestmark = pytest.mark.e2e


@dataclass
class Platform:
    settings: Settings
    url: str
    admin_key: str
    client: Client

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.settings.artifacts)

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"X-api-key": key or self.admin_key}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


def boot(settings: Settings) -> dict:
    # 16 logical CPUs on a 2-core machine: replicas mostly wait on each other, not on cores
    connect(settings, num_cpus=16, include_dashboard=False)
    return start_platform(settings)


@pytest.fixture(scope="session")
def platform(tmp_path_factory) -> Platform:
    home = tmp_path_factory.mktemp("raydock-home")
    # a 20 MiB archive limit lets the size-limit test stay small
    settings = load_settings(home=str(home), port=free_port(), max_archive_bytes=20 * 2**20)
    info = boot(settings)
    assert info["admin_key"], "a fresh data dir must print the first admin key"
    p = Platform(settings, info["url"], info["admin_key"], Client(info["url"], info["admin_key"]))
    yield p
    if ray.is_initialized():
        stop_platform()
        ray.shutdown()


@pytest.fixture(scope="session")
def zips(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zips")


@pytest.fixture(scope="session")
def tiny_zip(zips) -> Path:
    return build_model_zip(zips / "tiny-chat.zip", size="tiny", seed=0)


def import_ready(platform: Platform, path: Path, **options) -> dict:
    ref = platform.client.import_zip(path, **options)
    job = platform.client.wait_job(ref["dockStatusId"], timeout=300)
    model = platform.client.get(f"/models/{ref['modelId']}")
    assert job["status"] == "SUCCESS", model
    assert model["status"] == "READY"
    return model


@pytest.fixture(scope="session")
def ready_model(platform, tiny_zip) -> dict:
    return import_ready(platform, tiny_zip)


def deploy_and_wait(platform: Platform, model_id: str, name: str, **overrides) -> dict:
    ref = platform.client.deploy(model_id, default_deploy_body(name, **overrides))
    job = platform.client.wait_job(ref["dockStatusId"], timeout=600)
    dep = platform.client.get(f"/deployments/{ref['deploymentId']}")
    assert job["status"] == "SUCCESS", dep
    assert dep["status"] == "DEPLOYED"
    return dep


@dataclass
class Live:
    deployment: dict
    key: str
    base_url: str  # for the OpenAI SDK: .../deployments/<id>/v2


@pytest.fixture(scope="session")
def live(platform, ready_model) -> Live:
    dep = deploy_and_wait(platform, ready_model["modelId"], "chat-main")
    key = platform.client.create_key(dep["deploymentId"], "tests")
    return Live(dep, key, f"{platform.url}/deployments/{dep['deploymentId']}/v2")


def wait_for(predicate, timeout: float = 60, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def legacy_sdk(sdk: openai.OpenAI) -> openai.OpenAI:
    """The same deployment's legacy base (`.../v1`: completions) beside the SDK's `.../v2`."""
    return sdk.with_options(base_url=str(sdk.base_url).rstrip("/").removesuffix("/v2") + "/v1")


def greedy_tokens(sdk, messages: list[dict], **extra) -> list[str]:
    """The tokens (from logprobs) of a greedy 32-token chat reply; `extra` goes in the body."""
    reply = sdk.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=32,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True, **extra},
    )
    return [t.token for t in reply.choices[0].logprobs.content]
