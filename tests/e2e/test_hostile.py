"""Hostile input: every malformed request gets an OpenAI-shaped 4xx naming the problem, no
error body leaks internals, and what is refused leaves nothing behind."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.e2e.conftest import ASK_JSON, Live

# what an error body must never show: tracebacks, Ray internals, paths, terminal colours
LEAKS = re.compile(r"Traceback|File \"|ray::|pid=|ip=|actor_id|\x1b\[|/site-packages/|\.py\b")


def assert_clean_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert not LEAKS.search(json.dumps(r.json())), err
    assert err["request_id"] and err["request_id"] in r.headers["x-request-id"]
    if param is not None:
        assert err["param"] == param, err
    return err


def chat(live: Live, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {live.key}", **kw.pop("headers", {})}
    return httpx.post(f"{live.base_url}/chat/completions", headers=headers, timeout=60, **kw)


def test_inference_refuses_malformed_bodies_with_400_saying_where(live):
    err = assert_clean_error(chat(live, content=b'{"messages": [\xff]}'), 400, "body")
    assert "UTF-8" in err["message"]
    err = assert_clean_error(chat(live, content=b'{"messages": [}'), 400, "body")
    assert "line 1, column 15" in err["message"]
    deep = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b', "messages": []}'
    err = assert_clean_error(chat(live, content=deep), 400, "body")
    assert "deeper than" in err["message"]
    schema: dict = {"type": "string"}
    for _ in range(200):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}
    r = chat(live, json={"messages": ASK_JSON, "response_format": fmt})
    assert "deeper than" in assert_clean_error(r, 400, "body")["message"]


def test_bodies_over_the_limit_are_413_before_any_work(platform, live):
    limit = platform.settings.max_request_bytes
    huge = {"messages": [{"role": "user", "content": "a" * (limit + 1)}]}
    err = assert_clean_error(chat(live, json=huge), 413, "body")
    assert str(limit) in err["message"]
    with platform.http() as http:
        r = http.patch("/api/public/models/nope", json={"description": "a" * (limit + 1)})
    assert_clean_error(r, 413, "body")


def test_a_prompt_too_long_for_the_context_is_refused_without_tokenizing(live):
    # 2 MB: under the body limit, far over what 2048 tokens can hold
    r = chat(live, json={"messages": [{"role": "user", "content": "word " * 400_000}]})
    err = assert_clean_error(r, 400, "messages")
    assert err["code"] == "context_length_exceeded" and "2000000 characters" in err["message"]
    # the replica still answers at once
    r = chat(live, json={"messages": ASK_JSON, "max_tokens": 2})
    assert r.status_code == 200


def test_management_errors_name_the_field_and_show_no_internals(platform, ready_model):
    with platform.http() as http:
        for path in (
            "/api/public/models/cm-nope",
            "/api/public/deployments/dp-nope",
            "/api/public/deployments/dp-nope/history",
            "/api/public/deployments/dp-nope/api-keys",
            "/api/public/dock-status/ds-nope",
            "/api/public/files/session/up-nope",
        ):
            err = assert_clean_error(http.get(path), 404)
            assert "not found" in err["message"]
        err = assert_clean_error(http.post("/api/public/deployments/dp-nope/undeploy"), 404)
        err = assert_clean_error(http.get("/api/public/no/such/route"), 404)
        assert "no such route" in err["message"]
        assert_clean_error(http.put("/api/public/models"), 405)

        r = http.post(
            "/api/public/users",
            content=b'{"name": "x", "email": ',
            headers={"Content-Type": "application/json"},
        )
        err = assert_clean_error(r, 422, "body")
        assert "not valid JSON" in err["message"] and "character" in err["message"]
        err = assert_clean_error(
            http.post("/api/public/users", json={"name": "x", "email": "not-an-email"}), 422
        )
        assert err["param"] == "email"
        model = f"/api/public/models/{ready_model['modelId']}"
        err = assert_clean_error(http.patch(model, json={"tags": ["t" * 101]}), 422, "tags.0")
        assert "100 characters" in err["message"]
        assert_clean_error(http.patch(model, json={"tags": ["t"] * 51}), 422, "tags")
        assert http.get(model).json()["tags"] == []  # nothing half-written
        r = http.post(
            "/api/public/models/import",
            files={"file": ("m.zip", b"PK")},
            data={"tags": "ok," + "t" * 101},
        )
        assert_clean_error(r, 422, "tags.1")
        assert not list(platform.settings.uploads_path.glob("*.zip"))  # nothing kept


def test_the_cli_prints_one_line_per_error(platform, capsys):
    from raydock.cli import main

    assert main(["models", "--url", platform.url, "--key", "rdk-wrong"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "raydock: HTTP 401: invalid management API key"
    assert main(["models", "--url", "http://127.0.0.1:9", "--key", "x"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("role", ["tool", "assistant"])
def test_tool_fields_are_validated(live, role):
    bad = {"role": role, "content": "x", "tool_calls": [{"id": "c", "function": {}}]}
    r = chat(live, json={"messages": [*ASK_JSON, bad]})
    err = assert_clean_error(r, 400)
    assert err["param"].startswith("messages.1.tool_calls.0.function")


def test_hostile_constraints_are_bounded_on_transformers(live):
    """The hostile schemas and regex (test_engines.py does CTranslate2 and vLLM): refused
    naming the bound or served lazily, within the time bound, the replica's memory (from
    /proc) staying within the guided limits' ~100 MB, then business as usual."""
    import openai

    from tests.e2e.replica_memory import peak_rss
    from tests.e2e.test_engines import hostile_bounds

    sdk = openai.OpenAI(base_url=live.base_url, api_key=live.key)
    with peak_rss(live.deployment["deploymentId"]) as memory:
        hostile_bounds(sdk)
    print(f"replica memory {memory.before / 2**20:.0f} MiB, peak +{memory.growth_mib:.0f} MiB")
    assert memory.growth_mib < 200
