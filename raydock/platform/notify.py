"""Notifications by email and webhook: what happened (an import failed, a deployment came up,
failed or went away, a key neared or hit its token budget), told to the user who started it
and to the addresses the platform configures.

Pure parts (an event's email and webhook body, the signature, the retry schedule) and the
`Notifier` actor that delivers them. Every delivery runs as a task of the actor, retried with
exponential backoff, and is recorded in the database through the registry (attempts, last
error), so a dead mail server or webhook is visible through the API and never blocks or fails
what triggered it: `emit` only hands the event to the actor.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import ipaddress
import json
import logging
import queue
import re
import smtplib
import socket
import ssl
import threading
import time
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

from raydock.config import Settings, allowed_networks
from raydock.metering.limits import BUDGET_WARNING as BUDGET_WARNING_SHARE

log = logging.getLogger("raydock.notify")

# ------------------------------------------------------------------ events

IMPORT_FAILED = "model.import_failed"
DEPLOYED = "deployment.deployed"
DEPLOY_FAILED = "deployment.failed"
UNDEPLOYED = "deployment.undeployed"
BUDGET_WARNING = "key.budget_warning"
BUDGET_EXHAUSTED = "key.budget_exhausted"
KINDS = (IMPORT_FAILED, DEPLOYED, DEPLOY_FAILED, UNDEPLOYED, BUDGET_WARNING, BUDGET_EXHAUSTED)

SIGNATURE_HEADER = "X-Raydock-Signature"
EVENT_HEADER = "X-Raydock-Event"
DELIVERY_HEADER = "X-Raydock-Delivery"

TIMEOUT_S = 5.0  # one SMTP session or webhook POST
CHANNELS = ("email", "webhook")
TARGET_GONE = "not resumed after a notifier restart: its target is no longer configured"
STATUSES = ("pending", "delivered", "failed")


def new_event(
    kind: str, user_id: str | None, fields: dict[str, Any], event_id: str | None = None
) -> dict[str, Any]:
    """An event as webhooks receive it and deliveries store it."""
    if kind not in KINDS:
        raise ValueError(f"unknown notification kind {kind!r}")
    return {
        "id": event_id or f"ev-{uuid.uuid4()}",
        "kind": kind,
        "createdAt": datetime.now(UTC).replace(tzinfo=None).isoformat() + "Z",
        "userId": user_id,
        "data": dict(fields),
    }


def webhook_body(event: dict[str, Any]) -> bytes:
    """The exact bytes a webhook receives (and the signature covers)."""
    return json.dumps(event, sort_keys=True, separators=(",", ":")).encode()


def sign(secret: str, body: bytes) -> str:
    """The X-Raydock-Signature header: HMAC-SHA256 of the body under the webhook's secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """What a receiver does (README): recompute the signature, compare in constant time."""
    # bytes: compare_digest refuses str with non-ASCII characters (a TypeError)
    return bool(header) and hmac.compare_digest(sign(secret, body).encode(), header.encode())


def webhook_headers(event: dict[str, Any], delivery_id: str, secret: str, body: bytes) -> dict:
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "raydock-notifier",
        EVENT_HEADER: event["kind"],
        DELIVERY_HEADER: delivery_id,
    }
    if secret:  # a platform webhook without webhook_secret goes unsigned
        headers[SIGNATURE_HEADER] = sign(secret, body)
    return headers


def _name(data: dict[str, Any], name: str, ident: str) -> str:
    named, given = data.get(name), data.get(ident)
    if named and given:
        return f"{named} ({given})"
    return str(named or given or "?")


def _budget_line(data: dict[str, Any]) -> str:
    used, limit = data.get("used"), data.get("limit")
    share = f" ({100 * used / limit:.0f} %)" if used is not None and limit else ""
    return f"{used} of {limit} tokens used{share}"


#: what may not stand in a header (a CR or LF makes EmailMessage refuse the whole message)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def render(event: dict[str, Any]) -> tuple[str, str]:
    """An event's email: (subject, plain text body)."""
    kind, data = event["kind"], event["data"]
    model = _name(data, "modelName", "modelId")
    dep = _name(data, "deploymentName", "deploymentId")
    key = _name(data, "keyName", "keyId")
    if kind == IMPORT_FAILED:
        subject = f"Import of {data.get('modelName') or data.get('modelId')} failed"
        text = f"The import of model {model} failed.\n\nReason: {data.get('error') or 'unknown'}"
    elif kind == DEPLOYED:
        subject = f"Deployment {data.get('deploymentName') or data.get('deploymentId')} is DEPLOYED"
        text = f"Deployment {dep} is DEPLOYED and serving."
    elif kind == DEPLOY_FAILED:
        subject = f"Deployment {data.get('deploymentName') or data.get('deploymentId')} FAILED"
        text = f"Deployment {dep} FAILED.\n\nReason: {data.get('reason') or 'unknown'}"
    elif kind == UNDEPLOYED:
        subject = f"Deployment {data.get('deploymentName') or data.get('deploymentId')} undeployed"
        text = f"Deployment {dep} is UNDEPLOYED: it no longer serves."
    elif kind == BUDGET_WARNING:
        subject = f"Key {data.get('keyName') or data.get('keyId')} nears its token budget"
        text = (
            f"API key {key} of deployment {dep} has used {BUDGET_WARNING_SHARE:.0%} of its "
            f"token budget: {_budget_line(data)}."
        )
    elif kind == BUDGET_EXHAUSTED:
        subject = f"Key {data.get('keyName') or data.get('keyId')} hit its token budget"
        text = (
            f"API key {key} of deployment {dep} has used its whole token budget "
            f"({_budget_line(data)}): its requests are refused (429) until the budget resets."
        )
    else:
        raise ValueError(f"unknown notification kind {kind!r}")
    details = "\n".join(f"  {k}: {v}" for k, v in sorted(data.items()))
    footer = f"\n\nEvent {event['id']} ({kind}) at {event['createdAt']}\n{details}\n"
    return f"[raydock] {_CONTROL.sub(' ', subject)}", text + footer


def email_message(event: dict[str, Any], sender: str, to: str, delivery_id: str) -> EmailMessage:
    subject, text = render(event)
    msg = EmailMessage()
    msg["Subject"], msg["From"], msg["To"] = subject, sender, to
    msg[EVENT_HEADER], msg[DELIVERY_HEADER] = event["kind"], delivery_id
    # RFC 5322 asks for both; a retry of a delivery keeps its Message-ID (mail servers and
    # clients drop the duplicate)
    msg["Date"] = email.utils.formatdate(usegmt=True)
    domain = sender.rpartition("@")[2].strip("> ") or "raydock.invalid"
    msg["Message-ID"] = f"<{delivery_id}@{domain}>"
    msg.set_content(text)
    return msg


def backoff_delays(max_attempts: int, base_s: float = 1.0, cap_s: float = 60.0) -> list[float]:
    """Seconds to wait after each failed attempt but the last: 1, 2, 4, 8, ... (capped)."""
    return [min(cap_s, base_s * 2**i) for i in range(max(0, max_attempts - 1))]


def addresses(text: str) -> list[str]:
    """The `notify_emails` setting: comma-separated (spaces and semicolons tolerated)."""
    return [a for a in re.split(r"[,;\s]+", text or "") if a]


#: a masked URL shows this many of the last characters of its path and query, when they are
#: at least HINT_MIN_HIDDEN long (a shorter one shows as "…" only: a hint never shows most of it)
HINT_CHARS = 4
HINT_MIN_HIDDEN = 16


def _after_host(parts) -> str:
    """A URL's path, query and fragment: where a webhook's credential usually is."""
    rest = parts.path
    if parts.query:
        rest += "?" + parts.query
    if parts.fragment:
        rest += "#" + parts.fragment
    return rest


def display_target(target: str) -> str:
    """A delivery's target, and a user's webhook, as the API shows them: an address as is; a
    URL masked, since any part but its scheme, host and port may carry a credential (a Slack
    webhook's path is its token, others take `?token=`): its scheme, host and port, the last
    4 characters of the rest, and the first 8 hex digits of the SHA-256 of the whole URL,
    which tell URLs apart (and a user's webhook among the deliveries) without showing them.
    E.g. `https://hooks.slack.com/…/XyZ9 (5d41402a)`. Revision 0003 holds a copy of it (the
    targets it masked): change both, or pending deliveries of before no longer resume."""
    if "://" not in target:
        return target
    digest = hashlib.sha256(target.encode()).hexdigest()[:8]
    try:
        parts = urlsplit(target)
        host = parts.hostname or ""
        if ":" in host:  # IPv6
            host = f"[{host}]"
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        return f"URL ({digest})"
    rest = _after_host(parts)
    hidden = "" if rest in ("", "/") else "/…"
    if len(rest) >= HINT_MIN_HIDDEN:
        hidden += "/" + rest[-HINT_CHARS:]
    return f"{parts.scheme}://{host}{hidden} ({digest})"


def scrub(text: str, url: str) -> str:
    """`text` (an attempt's error, a log line) with `url` masked, and the part of it after
    its host removed wherever it appears alone (a request to the checked address carries it
    without the host)."""
    if "://" not in url:
        return text
    text = text.replace(url, display_target(url))
    try:
        rest = _after_host(urlsplit(url))
    except ValueError:
        return text
    return text.replace(rest, "/…") if len(rest) > 1 else text


class WebhookAddressRefused(ValueError):
    """A user's webhook whose host is (or resolves to) an address they may not reach."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address):
    """The IPv4 address an IPv6 one carries (mapped, compatible, 6to4, NAT64), which is
    where it leads on networks that translate them; else the address itself."""
    if ip.version == 4:
        return ip
    if ip.ipv4_mapped or ip.sixtofour:
        return ip.ipv4_mapped or ip.sixtofour
    if ip in _NAT64 or int(ip) >> 32 == 0:  # NAT64, or IPv4-compatible (::a.b.c.d)
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def webhook_address(url: str, allowed: str) -> str:
    """The address to POST a user's webhook to: its host resolved, every address it has
    checked. A user's webhook must not reach the platform's own network (the Ray dashboard,
    a cloud's metadata service, a database): loopback, private, link-local, reserved or
    multicast addresses are refused unless `allowed` (webhook_allowed_networks) names them.
    The delivery then connects to the address checked, so a name that resolves otherwise a
    moment later (DNS rebinding) cannot take it elsewhere."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)  # ValueError past 65535
    except ValueError as exc:
        raise WebhookAddressRefused(
            f"the webhook's URL has no valid host and port: {exc}"
        ) from None
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookAddressRefused(
            f"the webhook's host {host!r} does not resolve: {exc}"
        ) from None
    networks = allowed_networks(allowed)
    addresses = list(dict.fromkeys(info[4][0] for info in found))
    for address in addresses:
        ip = _embedded_ipv4(ipaddress.ip_address(address.split("%")[0]))
        if not ip.is_global and not any(ip in net for net in networks):
            raise WebhookAddressRefused(
                f"the webhook's host {host!r} is {ip}, an address of the platform's own network "
                "(loopback, private, link-local or reserved); an admin may allow it with "
                "webhook_allowed_networks"
            )
    return addresses[0]


def describe_failure(exc: BaseException) -> str:
    """An attempt's error for the API: the exception and, when it wraps one (httpx wraps
    the OSError), the root cause ("ConnectError: ... (ConnectionRefusedError: ...)")."""
    text = f"{type(exc).__name__}: {exc}"
    root, seen = exc, {id(exc)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        root = nxt
        seen.add(id(root))
    if root is not exc and str(root) not in text:
        text += f" ({type(root).__name__}: {root})"
    return text


# ------------------------------------------------------------------ emitting


#: how long an emitted event waits for a notifier (one that died is started again by the
#: platform's supervisor within seconds) before it is given up, logged
HANDOVER_TIMEOUT_S = 60.0
#: event ids a notifier remembers, so that one handed over twice is delivered once
SEEN_EVENTS = 10_000


def emit(kind: str, user_id: str | None, **fields: Any) -> None:
    """Hand an event to the notifier actor, fire-and-forget: never raises, never waits for a
    delivery. `user_id`: who started the action (None for a key event: the notifier tells its
    creator, found by `keyId`). A background thread of this process hands it over, waiting
    for a notifier while there is none (it died and is being started again)."""
    try:
        import ray

        if not ray.is_initialized():
            return
        event_id = f"ev-{uuid.uuid4()}"  # one id however often the hand-over is tried
        _handover().put((kind, user_id, fields, event_id, time.monotonic() + HANDOVER_TIMEOUT_S))
    except Exception as exc:  # a notification must never fail what it reports
        log.debug("emitting %s failed: %r", kind, exc)


_queue: queue.Queue | None = None
_queue_lock = threading.Lock()


def _handover() -> queue.Queue:
    """This process's queue of events for the notifier, and the thread that empties it."""
    global _queue
    with _queue_lock:
        if _queue is None:
            _queue = queue.Queue()
            threading.Thread(
                target=_hand_over, args=(_queue,), name="notify-handover", daemon=True
            ).start()
        return _queue


def _hand_over(events: queue.Queue) -> None:
    import ray

    from raydock import names

    while True:
        kind, user_id, fields, event_id, deadline = events.get()
        while True:
            try:
                notifier = ray.get_actor(names.NOTIFIER, namespace=names.NAMESPACE)
                ray.get(notifier.notify.remote(kind, user_id, fields, event_id), timeout=10)
                break
            except Exception as exc:  # no notifier, or it died: wait for its successor
                if time.monotonic() > deadline:
                    log.warning("notification %s not sent: no notifier answered (%r)", kind, exc)
                    break
                time.sleep(0.5)


# ------------------------------------------------------------------ the actor


class Notifier:
    """Delivers events (async Ray actor, one per platform). Looks up who to tell through
    the registry, records each delivery there, and retries each on its own."""

    def __init__(self, settings: dict[str, Any], registry: Any = None):
        self.settings = Settings(**settings)
        self.delays = backoff_delays(self.settings.notify_max_attempts)
        self._tasks: set[asyncio.Task] = set()
        self._seen: dict[str, None] = {}  # the last SEEN_EVENTS event ids, oldest first
        self._registry = registry  # unit tests hand one in; the platform's is looked up
        self._started = datetime.now(UTC).replace(tzinfo=None)
        # httpx logs every request's whole URL at INFO (httpcore its parts at DEBUG): a
        # webhook's URL may be its credential, so neither logs below WARNING here
        for name in ("httpx", "httpcore"):
            logger = logging.getLogger(name)
            logger.setLevel(max(logging.WARNING, logger.level))
        if registry is None:  # a Ray actor: go on with what a notifier before it left pending
            import ray

            ray.get_runtime_context().current_actor.recover.remote()

    @property
    def registry(self):
        if self._registry is not None:
            return self._registry
        import ray

        from raydock import names

        return ray.get_actor(names.REGISTRY, namespace=names.NAMESPACE)

    async def ping(self) -> bool:
        return True

    async def recover(self) -> int:
        """Deliveries that a notifier before this one left pending go on from their next
        attempt (same delivery id: receivers deduplicate by it); one whose email or webhook
        is no longer configured ends failed. Returns how many go on."""
        try:
            left = await self.registry.pending_deliveries.remote(self._started)
        except Exception as exc:
            log.warning("cannot resume the deliveries left pending: %r", exc)
            return 0
        resumed = 0
        for d in left:
            found = await self._resolve(d["channel"], d["target"], d["event"])
            if found is None:
                await self._record(d["deliveryId"], "failed", d["attempts"], TARGET_GONE)
                continue
            target, secret = found
            self._spawn(
                self._deliver(
                    d["event"], d["channel"], target, secret, d["deliveryId"], d["attempts"]
                )
            )
            resumed += 1
        return resumed

    async def _resolve(
        self, channel: str, shown: str, event: dict[str, Any]
    ) -> tuple[str, str] | None:
        """Where a resumed delivery goes, and what signs it ("" for email and unsigned
        webhooks): the place the event would go now (`_targets`) that its record names (a
        webhook's URL is recorded masked, `display_target`); None when that is no longer
        there."""
        try:
            found = await self.registry.notification_targets.remote(
                event.get("userId"), event.get("data", {}).get("keyId")
            )
        except Exception as exc:  # as _dispatch: the platform's own targets still count
            log.warning("cannot look up the recipients of a resumed delivery: %r", exc)
            found = {}
        for c, t, secret in self._targets(found):
            if c == channel and display_target(t) == shown:
                return t, secret
        return None

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def notify(
        self, kind: str, user_id: str | None, fields: dict[str, Any], event_id: str | None = None
    ) -> None:
        """Start delivering an event; returns at once. An `event_id` handed over before (its
        answer was lost, and the hand-over tried again) is not delivered twice."""
        if event_id is not None:
            if event_id in self._seen:
                return
            self._seen[event_id] = None
            while len(self._seen) > SEEN_EVENTS:
                self._seen.pop(next(iter(self._seen)))
        try:
            event = new_event(kind, user_id, fields, event_id)
        except ValueError as exc:
            log.warning("notification dropped: %s", exc)
            return
        self._spawn(self._dispatch(event))

    async def pending(self) -> int:
        """Deliveries still running (tests wait for none)."""
        return len(self._tasks)

    def _targets(self, found: dict[str, Any]) -> list[tuple[str, str, str]]:
        """(channel, target, secret) for each place the event goes."""
        s = self.settings
        out: list[tuple[str, str, str]] = []
        if s.smtp_host:
            for addr in dict.fromkeys([found.get("email") or "", *addresses(s.notify_emails)]):
                if addr:
                    out.append(("email", addr, ""))
        hook = found.get("webhook")
        if hook:
            out.append(("webhook", hook["url"], hook["secret"]))
        if s.webhook_url and not (hook and hook["url"] == s.webhook_url):
            out.append(("webhook", s.webhook_url, s.webhook_secret))
        return out

    async def _dispatch(self, event: dict[str, Any]) -> None:
        data = event["data"]
        try:
            found = await self.registry.notification_targets.remote(
                event["userId"], data.get("keyId")
            )
        except Exception as exc:
            log.warning("notification %s: cannot look up its recipients: %r", event["id"], exc)
            found = {}
        event["userId"] = found.get("userId", event["userId"])
        for name, value in (found.get("fields") or {}).items():
            data.setdefault(name, value)
        for channel, target, secret in self._targets(found):
            try:
                delivery = await self.registry.record_delivery.remote(event, channel, target)
            except Exception as exc:
                log.warning("notification %s: cannot record a delivery: %r", event["id"], exc)
                delivery = {"deliveryId": f"nd-{uuid.uuid4()}", "recorded": False}
            self._spawn(self._deliver(event, channel, target, secret, delivery["deliveryId"]))

    async def _deliver(
        self,
        event: dict[str, Any],
        channel: str,
        target: str,
        secret: str,
        delivery_id: str,
        done: int = 0,
    ) -> None:
        """Attempt the delivery until it succeeds or has had every attempt (`done` of them
        were made by a notifier before this one)."""
        attempts = max(len(self.delays) + 1, done + 1)  # at least one more after a restart
        for attempt in range(done + 1, attempts + 1):
            try:
                if channel == "email":
                    await asyncio.to_thread(self._send_email, event, target, delivery_id)
                else:
                    await self._post_webhook(event, target, secret, delivery_id)
            except Exception as exc:
                error = describe_failure(exc)
                if channel == "webhook":  # recorded and logged: never the URL itself
                    error = scrub(error, target)
                error = error[:500]  # after scrubbing: a URL cut short would escape it
                last = attempt == attempts
                await self._record(delivery_id, "failed" if last else "pending", attempt, error)
                if last:
                    log.warning(
                        "%s delivery %s of %s failed %d times: %s",
                        channel,
                        delivery_id,
                        event["kind"],
                        attempt,
                        error,
                    )
                    return
                await asyncio.sleep(self.delays[attempt - 1])
            else:
                await self._record(delivery_id, "delivered", attempt, None)
                return

    async def _record(self, delivery_id: str, status: str, attempts: int, error: str | None):
        try:
            await self.registry.update_delivery.remote(delivery_id, status, attempts, error)
        except Exception as exc:  # the registry restarting: the delivery itself goes on
            log.warning("cannot record delivery %s: %r", delivery_id, exc)

    def _send_email(self, event: dict[str, Any], to: str, delivery_id: str) -> None:
        s = self.settings
        msg = email_message(event, s.smtp_from, to, delivery_id)
        tls = ssl.create_default_context()
        if s.smtp_ssl:
            session = smtplib.SMTP_SSL(s.smtp_host, s.smtp_port, timeout=TIMEOUT_S, context=tls)
        else:
            session = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=TIMEOUT_S)
        with session as smtp:
            if s.smtp_starttls and not s.smtp_ssl:
                smtp.starttls(context=tls)
            if s.smtp_username:
                smtp.login(s.smtp_username, s.smtp_password)
            smtp.send_message(msg)

    async def _post_webhook(
        self, event: dict[str, Any], url: str, secret: str, delivery_id: str
    ) -> None:
        import httpx

        body = webhook_body(event)
        headers = webhook_headers(event, delivery_id, secret, body)
        target, extensions = httpx.URL(url), {}
        if url != self.settings.webhook_url:  # a user's: to the address checked, by name
            allowed = self.settings.webhook_allowed_networks
            address = await asyncio.to_thread(webhook_address, url, allowed)
            headers["Host"] = target.netloc.decode()
            extensions["sni_hostname"] = target.host  # TLS: the name's certificate
            target = target.copy_with(host=address)
        # The whole attempt has TIMEOUT_S (httpx's timeout bounds each read: a receiver that
        # trickles its answer held a delivery forever), and the answer's body is never read
        # (a huge one filled the notifier's memory): its status says it all.
        try:
            async with (
                asyncio.timeout(TIMEOUT_S),
                httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False) as client,
                client.stream(
                    "POST", target, content=body, headers=headers, extensions=extensions
                ) as r,
            ):
                status = r.status_code
        except TimeoutError:
            raise WebhookRefused(f"no answer within {TIMEOUT_S:g} s") from None
        if not 200 <= status < 300:  # the status only: the body stays the receiver's
            raise WebhookRefused(f"HTTP {status}")


class WebhookRefused(Exception):
    """The receiver answered, but not with a 2xx, or not within TIMEOUT_S."""
