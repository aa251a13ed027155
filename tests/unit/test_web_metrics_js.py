"""The dashboard's Prometheus reader (raydock/web/app/prom.js), run by node on raydock's own
exposition: the Metrics tab's totals and TTFT p50 are what Prometheus would compute."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from raydock.metering import catalog as M
from raydock.metering import exposition
from raydock.metering.batch import Batch

PROM_JS = Path(__file__).resolve().parents[2] / "raydock" / "web" / "app" / "prom.js"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


def run_js(text: str) -> dict:
    script = f"""
import {{ parseMetrics, total, buckets, quantile, bucketDelta }}
  from {json.dumps(PROM_JS.as_uri())};
const s = parseMetrics({json.dumps(text)});
const want = {{ deployment: "d1" }};
const b = buckets(s, "raydock_time_to_first_token_seconds", want);
console.log(JSON.stringify({{
  requests: total(s, "raydock_requests_total", want),
  other: total(s, "raydock_requests_total", {{ deployment: "d2" }}),
  p50: quantile(0.5, b),
  p90: quantile(0.9, b),
  none: quantile(0.5, bucketDelta(b, b)),
}}));
"""
    out = subprocess.run(
        ["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_totals_and_ttft_quantiles_from_the_exposition():
    batch = Batch()
    batch.inc(M.REQUESTS, ("d1", "", "k1", "200"), 3)
    batch.inc(M.REQUESTS, ("d1", "a1", "k2", "429"), 2)  # every adapter, key and status
    batch.inc(M.REQUESTS, ("d2", "", "k3", "200"))
    for value in [0.03] * 4 + [0.2] * 6:  # 4 in (0.025, 0.05], 6 in (0.1, 0.25]
        batch.observe(M.TTFT, ("d1", ""), value)
    batch.observe(M.TTFT, ("d2", ""), 100.0)  # another deployment's: not counted
    got = run_js(exposition.render(batch).decode())
    assert got["requests"] == 5 and got["other"] == 1
    # Prometheus' histogram_quantile: linear inside the bucket that holds the rank
    assert got["p50"] == pytest.approx(0.1 + 0.15 * (1 / 6))
    assert got["p90"] == pytest.approx(0.1 + 0.15 * (5 / 6))
    assert got["none"] is None  # no request between two readings: no figure, not 0
