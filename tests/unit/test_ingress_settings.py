"""The ingress settings a cluster raydock starts itself gets (no Ray started here)."""

from __future__ import annotations

import os
import socket

from raydock.platform import bootstrap

PORT_VARS = (
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
)


def test_haproxy_ingress_takes_free_ports_of_its_own(monkeypatch):
    monkeypatch.setattr(os, "environ", {})
    bootstrap._use_haproxy_ingress()
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    ports = [int(os.environ[var]) for var in PORT_VARS]
    assert len(set(ports)) == 3
    for port in ports:
        with socket.socket() as s:
            s.bind(("", port))  # still free: nothing was left listening


def test_settings_from_the_environment_win(monkeypatch):
    monkeypatch.setattr(
        os,
        "environ",
        {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_HAPROXY_STATS_PORT": "18404"},
    )
    bootstrap._use_haproxy_ingress()
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
