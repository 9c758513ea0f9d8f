"""Job events delivered to the client's ``webhookUrl``, signed per the Standard Webhooks specification.

Each delivery is a row written in the same transaction as the event it carries (an outbox), so an
event is delivered at least once even if the process dies right after; every attempt sends the same
``webhook-id`` and body, and a new ``webhook-timestamp`` and ``webhook-signature``. Attempts follow
the specification's example schedule with jitter; 2xx ends them, 410 ends them for that URL, and
429/502/503/504 may push the next one later (``Retry-After``). Any process may send a due delivery:
it claims the row first, so replicas do not send the same attempt twice.

Targets are checked against SSRF when the job is submitted and again before every attempt, and the
connection goes to the very address that was checked (no second DNS lookup a rebinding could change).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

from imagegate.config import WebhooksSettings
from imagegate.errors import InvalidParameter
from imagegate.jobs.store import DeliveryRecord, DeliveryStatus, JobStore, now_utc

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64
# Receivers may throttle with these; Retry-After then sets the next attempt, if later than the schedule's.
THROTTLING = frozenset({429, 502, 503, 504})
MAX_RETRY_AFTER_S = 86_400.0
USER_AGENT = "imagegate-webhooks/1"


class WebhookTargetRefused(InvalidParameter):
    """The URL may not be called: a bad scheme, or an address the SSRF guard forbids."""


def parse_secret(value: str, *, field: str) -> bytes:
    """``whsec_`` + base64 of 24 to 64 random bytes (the Standard Webhooks symmetric secret)."""
    if not value.startswith(SECRET_PREFIX):
        raise InvalidParameter(f"{field} must start with {SECRET_PREFIX!r} (a Standard Webhooks secret).", field=field)
    try:
        key = base64.b64decode(value.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidParameter(f"{field} is not {SECRET_PREFIX} followed by base64.", field=field) from exc
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise InvalidParameter(f"{field} must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes; it holds "
                               f"{len(key)}.", field=field)
    return key


def operator_secret(settings: WebhooksSettings) -> bytes | None:
    """The operator's signing key from ``secret_file`` or ``$secret_env``; None when neither is set."""
    value: str | None
    if settings.secret_file is not None:
        value = Path(settings.secret_file).read_text(encoding="utf-8").strip()
    else:
        value = os.environ.get(settings.secret_env)
    if not value:
        return None
    return parse_secret(value, field="[webhooks] secret")


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64(HMAC-SHA256(key, "id.timestamp.body")).

    Written out (twelve lines) rather than taken from the ``standardwebhooks`` package so that the
    tests' verification with that package checks an independent implementation.
    """
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_headers(key: bytes, message_id: str, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    moment = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(moment),
        "webhook-signature": sign(key, message_id, moment, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


@dataclass(frozen=True)
class ResolvedTarget:
    url: str
    host: str
    port: int
    scheme: str
    # Where to connect: the first address that passed the check.
    address: str


def _forbidden(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _forbidden(address.ipv4_mapped)
    for reason, flag in (("loopback", address.is_loopback), ("private", address.is_private),
                         ("link-local", address.is_link_local), ("multicast", address.is_multicast),
                         ("reserved", address.is_reserved), ("unspecified", address.is_unspecified)):
        if flag:
            return reason
    return None


def check_url_shape(url: str, settings: WebhooksSettings, *, field: str = "webhookUrl") -> None:
    parts = urlsplit(url)
    allowed = ("https", "http") if settings.allow_http else ("https",)
    if parts.scheme not in allowed:
        raise WebhookTargetRefused(f"{field} must be an {' or '.join(allowed)} URL.", field=field)
    if not parts.hostname:
        raise WebhookTargetRefused(f"{field} has no host.", field=field)
    if parts.username or parts.password:
        raise WebhookTargetRefused(f"{field} must not carry credentials; sign-check the deliveries instead.",
                                   field=field)


async def resolve_target(url: str, settings: WebhooksSettings, *, field: str = "webhookUrl") -> ResolvedTarget:
    """The target's address, once every address its host resolves to passed the SSRF guard."""
    check_url_shape(url, settings, field=field)
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookTargetRefused(f"{field} host {host!r} does not resolve: {exc}.", field=field) from exc
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise WebhookTargetRefused(f"{field} host {host!r} has no address.", field=field)
    if not settings.allow_private_targets:
        for address in addresses:
            reason = _forbidden(ipaddress.ip_address(address.split("%", 1)[0]))
            if reason is not None:
                raise WebhookTargetRefused(
                    f"{field} resolves to a {reason} address ({address}); webhooks go to public addresses only.",
                    field=field)
    return ResolvedTarget(url=url, host=host, port=port, scheme=parts.scheme, address=addresses[0])


def next_delay_s(attempts: int, schedule: Sequence[float], jitter: float, retry_after_s: float | None) -> float | None:
    """Seconds until the next attempt after ``attempts`` failed ones; None when the schedule is spent."""
    if attempts - 1 >= len(schedule):
        return None
    base = schedule[attempts - 1]
    delay = base * (1 + random.uniform(-jitter, jitter))
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, MAX_RETRY_AFTER_S))
    return delay


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class WebhookDispatcher:
    """Sends due deliveries from the outbox, in any process that runs one."""

    def __init__(self, store: JobStore, settings: WebhooksSettings, *, poll_interval_s: float):
        self.store = store
        self.settings = settings
        self.poll_interval_s = poll_interval_s
        self.secret = operator_secret(settings)
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._client = httpx.AsyncClient(timeout=settings.timeout_s, follow_redirects=False, trust_env=False)

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="webhook-dispatcher")

    def poke(self) -> None:
        """A delivery was just queued: look now rather than at the next poll."""
        self._wake.set()

    async def aclose(self) -> None:
        tasks = [t for t in (self._loop, *self._sending) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()

    async def _run(self) -> None:
        while True:
            try:
                for delivery in await self.store.due_deliveries(limit=self.settings.concurrency * 4):
                    if not await self.store.claim_delivery(delivery.id, lease_s=self.settings.timeout_s * 2 + 30):
                        continue
                    await self._slots.acquire()
                    task = asyncio.create_task(self._attempt(delivery))
                    self._sending.add(task)
                    task.add_done_callback(self._sent)
            except Exception:
                # Logged and retried at the next poll: a database hiccup must not end deliveries for good.
                log.exception("webhook dispatch round failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval_s)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._slots.release()

    async def _attempt(self, delivery: DeliveryRecord) -> None:
        if await self.store.url_gone(delivery.job_id, delivery.url):
            # A later event of a job whose receiver already answered 410: not sent at all.
            await self.store.record_attempt(delivery.id, status=DeliveryStatus.GONE, attempts=delivery.attempts,
                                            next_attempt_at=None, last_status=None, last_error="410 Gone earlier")
            return
        attempts = delivery.attempts + 1
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        try:
            status, retry_after = await self.send(delivery)
        except WebhookTargetRefused as exc:
            error = exc.message
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        if status is not None and 200 <= status < 300:
            await self.store.record_attempt(delivery.id, status=DeliveryStatus.DELIVERED, attempts=attempts,
                                            next_attempt_at=None, last_status=status, last_error=None)
            return
        if status == 410:
            log.info("webhook %s: %s answered 410 Gone, no more deliveries there", delivery.id, delivery.url)
            await self.store.record_attempt(delivery.id, status=DeliveryStatus.GONE, attempts=attempts,
                                            next_attempt_at=None, last_status=status, last_error="410 Gone")
            await self.store.give_up_url(delivery.job_id, delivery.url)
            return
        if status is not None:
            error = f"HTTP {status}"
        delay = next_delay_s(attempts, self.settings.retry_schedule_s, self.settings.jitter,
                             retry_after if status in THROTTLING else None)
        if delay is None:
            log.warning("webhook %s to %s failed %d times, giving up: %s", delivery.id, delivery.url, attempts, error)
            await self.store.record_attempt(delivery.id, status=DeliveryStatus.FAILED, attempts=attempts,
                                            next_attempt_at=None, last_status=status, last_error=error)
            return
        await self.store.record_attempt(delivery.id, status=DeliveryStatus.PENDING, attempts=attempts,
                                        next_attempt_at=now_utc() + timedelta(seconds=delay), last_status=status,
                                        last_error=error)

    async def send(self, delivery: DeliveryRecord) -> tuple[int, float | None]:
        """One attempt: the status code and any Retry-After (seconds)."""
        key = self.secret if delivery.secret is None else parse_secret(delivery.secret, field="webhookSecret")
        if key is None:
            raise WebhookTargetRefused("no webhook secret is configured any more ([webhooks] secret_env)")
        target = await resolve_target(delivery.url, self.settings)
        body = delivery.payload.encode()
        headers = signed_headers(key, delivery.id, body)
        # Connect to the address just checked; the Host header and TLS name stay the URL's own.
        parts = urlsplit(target.url)
        literal = f"[{target.address}]" if ":" in target.address else target.address
        netloc = f"{literal}:{target.port}"
        pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        host_header = target.host if parts.port is None else f"{target.host}:{parts.port}"
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        response = await self._client.post(pinned, content=body, headers={**headers, "host": host_header},
                                           extensions=extensions)
        return response.status_code, _retry_after(response)
