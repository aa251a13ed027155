"""Metrics, usage and key limits as users see them: /metrics, /api/public/usage, 429s."""

from __future__ import annotations

import csv
import io
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_dashboards import dashboard_metric_names, exported_sample_names

from .conftest import wait_for

SAY = [{"role": "user", "content": "Count to ten."}]
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "n",
        "schema": {
            "type": "object",
            "properties": {"n": {"type": "integer"}, "metering": {"type": "boolean"}},
            "required": ["n", "metering"],
        },
    },
}


def scrape(platform) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{platform.url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(
        v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()
    )


def _key(platform, dep_id: str, name: str, limits: dict | None = None) -> dict:
    body = {"name": name} | ({"limits": limits} if limits else {})
    return platform.client.post(f"/deployments/{dep_id}/api-keys", json=body)


def _chat(platform, dep_id: str, key: str, **extra) -> httpx.Response:
    body = {"messages": SAY, "max_tokens": 8} | extra
    return httpx.post(
        f"{platform.url}/deployments/{dep_id}/v2/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )


def test_metrics_move_by_what_was_served(platform, live):
    dep_id = live.deployment["deploymentId"]
    key = _key(platform, dep_id, "metrics")
    labels = {"deployment": dep_id, "key": key["keyId"]}
    before = scrape(platform)

    sdk = openai.OpenAI(base_url=live.base_url, api_key=key["apiKey"])
    usages = [sdk.chat.completions.create(model="m", messages=SAY, max_tokens=8).usage]
    stream = sdk.chat.completions.create(
        model="m",
        messages=SAY,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    usages.append([c for c in stream if c.usage][-1].usage)
    v1 = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=key["apiKey"])
    usages.append(v1.completions.create(model=dep_id, prompt="Once", max_tokens=5).usage)
    guided = _chat(platform, dep_id, key["apiKey"], response_format=SCHEMA, max_tokens=40)
    assert guided.status_code == 200, guided.text
    usages.append(guided.json()["usage"])
    usages = [u if isinstance(u, dict) else u.model_dump() for u in usages]
    assert _chat(platform, dep_id, "sk-wrong").status_code == 401

    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)

    refused = {"deployment": dep_id, "key": "", "status": "401"}

    def moved() -> dict | None:  # replicas report twice a second
        after = scrape(platform)
        served_all = value(after, "raydock_requests_total", status="200", **labels) == 4
        refused_too = value(after, "raydock_requests_total", **refused) > value(
            before, "raydock_requests_total", **refused
        )
        return after if served_all and refused_too else None

    after = wait_for(moved, timeout=10, interval=0.3)
    assert value(after, "raydock_prompt_tokens_total", **labels) == prompt
    assert value(after, "raydock_completion_tokens_total", **labels) == completion
    served = {"deployment": dep_id}
    for hist in (
        "raydock_time_to_first_token_seconds",
        "raydock_request_duration_seconds",
        "raydock_time_per_output_token_seconds",  # requests of more than one token
    ):
        moved_by = value(after, f"{hist}_count", **served) - value(
            before, f"{hist}_count", **served
        )
        assert 1 <= moved_by <= 4 if "per_output" in hist else moved_by == 4, hist
        assert value(after, f"{hist}_sum", **served) > value(before, f"{hist}_sum", **served)
    assert (
        value(after, "raydock_requests_total", **refused)
        - value(before, "raydock_requests_total", **refused)
        == 1
    )
    # the schema was new to the replica: compiled once, its time observed
    compiles = value(after, "raydock_guided_compile_seconds_count", **served) - value(
        before, "raydock_guided_compile_seconds_count", **served
    )
    misses = value(after, "raydock_guided_cache_misses_total", **served) - value(
        before, "raydock_guided_cache_misses_total", **served
    )
    assert compiles >= 1 and misses == 1
    assert value(after, "raydock_replicas", **served) == 1
    assert value(after, "raydock_replicas_target", **served) == 1
    assert value(after, "raydock_jobs_total", action="DEPLOY", status="SUCCESS") >= 1
    assert value(after, "raydock_job_duration_seconds_count", action="DEPLOY") >= 1
    # no label carries the key itself; the shipped dashboard reads only what is exported
    text = httpx.get(f"{platform.url}/metrics").text
    assert key["apiKey"] not in text
    assert dashboard_metric_names() <= exported_sample_names(text)


def test_usage_equals_the_responses_and_exports_as_csv(platform, live):
    dep_id = live.deployment["deploymentId"]
    key = _key(platform, dep_id, "=usage+1")  # a spreadsheet would run it as a formula
    usages = []
    for n in (3, 7):
        r = _chat(platform, dep_id, key["apiKey"], max_tokens=n)
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
    http = platform.http()
    params = {"deploymentId": dep_id, "keyId": key["keyId"], "groupBy": "day"}
    # written off the request path, within a few seconds
    got = wait_for(
        lambda: (
            (u := http.get("/api/public/usage", params=params).json())["totals"]["requests"] == 2
            and u
        ),
        timeout=10,
    )
    assert got["totals"]["promptTokens"] == sum(u["prompt_tokens"] for u in usages)
    assert got["totals"]["completionTokens"] == sum(u["completion_tokens"] for u in usages)
    assert got["totals"]["totalTokens"] == sum(u["total_tokens"] for u in usages)
    (row,) = got["rows"]
    assert row["keyName"] == "=usage+1" and row["deploymentId"] == dep_id
    assert row["period"] == time.strftime("%Y-%m-%d", time.gmtime())

    exported = http.get("/api/public/usage", params=params | {"format": "csv"})
    assert exported.headers["content-type"].startswith("text/csv")
    (line,) = list(csv.DictReader(io.StringIO(exported.text)))
    assert int(line["totalTokens"]) == got["totals"]["totalTokens"]
    assert line["keyName"] == "'=usage+1"  # shown as text, not run
    # a time range that ends before the requests holds none of them
    empty = http.get("/api/public/usage", params=params | {"end": "2020-01-01"}).json()
    assert empty["totals"]["requests"] == 0
    bad = http.get("/api/public/usage", params={"start": "yesterday"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "start"


def test_a_key_over_its_limit_gets_429_and_a_change_applies_within_a_second(platform, live):
    dep_id = live.deployment["deploymentId"]
    key = _key(platform, dep_id, "limited", {"requestsPerMinute": 3})
    assert key["limits"]["requestsPerMinute"] == 3
    codes = [_chat(platform, dep_id, key["apiKey"], max_tokens=2).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    refused = _chat(platform, dep_id, key["apiKey"])
    assert refused.status_code == 429
    err = refused.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and "requestsPerMinute" in err["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # the /v1 path shares the count
    v1 = httpx.post(
        f"{platform.url}/v1/chat/completions",
        json={"model": dep_id, "messages": SAY, "max_tokens": 2},
        headers={"Authorization": f"Bearer {key['apiKey']}"},
        timeout=60,
    )
    assert v1.status_code == 429
    # the limit lifted: served again within a second
    patched = platform.http().patch(
        f"/api/public/deployments/{dep_id}/api-keys/{key['keyId']}",
        json={"limits": {"requestsPerMinute": None}},
    )
    assert patched.status_code == 200 and patched.json()["limits"]["requestsPerMinute"] is None
    changed = time.monotonic()
    wait_for(
        lambda: _chat(platform, dep_id, key["apiKey"], max_tokens=1).status_code == 200,
        timeout=1,
        interval=0.05,
    )
    print(f"limit change applied after {time.monotonic() - changed:.3f} s")
    bad = platform.http().patch(
        f"/api/public/deployments/{dep_id}/api-keys/{key['keyId']}",
        json={"limits": {"requestsPerMinute": 0}},
    )
    assert bad.status_code == 422 and "requestsPerMinute" in bad.text


def test_a_budget_reached_mid_stream_ends_that_stream_and_refuses_the_next(
    platform, live, notify_sinks
):
    """The rule: a request admitted under the budget runs to its end; the next one is
    refused with tokensPerDay until midnight UTC. Its owner hears that it is exhausted (not
    also that it nears its end: one request went past both)."""
    dep_id = live.deployment["deploymentId"]
    key = _key(platform, dep_id, "budget", {"tokensPerDay": 30})
    with httpx.stream(
        "POST",
        f"{platform.url}/deployments/{dep_id}/v2/chat/completions",
        json={
            "messages": SAY,
            "max_tokens": 40,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        },
        headers={"Authorization": f"Bearer {key['apiKey']}"},
        timeout=120,
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    usage = json.loads(lines[-1][6:])["usage"]
    assert usage["completion_tokens"] == 40  # the stream was not cut
    refused = wait_for(
        lambda: (x := _chat(platform, dep_id, key["apiKey"])).status_code == 429 and x,
        timeout=5,
        interval=0.2,
    )
    assert "tokensPerDay" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) <= 86_400
    # one stream passed both thresholds: the exhausted notice, signed, to the platform's
    # webhook and its email
    hooks, path = notify_sinks.hooks, notify_sinks.PLATFORM_PATH
    got = wait_for(lambda: hooks.find("key.budget_exhausted", path, keyId=key["keyId"]), 10)
    assert got[0]["event"]["data"]["limit"] == 30 and got[0]["verified"], got
    assert got[0]["event"]["data"]["used"] >= 40
    assert notify_sinks.mail.find("key.budget_exhausted", notify_sinks.OPS_EMAIL)
    assert not hooks.find("key.budget_warning", path, keyId=key["keyId"])


#: a long prompt (hundreds of tokens): its prefill is the work a caller pays for
LONG = [{"role": "user", "content": " ".join(["the tide comes in and the tide goes out"] * 50)}]


@pytest.mark.parametrize("path", ["replica route", "gateway /v1"])
def test_a_stream_whose_client_goes_while_it_waits_for_a_batch_slot_is_charged_no_prompt(
    platform, live, path
):
    """The replica took the request (tokenized, queued for the engine: every slot decodes a
    long stream, and as many more wait before it), then the client closes the connection
    before the engine admitted it: the key's usage and /metrics have the request (499) and
    no token, as no token of it was computed (its prompt is charged from its admission)."""
    dep_id = live.deployment["deploymentId"]
    key = _key(platform, dep_id, f"cut before a token ({path})")
    http = platform.http()
    stats_url = f"/api/public/deployments/{dep_id}/stats"
    expected = _chat(platform, dep_id, live.key, messages=LONG, max_tokens=1)
    assert expected.status_code == 200, expected.text
    prompt = expected.json()["usage"]["prompt_tokens"]
    assert prompt > 100

    slots = http.get(stats_url).json()["maxBatchSize"]
    stop = threading.Event()
    answered: list[threading.Event] = []  # per long stream: its first token came

    def fill(first: threading.Event) -> None:  # a long stream, read until the test ends
        with httpx.stream(
            "POST",
            f"{platform.url}/deployments/{dep_id}/v2/chat/completions",
            json={"messages": SAY, "max_tokens": 512, "ignore_eos": True, "stream": True},
            headers={"Authorization": f"Bearer {live.key}"},
            timeout=120,
        ) as r:
            for _ in r.iter_lines():
                first.set()
                if stop.is_set():
                    return

    def queued() -> int:
        """Requests waiting for a slot, less the long streams that may still be waiting."""
        unanswered = sum(not e.is_set() for e in answered)  # read first: it only falls
        return http.get(stats_url).json()["waiting"] - unanswered

    # two waves of long streams: the request waits for the second one (512 steps at least)
    answered.extend(threading.Event() for _ in range(2 * slots))
    fillers = [threading.Thread(target=fill, args=(e,), daemon=True) for e in answered]
    try:
        for t in fillers:
            t.start()
        full = {"running": slots, "waiting": slots}
        wait_for(lambda: full.items() <= http.get(stats_url).json().items(), 30, 0.05)
        url = urlsplit(platform.url)
        route = (
            "/v1/chat/completions"
            if path == "gateway /v1"
            else f"/deployments/{dep_id}/v2/chat/completions"
        )
        body = json.dumps(
            {"model": dep_id, "messages": LONG, "max_tokens": 16, "stream": True}
        ).encode()
        client = socket.create_connection((url.hostname, url.port), timeout=30)
        client.sendall(
            (
                f"POST {route} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                f"Authorization: Bearer {key['apiKey']}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        # tokenized, waiting for a slot behind the second wave
        wait_for(lambda: queued() == 1, timeout=30, interval=0.05)
        time.sleep(0.5)
        client.setblocking(False)
        try:
            got = client.recv(1)
        except BlockingIOError:
            got = b""
        assert got == b"", "the answer began before the client went"
        client.close()  # the client goes before its first token
    finally:
        stop.set()
        for t in fillers:
            t.join(timeout=60)

    params = {"deploymentId": dep_id, "keyId": key["keyId"], "groupBy": "total"}
    usage = wait_for(
        lambda: (
            (u := http.get("/api/public/usage", params=params).json())["totals"]["requests"] == 1
            and u["totals"]
        ),
        timeout=10,
    )
    assert usage["promptTokens"] == 0 and usage["completionTokens"] == 0, usage
    samples = scrape(platform)
    went = {"deployment": dep_id, "key": key["keyId"], "status": "499"}
    assert value(samples, "raydock_requests_total", **went) == 1
    charged = {"deployment": dep_id, "key": key["keyId"]}
    assert value(samples, "raydock_prompt_tokens_total", **charged) == 0
