"""The CLI's API client (raydock/client.py) facing what a proxy in front of raydock answers."""

from __future__ import annotations

import httpx
import pytest

from raydock.client import ApiFailure, Client


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (httpx.Response(502, html="<html>Bad Gateway</html>"), "HTTP 502: <html>Bad Gateway"),
        (httpx.Response(503, json={"error": "busy"}), "HTTP 503: busy"),
        (httpx.Response(404, json={"error": {"message": "no model"}}), "HTTP 404: no model"),
        (
            httpx.Response(500, text="{", headers={"content-type": "application/json"}),
            "HTTP 500: {",
        ),
    ],
)
def test_an_error_that_is_not_raydocks_is_still_one_line(reply, message):
    client = Client("http://raydock.test", "k")
    client.http = httpx.Client(
        base_url="http://raydock.test/api/public", transport=httpx.MockTransport(lambda r: reply)
    )
    with pytest.raises(ApiFailure) as failed:
        client.get("/models")
    assert str(failed.value).startswith(message)
