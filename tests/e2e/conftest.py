"""One real local Ray cluster and one raydock platform for the whole test session."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import ray
from playwright.sync_api import Browser, Page, expect, sync_playwright

from raydock.artifacts import ArtifactStore
from raydock.client import Client, default_deploy_body
from raydock.config import Settings, load_settings
from raydock.modelgen import build_model_zip
from raydock.platform.bootstrap import connect, free_port, start_platform, stop_platform
from tests.hf_hub import FakeHub
from tests.notify_sinks import NotifySinks
from tests.pg_server import pg_server  # noqa: F401 (RAYDOCK_TEST_DB=postgresql)

pytestmark = pytest.mark.e2e

ASK_JSON = [{"role": "user", "content": "Hello"}]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that replace the session's cluster run after every other test, and one that
    leaves it stopped (`restarts_cluster(leaves_it_down=True)`) last of all: a test after it
    would wait for the cluster to boot again (`_session_cluster_up`), the last one does not."""

    def order(item: pytest.Item) -> int:
        marker = item.get_closest_marker("restarts_cluster")
        if marker is None:
            return 0
        return 2 if marker.kwargs.get("leaves_it_down") else 1

    items.sort(key=order)


@dataclass
class Platform:
    settings: Settings
    url: str
    admin_key: str
    client: Client

    @property
    def store(self) -> ArtifactStore:
        return self.settings.store()

    def stored(self, area: str) -> set[str]:
        """What the artifact store holds in one area ("models", "optimized", "uploads",
        "exports"): the names one level below it."""
        return {key.split("/")[1] for key in self.store.list(area)}

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"X-api-key": key or self.admin_key}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


def boot(settings: Settings) -> dict:
    # 16 logical CPUs on a 2-core machine: replicas mostly wait on each other, not on cores
    # the dashboard runs Ray's job server (`ray job submit`, tests/e2e/test_apply.py): about
    # 225 MiB (PSS) and 2-3 s more to start, once per session (DEVELOPERS.md)
    connect(settings, num_cpus=16, include_dashboard=True, dashboard_port=free_port())
    return start_platform(settings)


@pytest.fixture(scope="session")
def hf_hub() -> FakeHub:
    """The Hugging Face Hub the platform downloads from (a local server speaking its API)."""
    with FakeHub() as hub:
        yield hub


@pytest.fixture(scope="session")
def notify_sinks() -> NotifySinks:
    """Where the platform's notifications go: a real SMTP server, a webhook receiver."""
    with NotifySinks() as sinks:
        yield sinks


def session_database_url(request) -> str | None:
    """RAYDOCK_TEST_DB=postgresql: the session's platform keeps its state in a database on a
    PostgreSQL server the session starts (tests/pg_server.py), else in the data dir's SQLite
    file. README's test command runs the `core` tests both ways."""
    if os.environ.get("RAYDOCK_TEST_DB", "sqlite") == "sqlite":
        return None
    try:
        return request.getfixturevalue("pg_server").new_database()
    except pytest.skip.Exception as exc:  # asked for: a missing server fails the session
        pytest.fail(f"RAYDOCK_TEST_DB=postgresql, but {exc}")


@pytest.fixture(scope="session")
def platform(request, tmp_path_factory, hf_hub, notify_sinks) -> Platform:
    home = tmp_path_factory.mktemp("raydock-home")
    # a 20 MiB archive limit lets the size-limit test stay small
    settings = load_settings(
        home=str(home),
        database_url=session_database_url(request),
        port=free_port(),
        max_archive_bytes=20 * 2**20,
        hf_endpoint=hf_hub.url,
        **notify_sinks.settings(),
    )
    info = boot(settings)
    assert info["admin_key"], "a fresh data dir must print the first admin key"
    # on PostgreSQL, no SQLite file appears in the data dir
    assert (home / "raydock.db").exists() == (not settings.database_url)
    p = Platform(settings, info["url"], info["admin_key"], Client(info["url"], info["admin_key"]))
    yield p
    if ray.is_initialized():
        stop_platform()
        ray.shutdown()


@pytest.fixture(autouse=True)
def _session_cluster_up(request) -> None:
    """A test that stopped the session's cluster and left it down (`raydock up`'s, which
    needs the machine to itself) has the next test that uses the platform boot it again."""
    if "platform" in request.fixturenames:
        platform = request.getfixturevalue("platform")
        if not ray.is_initialized():
            boot(platform.settings)


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


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
}


def tool_conversation(sdk: openai.OpenAI) -> None:
    """The OpenAI tool flow over three turns: a call, its result, another call, its result,
    then an answer in text. Every turn's prompt holds what came before (tool results too)."""
    messages: list[dict] = [{"role": "user", "content": "The weather in Paris, then Rome?"}]
    prompt_tokens = []
    for turn in range(2):
        reply = sdk.chat.completions.create(
            model="m",
            messages=messages,
            tools=[WEATHER_TOOL],
            tool_choice="required",
            seed=turn,
            max_tokens=100,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments)["city"], str)
        prompt_tokens.append(reply.usage.prompt_tokens)
        messages.append(choice.message.model_dump(exclude_none=True))  # as SDK users do
        messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'})

    def answer(conversation: list[dict]):
        return sdk.chat.completions.create(
            model="m", messages=conversation, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=8
        )

    final = answer(messages)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason in ("stop", "length")
    prompt_tokens.append(final.usage.prompt_tokens)
    assert prompt_tokens == sorted(set(prompt_tokens)), prompt_tokens  # each turn adds to it
    # the tool's result is part of the prompt, not dropped
    longer = [*messages[:-1], {**messages[-1], "content": '{"celsius": 21, "wind": "strong"}'}]
    assert answer(longer).usage.prompt_tokens > final.usage.prompt_tokens


# the web dashboard in a real browser: Debian's chromium driven by Playwright
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TIMEOUT_MS = 15_000
#: where the pages' screenshots go (build artifacts; git-ignored)
SHOTS = Path(
    os.environ.get("RAYDOCK_SCREENSHOTS")
    or Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
)


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def browser() -> Browser:
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed (apt-get install chromium; .ci/run does)")
    with sync_playwright() as pw:
        # root in a container: chromium's sandbox needs user namespaces it may not have
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, platform: Platform) -> Page:
    context = browser.new_context(base_url=platform.url, viewport={"width": 1280, "height": 860})
    # Copy cURL writes to the clipboard; the test reads it back
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=platform.url)
    context.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors  # no uncaught script error on any page


def sign_in(page: Page, key: str) -> None:
    page.goto("/")
    page.get_by_label("Management key").fill(key)
    page.get_by_role("button", name="Sign in").click()
