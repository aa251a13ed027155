"""Notifications without Ray: the signature, every event's email and webhook body, the retry
schedule, the settings; the registry's events, deliveries and webhooks on SQLite; the
notifier's deliveries to a real SMTP server and webhook receiver, and to dead ones."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import json
import textwrap
import time
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text

from raydock.client import default_deploy_body
from raydock.config import SettingsError, load_settings
from raydock.platform import notify
from raydock.platform.registry import NotFound, Registry
from raydock.platform.schemas import WebhookSet
from raydock.platform.secrets import SecretBox, platform_key
from tests.notify_sinks import MailSink, WebhookSink, free_port, wait_until
from tests.unit.registry_handle import RegistryHandle

FIELDS = {
    notify.IMPORT_FAILED: {
        "modelId": "cm-1",
        "modelName": "tiny",
        "error": "config.json is missing",
    },
    notify.DEPLOYED: {"deploymentId": "dp-1", "deploymentName": "chat", "modelId": "cm-1"},
    notify.DEPLOY_FAILED: {"deploymentId": "dp-1", "deploymentName": "chat", "reason": "OOM"},
    notify.UNDEPLOYED: {"deploymentId": "dp-1", "deploymentName": "chat"},
    notify.BUDGET_WARNING: {
        "keyId": "key-1",
        "keyName": "team",
        "deploymentId": "dp-1",
        "limit": 1000,
        "used": 800,
    },
    notify.BUDGET_EXHAUSTED: {
        "keyId": "key-1",
        "deploymentId": "dp-1",
        "limit": 1000,
        "used": 1003,
    },
}


# ------------------------------------------------------------------ pure parts


def test_signature_is_hmac_sha256_of_the_exact_body():
    event = notify.new_event(notify.DEPLOYED, "u-1", FIELDS[notify.DEPLOYED])
    body = notify.webhook_body(event)
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert notify.sign("s3cret", body) == f"sha256={expected}"
    assert notify.verify("s3cret", body, f"sha256={expected}")
    assert not notify.verify("other", body, f"sha256={expected}")
    assert not notify.verify("s3cret", body + b" ", f"sha256={expected}")
    assert not notify.verify("s3cret", body, None)
    headers = notify.webhook_headers(event, "nd-1", "s3cret", body)
    assert headers["X-Raydock-Signature"] == f"sha256={expected}"
    assert (headers["X-Raydock-Event"], headers["X-Raydock-Delivery"]) == (
        "deployment.deployed",
        "nd-1",
    )
    # without a secret (a platform webhook with no webhook_secret): unsigned
    assert "X-Raydock-Signature" not in notify.webhook_headers(event, "nd-1", "", body)


@pytest.mark.parametrize("kind", notify.KINDS)
def test_every_kind_renders_an_email_and_a_webhook_body(kind):
    event = notify.new_event(kind, "u-1", FIELDS[kind])
    assert event["id"].startswith("ev-") and event["createdAt"].endswith("Z")
    body = json.loads(notify.webhook_body(event))
    assert body == {**event, "data": FIELDS[kind]} and body["kind"] == kind
    msg = notify.email_message(event, "raydock@example.test", "ana@example.test", "nd-9")
    assert msg["To"] == "ana@example.test" and msg["From"] == "raydock@example.test"
    assert msg["X-Raydock-Event"] == kind and msg["X-Raydock-Delivery"] == "nd-9"
    # RFC 5322's Date, and a Message-ID a retry of the delivery keeps
    assert email.utils.parsedate_to_datetime(msg["Date"]).tzinfo is not None
    assert msg["Message-ID"] == "<nd-9@example.test>"
    subject, text = msg["Subject"], msg.get_content()
    assert subject.startswith("[raydock] ") and event["id"] in text
    expected = {
        notify.IMPORT_FAILED: ("Import of tiny failed", "config.json is missing"),
        notify.DEPLOYED: ("Deployment chat is DEPLOYED", "chat (dp-1) is DEPLOYED"),
        notify.DEPLOY_FAILED: ("Deployment chat FAILED", "Reason: OOM"),
        notify.UNDEPLOYED: ("Deployment chat undeployed", "UNDEPLOYED"),
        notify.BUDGET_WARNING: (
            "Key team nears its token budget",
            "800 of 1000 tokens used (80 %)",
        ),
        notify.BUDGET_EXHAUSTED: ("Key key-1 hit its token budget", "1003 of 1000 tokens used"),
    }[kind]
    assert expected[0] in subject, subject
    assert expected[1] in text, text


def test_names_with_line_breaks_still_make_an_email():
    """A name is the user's text: a CR/LF in the subject would make EmailMessage refuse."""
    fields = FIELDS[notify.DEPLOYED] | {"deploymentName": "evil\r\nBcc: x@y.test\u2028z"}
    event = notify.new_event(notify.DEPLOYED, "u-1", fields)
    msg = notify.email_message(event, "raydock@example.test", "ana@example.test", "nd-9")
    assert msg["Subject"] == "[raydock] Deployment evil Bcc: x@y.test z is DEPLOYED"
    assert msg["Bcc"] is None
    assert "evil\r\nBcc" in notify.render(event)[1]  # the body keeps the data as is


def test_a_signature_header_with_any_characters_is_refused_not_an_error():
    body = notify.webhook_body(notify.new_event(notify.DEPLOYED, "u-1", FIELDS[notify.DEPLOYED]))
    assert not notify.verify("s3cret", body, "sha256=\u00e9t\u00e9")
    # the receiver's snippet in the README, run as written
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    snippet = next(b for b in readme.split("```python")[1:] if "def verify(" in b)
    scope: dict = {}
    exec(textwrap.dedent(snippet.split("```")[0]), scope)
    assert scope["verify"]("s3cret", body, notify.sign("s3cret", body))
    assert not scope["verify"]("s3cret", body, "sha256=\u00e9t\u00e9")
    assert not scope["verify"]("s3cret", body, None)


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown notification kind"):
        notify.new_event("deployment.exploded", None, {})


def test_backoff_doubles_from_one_second_and_is_capped():
    assert notify.backoff_delays(5) == [1, 2, 4, 8]
    assert notify.backoff_delays(1) == [] and notify.backoff_delays(0) == []
    assert notify.backoff_delays(10, cap_s=30)[-3:] == [30, 30, 30]


def test_settings_from_yaml_and_environment(monkeypatch):
    s = load_settings()
    assert (s.smtp_host, s.smtp_port, s.smtp_starttls, s.webhook_url) == ("", 25, False, "")
    assert s.notify_max_attempts == 5
    monkeypatch.setenv("RAYDOCK_SMTP_HOST", "mail.example.test")
    monkeypatch.setenv("RAYDOCK_SMTP_PORT", "587")
    monkeypatch.setenv("RAYDOCK_SMTP_STARTTLS", "true")
    monkeypatch.setenv("RAYDOCK_SMTP_PASSWORD", "pw-do-not-log")
    monkeypatch.setenv("RAYDOCK_WEBHOOK_SECRET", "whs-do-not-log")
    monkeypatch.setenv("RAYDOCK_NOTIFY_EMAILS", "ops@example.test, oncall@example.test;x@y.z")
    monkeypatch.setenv("RAYDOCK_NOTIFY_MAX_ATTEMPTS", "3")
    s = load_settings()
    assert (s.smtp_host, s.smtp_port, s.smtp_starttls) == ("mail.example.test", 587, True)
    assert s.smtp_password == "pw-do-not-log" and s.notify_max_attempts == 3
    assert notify.addresses(s.notify_emails) == ["ops@example.test", "oncall@example.test", "x@y.z"]
    assert notify.addresses("") == []
    assert "do-not-log" not in repr(s)  # secrets stay out of reprs (and so of logs)


def test_an_smtp_login_needs_tls():
    with pytest.raises(SettingsError, match="smtp_username is set but neither smtp_starttls"):
        load_settings(smtp_host="mail.test", smtp_username="raydock", smtp_password="pw")
    for tls in ({"smtp_starttls": True}, {"smtp_ssl": True, "smtp_port": 465}):
        assert load_settings(smtp_host="mail.test", smtp_username="raydock", **tls).smtp_username


def test_delivery_targets_hide_credentials():
    assert notify.display_target("ana@example.test") == "ana@example.test"
    slack = "https://hooks.slack.com/services/T0/B0/SeCrEtToKeN9"  # the path is the token
    digest = hashlib.sha256(slack.encode()).hexdigest()[:8]
    assert notify.display_target(slack) == f"https://hooks.slack.com/…/KeN9 ({digest})"
    shown = notify.display_target("https://u:p@h.test:8443/a/b?token=x")
    assert shown.startswith("https://h.test:8443/… (") and "/a/b" not in shown
    assert "token" not in shown and "u:p" not in shown
    # a short path or query shows no hint: 4 characters would be most of it
    assert notify.display_target("https://h.test/a?t=x1").startswith("https://h.test/… (")
    assert notify.display_target("http://[::1]:8080/").startswith("http://[::1]:8080 (")
    assert notify.display_target("https://h.test/a") != notify.display_target("https://h.test/b")
    assert "SeCrEt" not in notify.display_target("https://[::1/SeCrEt")  # unparsable


def test_an_attempts_error_never_carries_the_webhooks_url():
    url = "https://hooks.slack.com/services/T0/B0/SeCrEtToKeN9"
    by_name = f"InvalidURL: bad URL {url!r}"
    by_address = "ConnectError: POST https://93.184.215.14/services/T0/B0/SeCrEtToKeN9 failed"
    assert notify.scrub(by_name, url) == f"InvalidURL: bad URL '{notify.display_target(url)}'"
    assert notify.scrub(by_address, url) == "ConnectError: POST https://93.184.215.14/… failed"
    assert notify.scrub("ConnectionRefusedError: refused", url) == "ConnectionRefusedError: refused"


def test_webhook_url_is_validated_naming_the_field():
    assert WebhookSet(url="https://hooks.example.test/x?y=1").url.startswith("https://")
    for bad in ("ftp://h/x", "https://", "http://a b", "https://u:p@h/x", "h" * 10):
        with pytest.raises(ValueError, match="url must be an http:// or https:// URL"):
            WebhookSet(url=bad)
    with pytest.raises(ValueError, match="at most 2000"):
        WebhookSet(url="https://h/" + "x" * 2000)
    for bad in ("http://[::1", "http://h:99999/"):
        with pytest.raises(notify.WebhookAddressRefused, match="no valid host and port"):
            notify.webhook_address(WebhookSet(url=bad).url, "")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8265/api/jobs",  # the Ray dashboard
        "http://localhost/x",
        "http://169.254.169.254/latest/meta-data",  # a cloud's metadata service
        "http://10.0.0.7/",
        "http://[::1]:6379/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::127.0.0.1]/",  # IPv4-compatible
        "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
        "http://[64:ff9b::a00:1]/",  # NAT64 of 10.0.0.1
        "http://0.0.0.0/",
    ],
)
def test_a_users_webhook_may_not_reach_the_platforms_network(url):
    with pytest.raises(notify.WebhookAddressRefused, match="webhook_allowed_networks"):
        notify.webhook_address(url, "")


def test_allowed_networks_and_public_addresses_pass():
    assert notify.webhook_address("http://127.0.0.1:9/x", "127.0.0.0/8") == "127.0.0.1"
    assert notify.webhook_address("https://93.184.215.14/hook", "") == "93.184.215.14"
    with pytest.raises(notify.WebhookAddressRefused, match="does not resolve"):
        notify.webhook_address("http://no-such-host.invalid/", "")
    with pytest.raises(SettingsError, match="webhook_allowed_networks: '10.0.0.0/33'"):
        load_settings(webhook_allowed_networks="10.0.0.0/8, 10.0.0.0/33")


def test_a_delivery_to_the_platforms_network_is_refused_and_reaches_nothing(reg):
    """A webhook set before the rule, or whose name resolves elsewhere by now, is checked
    again at each attempt: nothing is sent."""
    ana = _user(reg, "ana")
    with WebhookSink() as hooks:
        reg.set_user_webhook(ana, hooks.url("/ana"))
        n = _notifier(reg, notify_max_attempts=1, webhook_allowed_networks="")

        async def run():
            await n.notify(notify.UNDEPLOYED, ana, {"deploymentId": "dp-1"})
            await _drain(n)

        asyncio.run(run())
    (d,) = reg.list_deliveries()
    assert d["status"] == "failed" and "WebhookAddressRefused" in d["lastError"], d
    assert hooks.received == []


def test_emit_never_raises_without_a_platform():
    assert notify.emit(notify.DEPLOYED, None, deploymentId="dp-1") is None


# ------------------------------------------------------------------ the registry


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(f"sqlite:///{tmp_path / 'raydock.db'}", Fernet.generate_key())


@pytest.fixture
def emitted(monkeypatch) -> list[tuple]:
    sent: list[tuple] = []
    monkeypatch.setattr(notify, "emit", lambda kind, user, **f: sent.append((kind, user, f)))
    return sent


def _user(reg: Registry, name: str, email: str | None = None) -> str:
    reg.ensure_admin()
    return reg.create_user(name, email, False, "system")["userId"]


def test_registry_tells_each_deployment_outcome_to_who_started_it(reg, emitted):
    ana, bo = _user(reg, "ana"), _user(reg, "bo")
    m = reg.create_model("tiny", "file", ana)
    reg.set_model_status(m["modelId"], "VALIDATING")
    reg.set_model_status(m["modelId"], "READY", artifact_uri="/x", checksum="c")
    body = default_deploy_body("chat")
    dep = reg.create_deployment(m["modelId"], body, ana)["deploymentId"]
    reg.begin_deploy(dep, body, bo, "DEPLOYING")
    assert emitted == []  # DEPLOYING tells nobody
    reg.set_deployment_status(dep, "DEPLOYED")
    undeploy = reg.begin_undeploy(dep, ana)
    reg.record_undeploy(dep, ana, ended=False)
    reg.set_deployment_status(dep, "UNDEPLOYED")
    reg.update_job(undeploy["dockStatusId"], status="SUCCESS")  # as the lifecycle ends it
    reg.begin_deploy(dep, None, bo, "DEPLOYING")
    reg.set_deployment_status(dep, "FAILED", "a replica failed to start: OOM")
    names = {"deploymentId": dep, "deploymentName": "chat", "modelId": m["modelId"]}
    assert emitted == [
        (notify.DEPLOYED, bo, names),
        (notify.UNDEPLOYED, ana, names),
        (notify.DEPLOY_FAILED, bo, {**names, "reason": "a replica failed to start: OOM"}),
    ]
    # an interrupted deploy (reconciliation) fails too, told to the job's creator
    emitted.clear()
    job = reg.begin_deploy(dep, None, ana, "DEPLOYING")
    reg.fail_jobs([job["dockStatusId"]], "interrupted")
    assert emitted == [(notify.DEPLOY_FAILED, ana, {**names, "reason": "interrupted"})]


def test_registry_tells_every_failed_import(reg, emitted):
    ana, bo = _user(reg, "ana"), _user(reg, "bo")
    # the import task's own failure
    m = reg.create_model("tiny", "file", ana)
    reg.create_job("IMPORT", m["modelId"], ana)
    reg.set_model_status(m["modelId"], "IMPORT_FAILED", error="config.json is missing")
    # an import nobody runs any more (reconciliation), with a deployment waiting for it
    m2 = reg.create_model("hub", "hugging_face", bo)
    dep = reg.create_deployment(m2["modelId"], default_deploy_body("wait"), bo, True)
    job = reg.create_job("IMPORT", m2["modelId"], bo, dep["deploymentId"])
    reg.fail_jobs([job["dockStatusId"]], "interrupted")
    assert emitted == [
        (
            notify.IMPORT_FAILED,
            ana,
            {"modelId": m["modelId"], "modelName": "tiny", "error": "config.json is missing"},
        ),
        (
            notify.IMPORT_FAILED,
            bo,
            {"modelId": m2["modelId"], "modelName": "hub", "error": "interrupted"},
        ),
        (
            notify.DEPLOY_FAILED,
            bo,
            {
                "deploymentId": dep["deploymentId"],
                "deploymentName": "wait",
                "modelId": m2["modelId"],
                "reason": "its model's import failed: interrupted",
            },
        ),
    ]


def test_nothing_is_told_when_the_transaction_fails(reg, emitted):
    ana = _user(reg, "ana")
    m = reg.create_model("tiny", "file", ana)
    with pytest.raises(NotFound), reg._tx() as s:
        reg._import_failed_notice(s, reg._model(s, m["modelId"]), ana)
        raise NotFound("rolled back")
    assert emitted == []


def test_user_webhook_secret_is_sealed_shown_once_and_resolved_for_signing(reg, tmp_path):
    ana = _user(reg, "ana", "ana@example.test")
    with pytest.raises(NotFound, match="no webhook"):
        reg.get_user_webhook(ana)
    url = "https://hooks.example.test/services/T0/B0/SeCrEtToKeN9"  # the path is the token
    hook = reg.set_user_webhook(ana, url)
    assert hook["secret"].startswith("rdwh-")
    # the URL is never shown again, not even in the answer that set it: masked
    assert hook["url"] == notify.display_target(url)
    assert hook["url"].startswith("https://hooks.example.test/…/KeN9 (")
    assert reg.get_user_webhook(ana) == {"url": hook["url"], "createdAt": hook["createdAt"]}
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("raydock.db*"))
    assert hook["secret"].encode() not in raw  # sealed at rest
    assert b"SeCrEtToKe" not in raw and b"services/T0" not in raw  # the URL too
    targets = reg.notification_targets(ana)  # the notifier's, opened
    assert targets["email"] == "ana@example.test"
    assert targets["webhook"] == {"url": url, "secret": hook["secret"]}
    again = reg.set_user_webhook(ana, "https://hooks.example.test/ana2")  # a new secret
    assert again["secret"] != hook["secret"]
    assert reg.notification_targets(ana)["webhook"]["url"] == "https://hooks.example.test/ana2"
    reg.delete_user_webhook(ana)
    assert reg.notification_targets(ana)["webhook"] is None
    with pytest.raises(NotFound):
        reg.delete_user_webhook(ana)


def test_a_key_event_goes_to_the_keys_creator(reg):
    ana = _user(reg, "ana", "ana@example.test")
    m = reg.create_model("tiny", "file", ana)
    reg.set_model_status(m["modelId"], "VALIDATING")
    reg.set_model_status(m["modelId"], "READY", artifact_uri="/x", checksum="c")
    dep = reg.create_deployment(m["modelId"], default_deploy_body("chat"), ana)["deploymentId"]
    key = reg.create_deployment_key(dep, "team", ana)
    found = reg.notification_targets(None, key["keyId"])
    assert (found["userId"], found["email"]) == (ana, "ana@example.test")
    assert found["fields"] == {"keyName": "team", "deploymentId": dep, "deploymentName": "chat"}
    assert reg.notification_targets(None, "key-gone") == {
        "userId": None,
        "email": None,
        "webhook": None,
        "fields": {},
    }


def test_deliveries_are_recorded_and_listed_newest_first(reg):
    first = notify.new_event(notify.DEPLOYED, None, {"deploymentId": "dp-1"})
    second = notify.new_event(notify.UNDEPLOYED, None, {"deploymentId": "dp-1"})
    a = reg.record_delivery(first, "email", "ops@example.test")
    time.sleep(0.01)
    b = reg.record_delivery(second, "webhook", "https://u:p@h.test/x?token=t")
    assert b["target"] == notify.display_target("https://u:p@h.test/x?token=t")
    assert (a["status"], a["attempts"]) == ("pending", 0)
    reg.update_delivery(a["deliveryId"], "delivered", 1, None)
    reg.update_delivery(b["deliveryId"], "failed", 3, "ConnectionRefusedError: refused")
    listed = reg.list_deliveries()
    assert [d["deliveryId"] for d in listed] == [b["deliveryId"], a["deliveryId"]]
    assert listed[0]["target"] == notify.display_target("https://u:p@h.test/x?token=t")
    assert (listed[0]["status"], listed[0]["attempts"]) == ("failed", 3)
    assert listed[0]["lastError"] == "ConnectionRefusedError: refused"
    assert listed[1]["deliveredAt"] and listed[1]["event"] == first
    assert [d["deliveryId"] for d in reg.list_deliveries(status="failed")] == [b["deliveryId"]]
    assert [d["kind"] for d in reg.list_deliveries(kind=notify.DEPLOYED)] == [notify.DEPLOYED]
    assert len(reg.list_deliveries(limit=1)) == 1


TOKEN_URL = "https://hooks.example.test/services/T0/B0/SeCrEtToKeN9?token=QuErYtOkEn"


def test_a_webhook_url_is_stored_sealed_and_its_deliveries_masked(db_url):
    """What the database holds (SQLite and PostgreSQL): the URL sealed with the platform key,
    its masked form, no URL in clear, and deliveries that name it masked."""
    key = Fernet.generate_key()
    reg = Registry(db_url, key)
    try:
        ana = _user(reg, "ana")
        reg.set_user_webhook(ana, TOKEN_URL)
        event = notify.new_event(notify.DEPLOYED, ana, {"deploymentId": "dp-1"})
        reg.record_delivery(event, "webhook", TOKEN_URL)
        with reg._tx() as s:
            (row,) = s.execute(
                text("SELECT url, url_sealed, url_hint, secret_sealed FROM user_webhooks")
            ).all()
            targets = s.scalars(text("SELECT target FROM notification_deliveries")).all()
    finally:
        reg.close()
    assert row.url is None and SecretBox(key).open(row.url_sealed) == TOKEN_URL
    assert row.url_hint == notify.display_target(TOKEN_URL) == targets[0]
    for stored in (*row[1:], *targets):
        assert "SeCrEtToKe" not in stored and "QuErYtOkEn" not in stored, stored


# ------------------------------------------------------------------ the notifier


def _notifier(reg: Registry, **settings) -> notify.Notifier:
    settings = {"webhook_allowed_networks": "127.0.0.1/32"} | settings  # the test receivers
    n = notify.Notifier(load_settings(**settings).to_dict(), registry=RegistryHandle(reg))
    n.delays = [0.05 * d for d in n.delays]  # the schedule, 20 times faster
    return n


async def _drain(n: notify.Notifier) -> None:
    while await n.pending():
        await asyncio.sleep(0.02)


def test_notifier_delivers_by_email_and_signed_webhook(reg):
    ana = _user(reg, "ana", "ana@example.test")
    with MailSink() as mail, WebhookSink() as hooks:
        mine = reg.set_user_webhook(ana, hooks.url("/ana"))
        hooks.secrets = {"/ana": mine["secret"], "/platform": "platform-secret"}
        n = _notifier(
            reg,
            smtp_host="127.0.0.1",
            smtp_port=mail.port,
            notify_emails="ops@example.test, ana@example.test",
            webhook_url=hooks.url("/platform"),
            webhook_secret="platform-secret",
        )

        async def run():
            await n.notify(notify.DEPLOYED, ana, {"deploymentId": "dp-1", "deploymentName": "chat"})
            await _drain(n)

        asyncio.run(run())
        assert sorted(m["to"][0] for m in mail.messages) == ["ana@example.test", "ops@example.test"]
        assert all(mail.find(notify.DEPLOYED, deploymentName="chat") for _ in mail.messages)
        assert sorted(r["path"] for r in hooks.received) == ["/ana", "/platform"]
        assert all(r["verified"] for r in hooks.received)
        got = hooks.received[0]
        assert got["headers"]["X-Raydock-Event"] == notify.DEPLOYED
        assert got["event"]["data"] == {"deploymentId": "dp-1", "deploymentName": "chat"}
    listed = reg.list_deliveries()
    assert len(listed) == 4 and {d["status"] for d in listed} == {"delivered"}
    assert {d["attempts"] for d in listed} == {1}
    ids = {r["headers"]["X-Raydock-Delivery"] for r in hooks.received}
    assert ids <= {d["deliveryId"] for d in listed}


def _deliver_one(n: notify.Notifier, user_id: str) -> None:
    async def run():
        await n.notify(notify.DEPLOYED, user_id, {"deploymentId": "dp-1"})
        await _drain(n)

    asyncio.run(run())


def test_a_sealed_webhook_url_is_opened_for_the_delivery_only(reg, tmp_path):
    """The URL is sealed at rest and masked in every answer, yet the receiver gets the
    delivery at its whole URL (path and query: its credential)."""
    ana = _user(reg, "ana")
    with WebhookSink() as hooks:
        path = "/services/T0/B0/SeCrEtToKeN9?token=QuErYtOkEn"
        hook = reg.set_user_webhook(ana, hooks.url(path))
        hooks.secrets = {path: hook["secret"]}
        _deliver_one(_notifier(reg), ana)
    (got,) = hooks.received
    assert got["path"] == path and got["verified"], got
    (d,) = reg.list_deliveries()
    assert d["status"] == "delivered" and d["target"] == hook["url"]
    shown = json.dumps([d, reg.get_user_webhook(ana), hook])
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("raydock.db*"))
    for secret_part in ("SeCrEtToKe", "QuErYtOkEn"):
        assert secret_part not in shown and secret_part.encode() not in raw


def test_a_restored_backup_still_delivers_to_the_sealed_webhook(tmp_path):
    """The URL and its signing secret are sealed with the platform key; a backup carries
    that key (secret.key), so the restored platform opens both and delivers."""
    from raydock.platform import backup

    src = load_settings(home=str(tmp_path / "src"))
    with WebhookSink() as hooks:
        path = "/services/T0/B0/SeCrEtToKeN9"
        reg = Registry(src.db_url, platform_key(src.home_path))
        try:
            ana = _user(reg, "ana")
            hooks.secrets = {path: reg.set_user_webhook(ana, hooks.url(path))["secret"]}
        finally:
            reg.close()
        archive = tmp_path / "raydock.tar"
        with archive.open("wb") as out:
            backup.write_backup(src, out)
        assert b"SeCrEtToKe" not in archive.read_bytes()  # the archive has it sealed too

        target = load_settings(home=str(tmp_path / "restored"))
        backup.restore(target, archive)
        reg = Registry(target.db_url, platform_key(target.home_path))
        try:
            _deliver_one(_notifier(reg), ana)
            assert reg.list_deliveries()[0]["status"] == "delivered"
        finally:
            reg.close()
    (got,) = hooks.received
    assert got["path"] == path and got["verified"], got


def test_dead_mail_server_and_webhook_fail_after_every_attempt_without_blocking(reg):
    ana = _user(reg, "ana", "ana@example.test")
    reg.set_user_webhook(ana, f"http://127.0.0.1:{free_port()}/gone")
    n = _notifier(reg, smtp_host="127.0.0.1", smtp_port=free_port(), notify_max_attempts=3)

    async def run():
        start = time.monotonic()
        await n.notify(notify.DEPLOY_FAILED, ana, {"deploymentId": "dp-1", "reason": "OOM"})
        handed = time.monotonic() - start
        await _drain(n)
        return handed

    assert asyncio.run(run()) < 0.1  # the caller never waits for a delivery
    listed = reg.list_deliveries()
    assert sorted(d["channel"] for d in listed) == ["email", "webhook"]
    for d in listed:
        assert (d["status"], d["attempts"]) == ("failed", 3), d
        assert "refused" in d["lastError"].lower(), d


def test_a_receiver_refusing_the_signature_fails_the_delivery(reg):
    ana = _user(reg, "ana")
    with WebhookSink() as hooks:
        reg.set_user_webhook(ana, hooks.url("/ana"))
        hooks.secrets = {"/ana": "not-the-secret-raydock-made"}
        n = _notifier(reg, notify_max_attempts=2)

        async def run():
            await n.notify(notify.UNDEPLOYED, ana, {"deploymentId": "dp-1"})
            await _drain(n)

        asyncio.run(run())
        wait_until(lambda: len(hooks.received) == 2)
    (d,) = reg.list_deliveries()
    assert (d["status"], d["attempts"], d["lastError"]) == (
        "failed",
        2,
        "WebhookRefused: HTTP 401",  # the status only: the receiver's body is its own
    )


def test_a_new_notifier_goes_on_with_what_its_predecessor_left_pending(reg):
    ana = _user(reg, "ana")
    with WebhookSink() as hooks:
        hooks.secrets = {"/ana": "", "/platform": "platform-secret"}
        mine = reg.set_user_webhook(ana, hooks.url("/ana"))
        hooks.secrets["/ana"] = mine["secret"]
        event = notify.new_event(notify.DEPLOYED, ana, {"deploymentId": "dp-1"})
        # a predecessor's: its webhooks failed once each before it died; email is off now,
        # and one webhook was removed meanwhile
        platform = reg.record_delivery(event, "webhook", hooks.url("/platform"))
        own = reg.record_delivery(event, "webhook", hooks.url("/ana"))
        email = reg.record_delivery(event, "email", "ops@example.test")
        gone = reg.record_delivery(event, "webhook", hooks.url("/removed"))
        for d in (platform, own, gone):
            reg.update_delivery(d["deliveryId"], "pending", 1, "HTTP 503")
        time.sleep(0.01)
        n = _notifier(reg, webhook_url=hooks.url("/platform"), webhook_secret="platform-secret")
        time.sleep(0.01)
        current = reg.record_delivery(event, "webhook", "https://h.test/x")  # the new one's

        async def run():
            resumed = await n.recover()
            await _drain(n)
            return resumed

        assert asyncio.run(run()) == 2
        got = {r["path"]: r for r in hooks.received}
        assert sorted(got) == ["/ana", "/platform"] and all(r["verified"] for r in got.values())
        assert got["/ana"]["headers"]["X-Raydock-Delivery"] == own["deliveryId"]
    shown = {d["deliveryId"]: d for d in reg.list_deliveries()}
    for d in (platform, own):
        assert (shown[d["deliveryId"]]["status"], shown[d["deliveryId"]]["attempts"]) == (
            "delivered",
            2,
        )
    for d in (email, gone):
        assert shown[d["deliveryId"]]["status"] == "failed"
        assert shown[d["deliveryId"]]["lastError"] == notify.TARGET_GONE
    assert shown[current["deliveryId"]]["status"] == "pending"


# ------------------------------------------------------------------ the deliveries route


def test_deliveries_are_listed_to_admins_and_to_each_user_their_own(reg, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from raydock.platform import api_deps
    from raydock.platform.api import app

    admin_key = reg.ensure_admin()
    ana = reg.create_user("ana", "ana@example.test", False, "system")
    bo = reg.create_user("bo", "bo@example.test", False, "system")
    ana_hook = "https://hooks.slack.com/services/T/B/SeCrEt"
    reg.set_user_webhook(ana["userId"], ana_hook)
    for user, targets in (
        (ana, ["ana@example.test", ana_hook, "ops@example.test", "https://ops.test/x?k=PlAtFoRm"]),
        (bo, ["bo@example.test", "ops@example.test"]),
    ):
        event = notify.new_event(notify.DEPLOYED, user["userId"], FIELDS[notify.DEPLOYED])
        for target in targets:
            channel = "email" if "@" in target else "webhook"
            reg.record_delivery(event, channel, target)
    monkeypatch.setattr(api_deps.ctx, "settings", load_settings(home=str(tmp_path)), raising=False)
    monkeypatch.setattr(api_deps.ctx, "registry", RegistryHandle(reg), raising=False)

    def listed(key: str, **params) -> list[str]:
        with TestClient(app, base_url="http://raydock.test") as c:
            r = c.get("/public/notifications/deliveries", params=params, headers={"X-api-key": key})
        assert r.status_code == 200 and "SeCrEt" not in r.text and "PlAtFoRm" not in r.text
        return sorted(d["target"] for d in r.json()["deliveries"])

    assert len(listed(admin_key)) == 6
    assert listed(ana["apiKey"]) == sorted(["ana@example.test", notify.display_target(ana_hook)])
    assert listed(ana["apiKey"], limit=1) in (
        ["ana@example.test"],
        [notify.display_target(ana_hook)],
    )
    assert listed(bo["apiKey"]) == ["bo@example.test"]


def test_a_user_pages_through_exactly_their_own_deliveries_newest_first(
    db_url, tmp_path, monkeypatch
):
    """Among other users' deliveries, their own events' to the platform's addresses, and an
    event of no user's sent to their address: a user's pages hold their own, newest first."""
    from fastapi.testclient import TestClient

    from raydock.platform import api_deps
    from raydock.platform.api import app

    reg = Registry(db_url, Fernet.generate_key())
    try:
        admin_key = reg.ensure_admin()
        ana = reg.create_user("ana", "ana@example.test", False, "system")
        bo = reg.create_user("bo", "bo@example.test", False, "system")
        fields = FIELDS[notify.DEPLOYED]
        hers = []
        for _ in range(5):
            own = notify.new_event(notify.DEPLOYED, ana["userId"], fields)
            hers.append(reg.record_delivery(own, "email", "ana@example.test")["deliveryId"])
            reg.record_delivery(own, "email", "ops@example.test")
            bos = notify.new_event(notify.DEPLOYED, bo["userId"], fields)
            reg.record_delivery(bos, "email", "bo@example.test")
            nobodys = notify.new_event(notify.DEPLOYED, None, fields)
            reg.record_delivery(nobodys, "email", "ana@example.test")
            time.sleep(0.002)  # each round later than the last: newest first is one order
        settings = load_settings(home=str(tmp_path))
        monkeypatch.setattr(api_deps.ctx, "settings", settings, raising=False)
        monkeypatch.setattr(api_deps.ctx, "registry", RegistryHandle(reg), raising=False)

        def page(key: str, **params) -> tuple[list[str], int, int | None]:
            with TestClient(app, base_url="http://raydock.test") as c:
                r = c.get(
                    "/public/notifications/deliveries", params=params, headers={"X-api-key": key}
                )
            assert r.status_code == 200, r.text
            found = r.json()
            return (
                [d["deliveryId"] for d in found["deliveries"]],
                found["total"],
                found["nextOffset"],
            )

        newest_first = hers[::-1]
        assert page(ana["apiKey"], limit=2) == (newest_first[:2], 5, 2)
        assert page(ana["apiKey"], limit=2, offset=2) == (newest_first[2:4], 5, 4)
        assert page(ana["apiKey"], limit=2, offset=4) == (newest_first[4:], 5, None)
        assert page(bo["apiKey"])[1] == 5
        assert page(admin_key)[1] == 20  # an admin sees every delivery
    finally:
        reg.close()


class _SlowReceiver:
    """A raw HTTP receiver on 127.0.0.1 that answers every request the way `answer` says:
    "trickle": a status line, then a header byte every 0.2 s for a minute (each read within
    httpx's per-read timeout); "flood": 200 and an endless body."""

    def __init__(self, answer: str):
        import socket
        import threading

        self.answer, self.sock = answer, socket.create_server(("127.0.0.1", 0))
        self.port, self.sent = self.sock.getsockname()[1], 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.recv(65536)
        try:
            if self.answer == "trickle":
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(300):
                    conn.sendall(b"a")
                    time.sleep(0.2)
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                chunk = b"%x\r\n%s\r\n" % (2**20, b"x" * 2**20)
                for _ in range(1000):
                    conn.sendall(chunk)
                    self.sent += 2**20
        except OSError:  # the notifier hung up
            pass
        finally:
            conn.close()


@pytest.mark.parametrize("answer", ["trickle", "flood"])
def test_a_slow_or_endless_answer_neither_holds_nor_fills_the_notifier(reg, monkeypatch, answer):
    """httpx's timeout bounds each read, and .post() reads the whole body: a receiver that
    trickled its headers held the delivery pending forever, one that sent an endless body
    filled the notifier's memory. A delivery has TIMEOUT_S in all, and the body is not read."""
    monkeypatch.setattr(notify, "TIMEOUT_S", 1.0)
    ana = _user(reg, "ana")
    receiver = _SlowReceiver(answer)
    reg.set_user_webhook(ana, f"http://127.0.0.1:{receiver.port}/hook")
    start = time.monotonic()
    _deliver_one(_notifier(reg, notify_max_attempts=1), ana)
    assert time.monotonic() - start < 5
    (d,) = reg.list_deliveries()
    if answer == "trickle":
        assert (d["status"], d["lastError"]) == ("failed", "WebhookRefused: no answer within 1 s")
    else:
        assert d["status"] == "delivered" and receiver.sent < 64 * 2**20, receiver.sent


def test_an_event_handed_over_twice_is_delivered_once(reg):
    """The hand-over tries again when the notifier's answer does not come in 10 s; the
    notifier had the event already, and made it a second event with new ids."""
    ana = _user(reg, "ana")
    with WebhookSink() as hooks:
        hooks.secrets = {"/ana": reg.set_user_webhook(ana, hooks.url("/ana"))["secret"]}
        n = _notifier(reg)

        async def run():
            for _ in range(2):
                await n.notify(notify.DEPLOYED, ana, {"deploymentId": "dp-1"}, "ev-once")
            await _drain(n)

        asyncio.run(run())
        wait_until(lambda: hooks.received)
    (got,) = hooks.received
    assert got["event"]["id"] == "ev-once"
    assert len(reg.list_deliveries()) == 1
