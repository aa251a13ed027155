"""Where the tests' notifications arrive: a real SMTP server (aiosmtpd) and a webhook
receiver that checks each delivery's signature the way README tells users to, on its own
(not with raydock's code), and refuses (401) a delivery whose signature does not match."""

from __future__ import annotations

import email
import hashlib
import hmac
import json
import threading
import time
from email import policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller

from raydock.platform.bootstrap import free_port  # re-exported for the tests


def wait_until(predicate, timeout: float = 30, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


class MailSink:
    """An SMTP server on 127.0.0.1 that keeps every message; `stop()` closes its port (a
    dead mail server), `start()` opens it again on the same port."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.messages: list[dict[str, Any]] = []
        self._controller: Controller | None = None

    async def handle_DATA(self, server, session, envelope) -> str:  # aiosmtpd's handler hook
        msg = email.message_from_bytes(envelope.content, policy=policy.default)
        self.messages.append({"to": list(envelope.rcpt_tos), "message": msg})
        return "250 Message accepted"

    def start(self) -> MailSink:
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> MailSink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def find(self, kind: str, to: str | None = None, **data: Any) -> list[dict[str, Any]]:
        """Messages of this event kind (X-Raydock-Event), to `to`, whose text names each
        value in `data`."""
        out = []
        for m in list(self.messages):
            msg = m["message"]
            if msg["X-Raydock-Event"] != kind or (to and to not in m["to"]):
                continue
            text = msg.get_content()
            if all(str(v) in text for v in data.values()):
                out.append(m)
        return out


class WebhookSink:
    """An HTTP server on 127.0.0.1 receiving webhook POSTs. `secrets` maps a path to the
    secret its deliveries must be signed with; a path without one takes anything."""

    def __init__(self):
        self.received: list[dict[str, Any]] = []
        self.secrets: dict[str, str] = {}
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                secret = sink.secrets.get(self.path)
                verified = None
                if secret is not None:
                    expected = (
                        "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
                    )
                    given = self.headers.get("X-Raydock-Signature") or ""
                    verified = hmac.compare_digest(expected, given)
                sink.received.append(
                    {
                        "path": self.path,
                        "headers": dict(self.headers),
                        "event": json.loads(body),
                        "verified": verified,
                    }
                )
                self.send_response(401 if verified is False else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def __enter__(self) -> WebhookSink:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def find(self, kind: str, path: str | None = None, **data: Any) -> list[dict[str, Any]]:
        """Deliveries of this event kind (to `path`) whose event data has these values."""
        return [
            r
            for r in list(self.received)
            if r["event"]["kind"] == kind
            and (path is None or r["path"] == path)
            and all(r["event"]["data"].get(k) == v for k, v in data.items())
        ]


class NotifySinks:
    """Both sinks, and the platform settings that send every notification to them: the
    platform-wide webhook at PLATFORM_PATH (signed with PLATFORM_SECRET), email to the
    acting user and to OPS_EMAIL, 3 attempts per delivery (waits of 1 and 2 s)."""

    PLATFORM_PATH = "/platform"
    PLATFORM_SECRET = "platform-webhook-secret"
    OPS_EMAIL = "ops@raydock.test"
    MAX_ATTEMPTS = 3

    def __init__(self):
        self.mail = MailSink()
        self.hooks = WebhookSink()
        self.hooks.secrets[self.PLATFORM_PATH] = self.PLATFORM_SECRET

    def settings(self) -> dict[str, Any]:
        return {
            "smtp_host": "127.0.0.1",
            "smtp_port": self.mail.port,
            "smtp_from": "raydock@raydock.test",
            "notify_emails": self.OPS_EMAIL,
            "webhook_url": self.hooks.url(self.PLATFORM_PATH),
            "webhook_secret": self.PLATFORM_SECRET,
            "notify_max_attempts": self.MAX_ATTEMPTS,
            "webhook_allowed_networks": "127.0.0.1/32",  # the receiver: users' webhooks too
        }

    def __enter__(self) -> NotifySinks:
        self.mail.start()
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mail.stop()
        self.hooks.__exit__(*exc)
