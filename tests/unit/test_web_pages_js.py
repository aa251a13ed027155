"""The dashboard's page logic that needs no browser, run by node on the page's own modules
(raydock/web/app): the Metrics tab's request count over the meter's real series, and how a
page's live refresh treats a 404 (the deployment or model is gone) and other errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from raydock.metering import catalog as M
from raydock.metering.batch import Batch
from raydock.metering.history import History

APP = Path(__file__).resolve().parents[2] / "raydock" / "web" / "app"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


def run_node(script: str):
    """`script` as an ES module; what it prints is JSON."""
    ran = subprocess.run(
        ["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)


def test_the_requests_tile_counts_every_request_of_the_window():
    """The tester's case: a first interval of 12.25 s, not 10 (the tile showed 27 for 28)."""
    totals = Batch()
    history = History(interval_s=10, window_s=3600)
    history.record(1000.0, totals, {})
    totals.inc(M.REQUESTS, ("d1", "", "k1", "200"), 4)
    history.record(1012.25, totals, {})
    totals.inc(M.REQUESTS, ("d1", "", "k1", "200"), 23)
    history.record(1022.25, totals, {})
    totals.inc(M.REQUESTS, ("d1", "", "k1", "429"), 1)  # the live point, 2.5 s long
    points = history.series("d1", now=1024.75, totals=totals)
    script = f"""
const {{ requestsInWindow }} = await import({json.dumps((APP / "pages" / "metrics.js").as_uri())});
console.log(JSON.stringify(requestsInWindow({json.dumps(points)})));
"""
    assert run_node(script) == 28


def test_a_404_stops_the_refresh_and_other_errors_show_and_are_retried():
    script = f"""
const {{ ApiError }} = await import({json.dumps((APP / "api.js").as_uri())});
const {{ pageErrors, poll }} = await import({json.dumps((APP / "ui.js").as_uri())});
const answers = [new ApiError(503, "the meter is busy"), null, new ApiError(404, "gone")];
const line = {{ textContent: "", hidden: true }};
const seen = {{ calls: 0, gone: 0, lines: [] }};
const stop = poll(async () => {{
  const err = answers[seen.calls++];
  seen.lines.push([line.textContent, line.hidden]);
  if (err) throw err;
  line.hidden = true;  // as a page does after a refresh that worked
}}, 5, pageErrors(line, () => seen.gone++));
await new Promise((resolve) => setTimeout(resolve, 100));
stop();
console.log(JSON.stringify(seen));
"""
    seen = run_node(script)
    assert seen["calls"] == 3  # the 503 was retried; nothing after the 404
    assert seen["gone"] == 1
    assert seen["lines"][1] == ["the meter is busy", False]  # shown until a refresh worked


def test_the_python_snippet_quotes_any_deployment_name():
    """A deployment name is free text: pasted into the copy-ready Python call unquoted, a
    name like this one ran code on whoever ran the snippet."""
    import ast

    name = '" + __import__("os").system("touch pwned") + "\\\\\'x\u2028'
    dep = {"deploymentId": "dp-1", "name": name}
    script = f"""
const {{ python }} = await import({json.dumps((APP / "pages" / "snippets.js").as_uri())});
console.log(JSON.stringify(python("http://h:8000", {json.dumps(dep)}, false)));
"""
    tree = ast.parse(run_node(script))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    (model,) = [k.value for c in calls for k in c.keywords if k.arg == "model"]
    assert isinstance(model, ast.Constant) and model.value == name


def test_the_dashboard_cuts_an_upload_into_chunks_the_server_takes():
    """A server whose chunk limit is below the dashboard's 8 MiB refused every dashboard
    upload (400 invalid_chunking): the dashboard now cuts by the limit its session states.
    The browser's fetch and XMLHttpRequest are stood in for; the page's own code runs."""
    from raydock.platform.api_uploads import chunking_problem

    limit, size = 2**20, 5 * 2**20 + 1
    script = f"""
globalThis.document = {{ cookie: "" }};
const seen = {{ starts: [], chunks: [] }};
globalThis.fetch = async (url, init) => {{
  if (url.endsWith("/files/session/start")) seen.starts.push(JSON.parse(init.body));
  const body = url.endsWith("/start") ? {{ sessionId: "s1" }} : {{ modelId: "cm-1" }};
  return {{ ok: true, status: 200, text: async () => JSON.stringify(body) }};
}};
globalThis.XMLHttpRequest = class {{
  constructor() {{ this.upload = {{}}; }}
  open(method, url) {{ this.url = url; }}
  setRequestHeader() {{}}
  send(blob) {{ seen.chunks.push([this.url, blob.size]); this.status = 200; this.onload(); }}
}};
const {{ uploadZip }} = await import({json.dumps((APP / "pages" / "import.js").as_uri())});
const file = new File([new Uint8Array({size})], "m.zip");
const ref = await uploadZip(file, {{ kind: "base" }}, () => {{}}, "csrf",
  new AbortController().signal, {limit});
console.log(JSON.stringify({{ ...seen, ref }}));
"""
    seen = run_node(script)
    [start] = seen["starts"]
    assert start["totalSize"] == size and start["totalChunks"] == 6
    assert chunking_problem(start["totalSize"], start["totalChunks"], limit) is None
    assert [n for _, n in seen["chunks"]] == [limit] * 5 + [1]
    assert seen["chunks"][-1][0].endswith("/chunks/6") and seen["ref"] == {"modelId": "cm-1"}
