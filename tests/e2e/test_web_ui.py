"""The web dashboard in a real browser: Debian's chromium driven by Playwright, against the
session's platform through the Serve ingress (the page, its scripts and the API on one port).

The tests assert what a user sees (texts, rows, dialogs) and check the same facts from outside
the browser with plain HTTP: the session cookie's attributes and CSRF rule, a key created in
the page answering a real chat request, and refusals after deletion and sign-out.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import zipfile

import httpx
import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, Route, expect

from tests.e2e.conftest import Live, Platform, shot, sign_in, wait_for

pytestmark = pytest.mark.e2e


def session_cookies(page: Page) -> dict[str, dict]:
    return {c["name"]: c for c in page.context.cookies()}


def chat(platform: Platform, deployment_id: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{platform.url}/deployments/{deployment_id}/v2/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=60,
    )


def run_shell(command: str, key: str) -> subprocess.CompletedProcess:
    """A command copied from the page, run as a user would paste it (the key in the env)."""
    return subprocess.run(
        ["bash", "-c", command + " --silent --show-error --fail-with-body"],
        env={**os.environ, "RAYDOCK_KEY": key},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_sign_in_shows_the_models_page_with_a_cookie_session(
    page: Page, platform: Platform, ready_model: dict, live: Live
):
    sign_in(page, platform.admin_key + "-wrong")
    error = page.locator("#sign-in-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("not a valid management key")
    expect(page.get_by_role("heading", name="Open-Source Models")).to_have_count(0)

    page.get_by_label("Management key").fill(platform.admin_key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Open-Source Models")).to_be_visible()
    expect(page.locator("#user-name")).to_have_text("admin")

    # the session model's row: the seed's columns, with the API's own counts
    row = page.locator(f'tr[data-model-id="{ready_model["modelId"]}"]')
    expect(row).to_be_visible()
    model = platform.client.get(f"/models/{ready_model['modelId']}")
    assert model["activeDeployments"] >= 1  # `live` is deployed
    expect(row.locator("td.name")).to_contain_text(model["name"])
    expect(row.locator('[data-col="active"]')).to_have_text(str(model["activeDeployments"]))
    expect(row.locator('[data-col="failed"]')).to_have_text(str(model["deploymentFailed"]))
    expect(row.locator('[data-col="ready"]')).to_have_text(str(model["readyToDeploy"]))
    expect(row.locator('[data-col="source"]')).to_have_text("File")
    shot(page, "models")
    headers = page.locator("table.models th").all_inner_texts()
    assert [h.strip().lower() for h in headers[:5]] == [
        "model name",
        "active deployments",
        "deployment failed",
        "ready to deploy",
        "source",
    ]

    # search filters the list
    page.get_by_label("Search models").fill("no-such-model-anywhere")
    expect(row).to_have_count(0)
    expect(page.get_by_text("No model matches your search.")).to_be_visible()
    page.get_by_label("Search models").fill(model["name"][:5])
    expect(row).to_be_visible()

    # the three-dot menu's Delete: confirmation, then the API's rule (an active deployment)
    row.get_by_role("button", name=f"Actions for {model['name']}").click()
    page.get_by_role("menuitem", name="Delete").click()
    dialog = page.locator("dialog[open]")
    expect(dialog).to_contain_text(f"Delete {model['name']}?")
    dialog.get_by_role("button", name="Delete model").click()
    expect(dialog.get_by_role("alert")).to_contain_text("active deployments")
    dialog.get_by_role("button", name="Cancel").click()
    expect(row).to_be_visible()
    assert platform.client.get(f"/models/{ready_model['modelId']}")["status"] == "READY"

    # the session: HttpOnly + SameSite=Strict; no key in the cookies or the page's storage
    cookies = session_cookies(page)
    session, csrf = cookies["raydock_session"], cookies["raydock_csrf"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert not csrf["httpOnly"] and csrf["sameSite"] == "Strict"
    assert all(platform.admin_key not in c["value"] for c in cookies.values())
    stored = page.evaluate(
        "() => JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])"
    )
    assert platform.admin_key not in stored
    assert "raydock_session" not in page.evaluate("document.cookie")  # scripts cannot read it

    # the cookie alone authenticates reads; a change also needs the CSRF header
    jar = {"raydock_session": session["value"], "raydock_csrf": csrf["value"]}
    with httpx.Client(base_url=platform.url, cookies=jar, timeout=30) as http:
        assert http.get("/api/public/models").status_code == 200
        path = f"/api/public/deployments/{live.deployment['deploymentId']}/api-keys"
        refused = http.post(path, json={"name": "csrf-probe"})
        assert refused.status_code == 403, refused.text
        assert "CSRF" in refused.json()["error"]["message"]
        made = http.post(path, json={"name": "csrf-probe"}, headers={"X-CSRF-Token": "nope"})
        assert made.status_code == 403
        made = http.post(path, json={"name": "csrf-probe"}, headers={"X-CSRF-Token": csrf["value"]})
        assert made.status_code == 201, made.text
        gone = http.delete(
            f"{path}/{made.json()['keyId']}", headers={"X-CSRF-Token": csrf["value"]}
        )
        assert gone.status_code == 200
    # API clients are unchanged: the key header, no cookie, no CSRF token
    with platform.http() as http:
        assert http.post(path, json={"name": "header-key"}).status_code == 201


def test_a_key_made_in_the_page_works_until_deleted_there(
    page: Page, platform: Platform, live: Live
):
    dep_id = live.deployment["deploymentId"]
    sign_in(page, platform.admin_key)
    expect(page.locator("#user-name")).to_have_text("admin")
    page.goto(f"/#/deployments/{dep_id}/endpoint")
    expect(page.locator(".dep-head [data-status]")).to_have_text("Deployed")
    expect(page.locator("#endpoint-url")).to_have_text(
        f"{platform.url}/deployments/{dep_id}/v2/chat/completions"
    )
    expect(page.locator("#curl-sample")).to_contain_text(f"/deployments/{dep_id}/v2/chat")
    expect(page.locator("#curl-sample-json")).to_contain_text('"response_format"')
    page.get_by_role("tab", name="Python (openai)").click()
    expect(page.locator("#python-sample")).to_contain_text('os.environ["RAYDOCK_KEY"]')
    page.get_by_role("tab", name="JavaScript").click()
    expect(page.locator("#javascript-sample-json")).to_contain_text("json_schema")
    shot(page, "deployment-endpoint")

    page.get_by_role("tab", name="API keys").click()
    page.get_by_label("Name").fill("ui-key")
    page.get_by_text("Limits (optional)").click()
    rpm = page.get_by_label("Requests per minute")
    expect(rpm).to_have_attribute("min", "1")  # the range, read from the OpenAPI document
    rpm.fill("1000")
    page.get_by_role("button", name="Create API key").click()
    shown = page.locator("#new-api-key")
    expect(shown).to_be_visible()
    key = shown.inner_text().strip()
    assert re.fullmatch(r"\S{20,}", key), key
    page.keyboard.press("Escape")  # shown once: only a button closes it
    expect(shown).to_be_visible()
    # a browser that refuses the clipboard API (plain http on a remote host): the old way,
    # inside the modal dialog (outside it, nothing can be selected and nothing was copied)
    page.evaluate(
        "() => { navigator.clipboard.writeText = () => Promise.reject(new Error('denied')); }"
    )
    page.get_by_role("button", name="Copy and close").click()
    expect(shown).to_have_count(0)
    assert page.evaluate("navigator.clipboard.readText()") == key
    assert key not in page.content()  # shown once: gone from the page
    row = page.locator('tr[data-key-name="ui-key"]')
    expect(row).to_contain_text("requestsPerMinute: 1,000")
    expect(row).to_contain_text(key[:10])  # the prefix lists show
    shot(page, "deployment-keys")

    reply = chat(platform, dep_id, key)
    assert reply.status_code == 200, reply.text

    # Copy cURL (the deployments page's menu) gives a command that works when run
    page.goto(f"/#/models/{live.deployment['modelId']}")
    dep_row = page.locator(f'tr[data-deployment-id="{dep_id}"]')
    dep_row.get_by_role("button", name=re.compile("^Actions for")).click()
    page.get_by_role("menuitem", name="Copy cURL").click()
    expect(page.get_by_text("cURL copied")).to_be_visible()
    command = page.evaluate("navigator.clipboard.readText()")
    assert command.startswith("curl ") and "$RAYDOCK_KEY" in command, command
    ran = run_shell(command, key)
    assert ran.returncode == 0, (ran.stdout, ran.stderr)
    assert json.loads(ran.stdout)["choices"][0]["message"]["role"] == "assistant"
    # so does the Model Endpoint tab's sample with response_format
    page.goto(f"/#/deployments/{dep_id}/endpoint")
    sample = page.locator("#curl-sample-json").inner_text()
    ran = run_shell(sample.replace('"Hello"}]', '"Hello"}], "max_tokens": 8'), key)
    assert ran.returncode == 0, (ran.stdout, ran.stderr)
    assert json.loads(ran.stdout)["choices"][0]["message"]["content"].startswith("{")
    page.goto(f"/#/deployments/{dep_id}/keys")

    # live refresh: a key made elsewhere appears without a reload
    other = platform.client.create_key(dep_id, "made-by-api")
    assert other
    expect(page.locator('tr[data-key-name="made-by-api"]')).to_be_visible()

    row.get_by_role("button", name="Delete key ui-key").click()
    dialog = page.locator("dialog[open]")
    expect(dialog).to_contain_text("Delete the key ui-key?")
    dialog.get_by_role("button", name="Delete key").click()
    expect(row).to_have_count(0)
    wait_for(lambda: chat(platform, dep_id, key).status_code == 401, timeout=10)

    # the Metrics tab: the meter's last hour, drawn by uPlot (the platform answered requests
    # with this deployment just now, so the latest interval counts them)
    page.get_by_role("tab", name="Metrics").click()
    expect(page.locator("#metric-requests")).to_have_text(re.compile(r"^[1-9][\d,]*$"))
    expect(page.locator("#metric-ttft")).to_have_text(re.compile(r"^[\d,]+ ms$"))
    replicas = re.compile(r"^\d+ / target \d+ \(\d+–\d+\)$")
    expect(page.locator("#metric-replicas")).to_have_text(replicas)
    for chart in ("requests", "tokens", "ttft", "errors", "replicas"):
        expect(page.locator(f"#chart-{chart} canvas")).to_have_count(1)  # uPlot drew it
    expect(page.locator("#chart-requests")).not_to_have_attribute("data-points", "0")
    history = platform.client.get(f"/deployments/{dep_id}/metrics/history")
    assert sum(p["requestsPerSecond"] for p in history["points"]) > 0, history
    shot(page, "deployment-metrics")


def test_an_unknown_deployment_or_model_says_not_found(page: Page, platform: Platform):
    """Not an empty page or a Deploy button: a "not found" with a link back (a deployment
    deleted while its page is open: the wizard test)."""
    sign_in(page, platform.admin_key)
    expect(page.locator("#user-name")).to_have_text("admin")
    gone = page.locator("#not-found")
    page.goto("/#/deployments/dp-doesnotexist/configurations")
    expect(gone).to_contain_text("There is no deployment dp-doesnotexist")
    expect(page.get_by_role("tab")).to_have_count(0)
    page.goto("/#/models/cm-doesnotexist")
    expect(gone).to_contain_text("There is no model cm-doesnotexist")
    expect(page.locator("#deploy-model")).to_have_count(0)
    gone.get_by_role("link", name="Back to Open-Source Models").click()
    expect(page.get_by_role("heading", name="Open-Source Models")).to_be_visible()


def test_sign_out_ends_the_session(page: Page, platform: Platform):
    sign_in(page, platform.admin_key)
    expect(page.locator("#user-name")).to_have_text("admin")
    cookie = session_cookies(page)["raydock_session"]["value"]
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Management key")).to_be_visible()
    expect(page.locator("#user-name")).to_be_hidden()
    assert "raydock_session" not in session_cookies(page)
    # the old cookie, replayed, is refused: the server ended the session
    reply = httpx.get(
        f"{platform.url}/api/public/models", cookies={"raydock_session": cookie}, timeout=30
    )
    assert reply.status_code == 401, reply.text
    page.reload()
    expect(page.get_by_label("Management key")).to_be_visible()


WATCH_PROGRESS = """() => {
    const bar = document.getElementById("import-progress");
    window.progressSeen = [];
    new MutationObserver(() => window.progressSeen.push(Number(bar.getAttribute("aria-valuenow"))))
        .observe(bar, {attributes: true, attributeFilter: ["aria-valuenow"]});
}"""


def test_import_dialog_uploads_with_progress_and_the_row_goes_live(
    page: Page, platform: Platform, tiny_zip, tmp_path
):
    """A wrong file is refused in the page with its reason; a zip goes up in chunks (the bar
    reaches 100 %), its row follows the import live to Ready to Deploy, then the three-dot
    menu deletes it (no deployments: the API allows it)."""
    sign_in(page, platform.admin_key)
    page.get_by_role("button", name="Import model").click()
    dialog = page.locator("dialog[open]")
    expect(dialog.get_by_role("tab", name="Base Model")).to_have_attribute("aria-selected", "true")
    expect(dialog).to_contain_text("config.json")  # the Instructions panel
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    dialog.locator("#import-file").set_input_files(notes)
    expect(dialog.get_by_role("alert")).to_contain_text('"notes.txt" is not one')
    shot(page, "import-refused")
    dialog.get_by_role("button", name="Import").click()  # refused before any upload
    expect(dialog.locator("#import-progress")).to_be_hidden()

    upload = tmp_path / "ui-upload.zip"
    upload.write_bytes(tiny_zip.read_bytes())
    dialog.locator("#import-file").set_input_files(upload)
    expect(dialog.get_by_role("alert")).to_be_hidden()
    page.evaluate(WATCH_PROGRESS)
    dialog.get_by_role("button", name="Import").click()
    expect(dialog).to_have_count(0)  # closes once the upload completed
    seen = page.evaluate("window.progressSeen")
    assert seen and seen[-1] == 100 and seen == sorted(seen), seen
    row = page.locator("tr", has=page.get_by_role("link", name="ui-upload", exact=True))
    expect(row.locator("[data-status]")).to_have_text("Ready to Deploy", timeout=120_000)
    (model,) = [m for m in platform.client.get("/models")["models"] if m["name"] == "ui-upload"]
    assert model["status"] == "READY" and model["sourceLabel"] == "File"

    row.get_by_role("button", name="Actions for ui-upload").click()
    page.get_by_role("menuitem", name="Delete").click()
    page.locator("dialog[open]").get_by_role("button", name="Delete model").click()
    expect(row).to_have_count(0)
    assert all(m["name"] != "ui-upload" for m in platform.client.get("/models")["models"])

    # a zip that is not a model: the row ends Import Failed with the reason, and offers to
    # re-import or discard it
    bad = tmp_path / "ui-broken.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("readme.txt", "no model here")
    page.get_by_role("button", name="Import model").click()
    page.locator("dialog[open] #import-file").set_input_files(bad)
    page.locator("dialog[open]").get_by_role("button", name="Import").click()
    row = page.locator("tr", has=page.get_by_role("link", name="ui-broken", exact=True))
    expect(row.locator("[data-status]")).to_have_text("Import Failed", timeout=120_000)
    expect(row.locator(".error-detail")).to_contain_text("config.json")
    row.get_by_role("button", name="Actions for ui-broken").click()
    expect(page.get_by_role("menuitem", name="Re-import a file…")).to_be_visible()
    page.get_by_role("menuitem", name="Delete (discard the import)").click()
    page.locator("dialog[open]").get_by_role("button", name="Delete model").click()
    expect(row).to_have_count(0)

    # Cancel during an upload: the chunk the server holds is deleted, nothing is imported
    big = tmp_path / "ui-cancel.zip"
    with zipfile.ZipFile(big, "w") as z:  # stored, 9 MiB: two chunks of the page's 8 MiB
        z.writestr("weights.bin", os.urandom(9 * 2**20))
    held: list[Route] = []
    page.route(
        "**/files/session/*/chunks/*",
        lambda route: route.continue_() if route.request.url.endswith("/1") else held.append(route),
    )
    page.get_by_role("button", name="Import model").click()
    page.locator("dialog[open] #import-file").set_input_files(big)
    page.locator("dialog[open]").get_by_role("button", name="Import").click()
    wait_for(lambda: held or page.wait_for_timeout(100), timeout=60)  # chunk 1 is in
    session_id = held[0].request.url.split("/files/session/")[1].split("/")[0]
    chunks = platform.settings.uploads_path / session_id
    assert (chunks / "000001.part").is_file()
    page.locator("dialog[open]").get_by_role("button", name="Cancel").click()
    expect(page.get_by_role("status").filter(has_text="upload cancelled")).to_be_visible()
    wait_for(lambda: not chunks.exists(), timeout=30)
    with contextlib.suppress(PlaywrightError):  # the page aborted it already
        held[0].abort()
    page.unroute("**/files/session/*/chunks/*")
    gone = platform.http().get(f"/api/public/files/session/{session_id}")
    assert gone.status_code == 404, gone.text
    assert all(m["name"] != "ui-cancel" for m in platform.client.get("/models")["models"])


def test_the_playground_streams_an_answer(page: Page, platform: Platform, live: Live):
    """The page chats through the management API's playground route with the session: the
    answer arrives in pieces, and the browser never holds a deployment key."""
    dep_id = live.deployment["deploymentId"]
    sign_in(page, platform.admin_key)
    expect(page.locator("#user-name")).to_have_text("admin")
    page.goto(f"/#/deployments/{dep_id}/playground")
    page.get_by_label("Max tokens").fill("9999")  # out of ChatRequest's range: refused here
    page.get_by_label("Message").fill("Hello there")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#playground-error")).to_contain_text("max_tokens must be between 1 and")
    page.get_by_label("Max tokens").fill("24")
    page.evaluate(WATCH_STREAM)
    page.get_by_role("button", name="Send").click()
    answer = page.locator('.bubble[data-role="assistant"] .text')
    expect(answer).not_to_have_text("")
    expect(page.locator(".bubble.streaming")).to_have_count(0, timeout=60_000)
    lengths = page.evaluate("window.answerLengths")
    assert len(set(lengths)) >= 2, lengths  # it grew piece by piece: streamed
    assert answer.inner_text().strip()
    shot(page, "playground")
    # the key it used: listed under the user's name, its secret nowhere in the page
    keys = platform.client.get(f"/deployments/{dep_id}/api-keys")["apiKeys"]
    assert any(k["name"] == "playground (admin)" for k in keys), keys
    assert "rdk-" not in page.content()


WATCH_STREAM = """() => {
    window.answerLengths = [];
    new MutationObserver(() => {
        const el = document.querySelector('.bubble[data-role="assistant"] .text');
        if (el) window.answerLengths.push(el.textContent.length);
    }).observe(document.getElementById("playground-transcript"),
               {subtree: true, childList: true, characterData: true});
}"""


def test_the_wizard_deploys_then_redeploy_undeploy_and_delete(
    page: Page, platform: Platform, ready_model: dict
):
    """The deploy wizard refuses an out-of-range field in the page (the API's range, read from
    its OpenAPI document), deploys, a redeploy adds `_v2` to the history, then the
    Configurations tab undeploys and deletes after their confirmations. Two tiny-model
    deploys (about a minute)."""
    model_id = ready_model["modelId"]
    sign_in(page, platform.admin_key)
    expect(page.locator("#user-name")).to_have_text("admin")
    page.goto(f"/#/models/{model_id}")
    page.get_by_role("link", name="Deploy", exact=True).click()
    expect(page.locator(".stepper li.active")).to_have_text("General details")
    page.get_by_label("Deployment name").fill("ui-wizard")
    expect(page.locator('[data-range-for="timeout"]')).to_contain_text("30–180")
    page.get_by_role("button", name="Next").click()
    expect(page.locator(".stepper li.active")).to_contain_text("Optimization")
    page.get_by_role("button", name="Next").click()
    expect(page.locator('[data-range-for="hyperParameters.temperature"]')).to_contain_text("0–2")
    page.get_by_label("Temperature").fill("2.5")
    page.get_by_role("button", name="Next").click()
    error = page.locator('[data-error-for="hyperParameters.temperature"]')
    expect(error).to_have_text("hyperParameters.temperature must be between 0 and 2 (got 2.5)")
    expect(page.locator(".stepper li.active")).to_contain_text("Parameters")  # not past it
    shot(page, "wizard-refused")
    page.get_by_label("Temperature").fill("0.7")
    expect(error).to_be_hidden()
    page.get_by_role("button", name="Next").click()
    expect(page.locator(".stepper li.active")).to_contain_text("Hardware")
    # a rule across fields (min ≤ max replicas) is the API's alone: its 422 lands by the field
    page.get_by_label("Min replicas").fill("3")
    page.get_by_label("Max replicas").fill("1")
    page.get_by_role("button", name="Next").click()
    expect(page.locator("#wizard-review")).to_contain_text("temperature 0.7")
    deploy = page.locator("#wizard-deploy")
    expect(deploy).to_be_disabled()  # until the terms are accepted
    page.get_by_label("I accept all the Terms and Conditions").check()
    shot(page, "wizard-review")
    deploy.click()
    expect(page.locator('[data-error-for="scalingParameters"]')).to_contain_text(
        "minReplicas (3) must not exceed maxReplicas (1)"
    )
    expect(page.locator(".stepper li.active")).to_contain_text("Hardware")
    page.get_by_label("Min replicas").fill("1")
    page.get_by_role("button", name="Next").click()
    page.get_by_label("I accept all the Terms and Conditions").check()
    deploy.click()

    # the deployment's page, its status live until Deployed
    expect(page).to_have_url(re.compile(r"#/deployments/[^/]+/endpoint$"))
    dep_id = page.url.split("#/deployments/")[1].split("/")[0]
    status = page.locator(".dep-head [data-status]")
    expect(status).to_have_text("Deployed", timeout=300_000)
    dep = platform.client.get(f"/deployments/{dep_id}")
    assert dep["config"]["hyperParameters"]["temperature"] == 0.7
    assert dep["addedBy"] == "admin"
    shot(page, "deployment-detail")

    # redeploy, pre-filled from the current configuration: history gains ui-wizard_v2
    page.get_by_role("link", name="Redeploy").click()
    expect(page.get_by_label("Deployment name")).to_have_value("ui-wizard")
    for _ in range(2):
        page.get_by_role("button", name="Next").click()
    expect(page.get_by_label("Temperature")).to_have_value("0.7")
    page.get_by_label("Max tokens").fill("64")
    for _ in range(2):
        page.get_by_role("button", name="Next").click()
    page.get_by_label("I accept all the Terms and Conditions").check()
    page.locator("#wizard-deploy").click()
    page.get_by_role("tab", name="Deployment history").click()
    v2 = page.locator('tr[data-version="2"]')
    expect(v2).to_contain_text("ui-wizard_v2")
    expect(v2).to_contain_text("Latest")
    expect(v2.locator("[data-status]")).to_have_text("Success", timeout=300_000)
    v2.get_by_role("button", name="Details of ui-wizard_v2").click()
    expect(page.locator('[data-details-for="2"]')).to_contain_text("maxTokens: 64")
    expect(page.locator('[data-details-for="2"]')).to_contain_text("by admin")
    shot(page, "deployment-history")
    assert (
        platform.client.get(f"/deployments/{dep_id}")["config"]["hyperParameters"]["maxTokens"]
        == 64
    )

    # Configurations: the timeout's range checked in the page, then undeploy and delete
    page.get_by_role("tab", name="Configurations").click()
    page.get_by_label("Endpoint timeout (s)").fill("500")
    page.get_by_role("button", name="Save changes").click()
    expect(page.locator('[data-error-for="timeout"]')).to_contain_text(
        "timeout must be between 30 and 180 (got 500)"
    )
    page.get_by_label("Endpoint timeout (s)").fill("90")
    page.get_by_role("button", name="Save changes").click()
    expect(page.get_by_text("Configuration saved")).to_be_visible()
    assert platform.client.get(f"/deployments/{dep_id}")["timeout"] == 90
    shot(page, "deployment-configurations")

    page.get_by_role("button", name="Undeploy").click()
    dialog = page.locator("dialog[open]")
    expect(dialog).to_contain_text("Undeploy ui-wizard?")
    dialog.get_by_role("button", name="Undeploy").click()
    expect(status).to_have_text("Undeployed", timeout=120_000)
    other = page.context.new_page()  # the deployment open in a second tab while it is deleted
    other.goto(f"/#/deployments/{dep_id}/configurations")
    expect(other.locator("#delete-deployment")).to_be_enabled()
    page.get_by_role("button", name="Delete deployment").click()
    dialog = page.locator("dialog[open]")
    expect(dialog).to_contain_text("Delete ui-wizard?")
    dialog.get_by_role("button", name="Delete deployment").click()
    expect(page).to_have_url(re.compile(f"#/models/{model_id}$"))
    expect(page.locator(f'tr[data-deployment-id="{dep_id}"]')).to_have_count(0)
    # the other tab says so (no stale "Undeployed" with Delete) and links back to the model
    expect(other.locator("#not-found")).to_contain_text(f"There is no deployment {dep_id}")
    expect(other.locator("#delete-deployment")).to_have_count(0)
    back = other.get_by_role("link", name="Back to the model's deployments")
    expect(back).to_have_attribute("href", f"#/models/{model_id}")
    with platform.http() as http:
        assert http.get(f"/api/public/deployments/{dep_id}").status_code == 404
