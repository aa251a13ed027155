"""Notifications through the real platform: a deploy, an undeploy and a failed import reach a
real SMTP server (aiosmtpd) and a webhook receiver that checks each signature itself; a dead
mail server and a dead webhook leave the deploy succeeding at its usual pace, and their
failed attempts show through the API.

The session's platform sends every notification to the sinks of `notify_sinks` (conftest):
email to the acting user and to OPS_EMAIL, the platform webhook signed with its secret, 3
attempts per delivery. A user of this module's own (with an email address and a webhook of
their own) deploys the session's model twice (about 15 s each) and undeploys both.
"""

from __future__ import annotations

import dataclasses
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
import ray

from raydock import names
from raydock.client import Client, default_deploy_body
from raydock.platform import notify
from tests.notify_sinks import NotifySinks, free_port

from .conftest import Platform, deploy_and_wait, wait_for

pytestmark = pytest.mark.e2e

EMAIL = "notify-e2e@raydock.test"
MINE = "/member"  # the member's own webhook path on the receiver
DEPLOYED, UNDEPLOYED = "deployment.deployed", "deployment.undeployed"
IMPORT_FAILED = "model.import_failed"


@dataclasses.dataclass
class Member:
    user_id: str
    key: str
    platform: Platform  # the session's platform, called with the member's key

    def set_webhook(self, url: str) -> str:
        """The member's webhook; returns its new secret."""
        r = self.platform.http().put("/api/public/users/me/webhook", json={"url": url})
        assert r.status_code == 200, r.text
        assert r.json()["url"] == notify.display_target(url) and url not in r.text  # masked
        return r.json()["secret"]


@pytest.fixture(scope="module")
def member(platform) -> Member:
    created = platform.client.post("/users", json={"name": "notify-e2e", "email": EMAIL})
    key = created["apiKey"]
    as_member = dataclasses.replace(
        platform, admin_key=key, client=Client(platform.url, key, timeout=120)
    )
    yield Member(created["userId"], key, as_member)
    as_member.http().delete("/api/public/users/me/webhook")


def test_a_webhook_into_the_platforms_network_is_refused(member):
    """The session allows 127.0.0.1 (its receiver); a private address is still refused."""
    for url in ("http://10.1.2.3/hook", "http://169.254.169.254/latest"):
        r = member.platform.http().put("/api/public/users/me/webhook", json={"url": url})
        assert r.status_code == 400, r.text
        assert "webhook_allowed_networks" in r.text and "url" in r.text


def deliveries(platform: Platform, deployment_id: str, **params) -> list[dict]:
    r = platform.http().get("/api/public/notifications/deliveries", params=params)
    assert r.status_code == 200, r.text
    return [
        d for d in r.json()["deliveries"] if d["event"]["data"].get("deploymentId") == deployment_id
    ]


def undeploy(member: Member, deployment_id: str) -> dict:
    client = member.platform.client
    job = client.wait_job(client.post(f"/deployments/{deployment_id}/undeploy")["dockStatusId"])
    assert job["status"] == "SUCCESS", job
    return job


def test_deploy_and_undeploy_reach_email_and_signed_webhooks(
    platform, ready_model, member, notify_sinks: NotifySinks
):
    hooks, mail = notify_sinks.hooks, notify_sinks.mail
    hooks.secrets[MINE] = secret = member.set_webhook(hooks.url(MINE))
    r = member.platform.http().get("/api/public/users/me/webhook")
    # the URL is stored sealed and never shown again (its path may be its credential)
    assert r.json()["url"] == notify.display_target(hooks.url(MINE)) and "secret" not in r.json()
    assert hooks.url(MINE) not in r.text and MINE not in r.text

    dep = deploy_and_wait(member.platform, ready_model["modelId"], "notify-live")
    dep_id = dep["deploymentId"]
    for path in (MINE, NotifySinks.PLATFORM_PATH):
        (got,) = wait_for(lambda p=path: hooks.find(DEPLOYED, p, deploymentId=dep_id), 30)
        assert got["verified"], got  # the receiver's own HMAC check of the body
        assert got["event"]["userId"] == member.user_id
        assert got["event"]["data"]["deploymentName"] == "notify-live"
        assert got["headers"]["X-Raydock-Event"] == DEPLOYED
    for to in (EMAIL, NotifySinks.OPS_EMAIL):
        (msg,) = wait_for(lambda t=to: mail.find(DEPLOYED, t, deploymentId=dep_id), 30)
        assert "notify-live" in msg["message"]["Subject"]
    # every delivery shows through the API, delivered at the first attempt, no secret in it
    r = platform.http().get("/api/public/notifications/deliveries", params={"kind": DEPLOYED})
    assert secret not in r.text and NotifySinks.PLATFORM_SECRET not in r.text

    def delivered() -> list[dict]:
        found = [d for d in deliveries(platform, dep_id) if d["status"] == "delivered"]
        return found if len(found) == 4 else []

    shown = wait_for(delivered, 30)
    r = platform.http().get("/api/public/notifications/deliveries", params={"kind": DEPLOYED})
    assert hooks.url(MINE) not in r.text and MINE not in r.text
    assert sorted((d["channel"], d["target"], d["attempts"]) for d in shown) == sorted(
        [
            ("email", EMAIL, 1),
            ("email", NotifySinks.OPS_EMAIL, 1),
            # a URL shows masked (as GET /users/me/webhook): its path may be a credential
            ("webhook", notify.display_target(hooks.url(MINE)), 1),
            ("webhook", notify.display_target(hooks.url(NotifySinks.PLATFORM_PATH)), 1),
        ]
    )

    undeploy(member, dep_id)
    for path in (MINE, NotifySinks.PLATFORM_PATH):
        (got,) = wait_for(lambda p=path: hooks.find(UNDEPLOYED, p, deploymentId=dep_id), 30)
        assert got["verified"] and got["event"]["userId"] == member.user_id
    wait_for(lambda: mail.find(UNDEPLOYED, EMAIL, deploymentId=dep_id), 30)


def test_a_dead_mail_server_and_webhook_leave_the_deploy_succeeding(
    platform, ready_model, member, notify_sinks: NotifySinks
):
    hooks, mail = notify_sinks.hooks, notify_sinks.mail
    dead_hook = f"http://127.0.0.1:{free_port()}/gone"  # nothing listens there
    member.set_webhook(dead_hook)
    mail.stop()  # the platform's SMTP server is gone too
    try:
        client = member.platform.client
        ref = client.deploy(ready_model["modelId"], default_deploy_body("notify-dead"))
        job = client.wait_job(ref["dockStatusId"], timeout=600)
        assert job["status"] == "SUCCESS", job
        dep_id = ref["deploymentId"]
        assert client.get(f"/deployments/{dep_id}")["status"] == "DEPLOYED"
        # the event went out when the deployment turned DEPLOYED (its version's end); the
        # job ended right after, not after the dead targets' attempts (1 + 2 s of waits)
        deployed_at = _at(client.get(f"/deployments/{dep_id}/history")["versions"][-1]["endedAt"])
        assert _at(job["updatedAt"]) - deployed_at < 2, job
        # the live platform webhook still hears of it while the dead targets are retried
        wait_for(lambda: hooks.find(DEPLOYED, NotifySinks.PLATFORM_PATH, deploymentId=dep_id), 30)

        def failed() -> list[dict]:
            found = deliveries(platform, dep_id, kind=DEPLOYED, status="failed")
            return found if len(found) == 3 else []

        shown = wait_for(failed, 60)
        assert sorted((d["channel"], d["target"]) for d in shown) == sorted(
            [
                ("email", EMAIL),
                ("email", NotifySinks.OPS_EMAIL),
                ("webhook", notify.display_target(dead_hook)),
            ]
        )
        for d in shown:
            assert d["attempts"] == NotifySinks.MAX_ATTEMPTS > 1, d
            assert "refused" in d["lastError"].lower(), d
            # the last attempt came after the waits of 1 and 2 s
            assert _at(d["updatedAt"]) - deployed_at >= 2.9, (d, deployed_at)
        undeploy(member, dep_id)
        wait_for(lambda: hooks.find(UNDEPLOYED, NotifySinks.PLATFORM_PATH, deploymentId=dep_id), 30)
    finally:
        mail.start()


def test_a_failed_import_is_notified(platform, tiny_zip, member, notify_sinks, tmp_path):
    hooks, mail = notify_sinks.hooks, notify_sinks.mail
    hooks.secrets[MINE] = member.set_webhook(hooks.url(MINE))
    bad = _without(tiny_zip, tmp_path / "no-config.zip", "config.json")
    ref = member.platform.client.import_zip(bad)
    job = member.platform.client.wait_job(ref["dockStatusId"], timeout=120)
    assert job["status"] == "FAILED", job
    model_id = ref["modelId"]
    for path in (MINE, NotifySinks.PLATFORM_PATH):
        (got,) = wait_for(lambda p=path: hooks.find(IMPORT_FAILED, p, modelId=model_id), 30)
        assert got["verified"] and got["event"]["userId"] == member.user_id
        assert "config.json is missing" in got["event"]["data"]["error"]
        assert got["event"]["data"]["modelName"] == "no-config"
    (msg,) = wait_for(lambda: mail.find(IMPORT_FAILED, EMAIL, modelId=model_id), 30)
    assert "config.json is missing" in msg["message"].get_content()
    r = platform.http().get(
        "/api/public/notifications/deliveries", params={"kind": IMPORT_FAILED, "limit": 1000}
    )
    mine = [d for d in r.json()["deliveries"] if d["event"]["data"]["modelId"] == model_id]
    assert len(mine) == 4 and all(d["kind"] == IMPORT_FAILED for d in mine)
    member.platform.client.delete(f"/models/{model_id}")


def test_a_delivery_the_notifier_was_retrying_goes_on_after_it_is_killed(
    platform, tiny_zip, member, notify_sinks, tmp_path
):
    """The member's webhook refuses the first attempt (a wrong secret on the receiver); the
    notifier is killed while it waits to retry; the one the platform starts in its place
    sends the same delivery again, and it arrives."""
    hooks = notify_sinks.hooks
    flaky = "/flaky"
    hooks.secrets[flaky] = "not-the-secret-yet"
    secret = member.set_webhook(hooks.url(flaky))
    try:
        ref = member.platform.client.import_zip(
            _without(tiny_zip, tmp_path / "restart.zip", "config.json")
        )
        model_id = ref["modelId"]
        (refused,) = wait_for(
            lambda: hooks.find(IMPORT_FAILED, flaky, modelId=model_id), 30, interval=0.05
        )
        ray.kill(ray.get_actor(names.NOTIFIER, namespace=names.NAMESPACE))  # within its 1 s wait
        hooks.secrets[flaky] = secret
        assert refused["verified"] is False
        delivery_id = refused["headers"]["X-Raydock-Delivery"]
        arrived = wait_for(
            lambda: [
                r for r in hooks.find(IMPORT_FAILED, flaky, modelId=model_id) if r["verified"]
            ],
            30,
        )
        assert [r["headers"]["X-Raydock-Delivery"] for r in arrived] == [delivery_id]

        def shown() -> dict | None:
            r = platform.http().get(
                "/api/public/notifications/deliveries", params={"kind": IMPORT_FAILED}
            )
            found = [d for d in r.json()["deliveries"] if d["deliveryId"] == delivery_id]
            return found[0] if found and found[0]["status"] == "delivered" else None

        assert wait_for(shown, 10)["channel"] == "webhook"
        member.platform.client.delete(f"/models/{model_id}")
    finally:
        member.platform.http().delete("/api/public/users/me/webhook")


def test_an_event_emitted_while_no_notifier_runs_is_delivered_by_the_next(platform, notify_sinks):
    """The notifier is killed; an event emitted at once (as the registry emits one: here
    from the test's own Ray driver, so that it surely comes before the platform has started
    the next notifier) waits for that notifier and reaches the platform webhook."""
    hooks = notify_sinks.hooks
    ray.kill(ray.get_actor(names.NOTIFIER, namespace=names.NAMESPACE))
    model_id = f"m-handover-{time.time_ns()}"
    notify.emit(IMPORT_FAILED, None, modelId=model_id, modelName="handover", error="test")
    (got,) = wait_for(
        lambda: hooks.find(IMPORT_FAILED, NotifySinks.PLATFORM_PATH, modelId=model_id), 30
    )
    assert got["verified"]


def test_webhook_and_delivery_routes_refuse_bad_input(platform):
    http = platform.http()
    for url in ("ftp://example.test/x", "http://", "https://u:p@example.test/x"):
        r = http.put("/api/public/users/me/webhook", json={"url": url})
        assert r.status_code == 422 and r.json()["error"]["param"] == "url", r.text
    r = http.put("/api/public/users/me/webhook", json={"url": "https://h.test/" + "x" * 2000})
    assert r.status_code == 422 and "2000" in r.json()["error"]["message"]
    r = http.get("/api/public/notifications/deliveries", params={"status": "lost"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "status"
    r = http.get("/api/public/notifications/deliveries", params={"limit": 1001})
    assert r.status_code == 422 and r.json()["error"]["param"] == "limit"
    assert (
        http.get("/api/public/notifications/deliveries", headers={"X-api-key": "x"}).status_code
        == 401
    )


def _at(iso: str) -> float:
    """An API timestamp (UTC, ISO 8601 with Z) in seconds."""
    return datetime.fromisoformat(iso.removesuffix("Z")).replace(tzinfo=UTC).timestamp()


def _without(src: Path, dst: Path, name: str) -> Path:
    """The archive without one of its files (an import that fails validation)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            if item.filename != name:
                zout.writestr(item, zin.read(item))
    return dst
