"""The dashboard's form checks (raydock/web/app/schema.js), run by node on the API's own
OpenAPI document: for values in and out of every deploy-body range, the page refuses exactly
what the API's pydantic models refuse, with the API's message (schemas.describe_error)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from raydock.client import default_deploy_body
from raydock.platform import schemas
from raydock.platform.api import app

SCHEMA_JS = Path(__file__).resolve().parents[2] / "raydock" / "web" / "app" / "schema.js"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")

#: (field path, value) pairs: each range's edges, just past them, and wrong kinds
CASES = (
    [(("hyperParameters", "temperature"), v) for v in (0, 2, 2.0001, -0.1, 1.5)]
    + [(("hyperParameters", "maxTokens"), v) for v in (0, 512, 513, -1, 3.5)]
    + [(("hyperParameters", "topK"), v) for v in (0, 1, 100, 101)]
    + [(("scalingParameters", "maxBatchSize"), v) for v in (0, 1, 256, 257)]
    + [(("scalingParameters", "scaleDownDelay"), v) for v in (0, 2000, 2001)]
    + [(("adapterParameters", "maxLoadedAdapters"), v) for v in (-1, 0, 64, 65)]
    + [(("timeout",), v) for v in (29, 30, 180, 181)]
    + [(("name",), v) for v in ("", "x" * 200, "x" * 201)]
    + [(("tags",), v) for v in (["a"] * 50, ["a"] * 51, ["x" * 101])]
    + [(("optimizationInfo", "optimizationType"), v) for v in ("", "vllm", "tensorrt")]
)


def api_verdict(path: tuple[str, ...], value) -> str | None:
    body = default_deploy_body("d")
    target = body
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    try:
        schemas.DeployRequest.model_validate(body)
    except ValidationError as exc:
        described = [schemas.describe_error(e, schemas.DeployRequest) for e in exc.errors()]
        return "; ".join(m for _, m in described)
    return None


def page_verdicts(cases) -> list[str | None]:
    doc = app.openapi()
    script = f"""
globalThis.fetch = async () => ({{ ok: true, text: async () => {json.dumps(json.dumps(doc))} }});
const {{ rulesOf, problem }} = await import({json.dumps(SCHEMA_JS.as_uri())});
const rules = await rulesOf("DeployRequest");
const at = (path) => path.reduce((r, k) => r.properties[k], rules);
const out = {json.dumps([[list(p), v] for p, v in cases])}.map(([path, value]) =>
  problem(path.join("."), {{ ...at(path), required: true }}, value));
console.log(JSON.stringify(out));
"""
    ran = subprocess.run(
        ["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)


def test_the_page_refuses_what_the_api_refuses_with_its_message():
    verdicts = page_verdicts(CASES)
    for (path, value), page in zip(CASES, verdicts, strict=True):
        api = api_verdict(path, value)
        assert (page is None) == (api is None), (path, value, page, api)
        if api and "must be between" in api:  # a range: the very same words
            assert page == api, (path, value)
