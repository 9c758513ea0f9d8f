"""Per-client token buckets on the unpaid surface: 429 RATE_LIMITED with Retry-After.

Each limited route belongs to a class (``[limits.<class>]``: rate per second and burst). A request to
a paid route without a payment header is a "challenge" (it can only get the 402). A request carrying
a payment header is not limited like an anonymous one: it spends nothing while its payment is good,
and one token of ``refused_payment`` when it is refused (any 4xx answer), so a client sending bogus
payment headers runs dry there and gets 429 before its next header is even decoded.

The client is the TCP peer, or the address in X-Forwarded-For when the peer is a trusted proxy
(``ProxyHeadersMiddleware`` from uvicorn does that part, with ``[limits] trusted_proxies``). IPv6
clients are limited per /64, the block one subscriber usually gets.

Written by hand rather than with the ``limits`` package: the check runs on the challenge path, whose
target is the speed of a bare route, and a bucket here is one dict lookup and a few float operations
(no string keys built, no locks, no storage layer). Buckets live in the process; nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegate import metrics, openai_compat
from imagegate.config import LimitsSettings, RateLimit
from imagegate.errors import ImagegateError, RateLimited

CHALLENGE = "challenge"
REFUSED_PAYMENT = "refused_payment"
PAYMENT_HEADERS = frozenset({b"x-payment", b"payment-signature"})
ROUTE_TEMPLATE_KEY = "imagegate.route"


@dataclass(frozen=True)
class LimitedRoute:
    method: str
    template: str
    route_class: str
    # A paid route: without a payment header the request is a challenge; with one, see the module doc.
    paid: bool = False
    # The route's own error format (the OpenAI-shaped route answers OpenAI-shaped errors).
    error_body: Callable[[ImagegateError], dict[str, Any]] = ImagegateError.body


# The unpaid surface. A route added later joins a class with one line here.
LIMITED_ROUTES = (
    LimitedRoute("POST", "/v1/images/generate", CHALLENGE, paid=True),
    LimitedRoute("POST", openai_compat.PATH, CHALLENGE, paid=True, error_body=openai_compat.error_body),
    LimitedRoute("POST", "/v1/images/estimate", "estimate"),
    LimitedRoute("GET", "/v1/images/models", "models"),
    LimitedRoute("GET", "/images/{name}", "images"),
    LimitedRoute("GET", "/v1/jobs/{job_id}", "jobs"),
    LimitedRoute("POST", "/v1/jobs/{job_id}/cancel", "jobs"),
    LimitedRoute("GET", "/v1/jobs/{job_id}/events", "jobs"),
    LimitedRoute("GET", "/v1/requests/{request_id}/events", "jobs"),
    LimitedRoute("GET", "/", "manifest"),
    LimitedRoute("GET", "/openapi.json", "manifest"),
)


class TokenBucket:
    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, limit: RateLimit, now: float):
        self.rate = limit.rate
        self.burst = float(limit.burst)
        self.tokens = self.burst
        self.updated = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0: one is there now)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self, now: float) -> float:
        """Take a token and return 0, or return the seconds until one is there."""
        wait = self.wait(now)
        if not wait:
            self.tokens -= 1
        return wait

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.updated) * self.rate >= self.burst


class ClientBuckets:
    """Buckets per (client, class), bounded in number: full buckets are forgotten first."""

    def __init__(self, limits: dict[str, RateLimit], max_clients: int):
        self.limits = limits
        self.max_buckets = max_clients
        self.buckets: dict[tuple[str, str], TokenBucket] = {}

    def bucket(self, client: str, route_class: str, now: float) -> TokenBucket:
        key = (client, route_class)
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.max_buckets:
                self._forget(now)
            bucket = self.buckets[key] = TokenBucket(self.limits[route_class], now)
        return bucket

    def _forget(self, now: float) -> None:
        # A full bucket is what a new one would be: dropping it changes nothing for its client.
        self.buckets = {key: bucket for key, bucket in self.buckets.items() if not bucket.full(now)}
        if len(self.buckets) >= self.max_buckets:
            # Still too many clients draining at once: forget the oldest half.
            keep = list(self.buckets.items())[len(self.buckets) // 2:]
            self.buckets = dict(keep)


class ClientKeys:
    """The bucket key of a client address (its /64 for IPv6), or None when it is exempt; cached."""

    MAX_CACHED = 65_536

    def __init__(self, exempt: Iterable[str]):
        self.exempt = [ipaddress.ip_network(network, strict=False) for network in exempt]
        self.cache: dict[str, str | None] = {}

    def key(self, host: str) -> str | None:
        try:
            return self.cache[host]
        except KeyError:
            pass
        if len(self.cache) >= self.MAX_CACHED:
            self.cache.clear()
        key: str | None
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            key = host  # a unix socket path or a name: limited as one client
        else:
            if any(address in network for network in self.exempt):
                key = None
            elif address.version == 6:
                key = str(ipaddress.ip_network((address, 64), strict=False).network_address)
            else:
                key = host
        self.cache[host] = key
        return key


class _Matcher:
    def __init__(self, routes: Iterable[LimitedRoute]):
        self.exact: dict[tuple[str, str], LimitedRoute] = {}
        self.patterns: list[tuple[str, re.Pattern[str], LimitedRoute]] = []
        for route in routes:
            if "{" in route.template:
                regex, _, _ = compile_path(route.template)
                self.patterns.append((route.method, regex, route))
            else:
                self.exact[(route.method, route.template)] = route

    def match(self, method: str, path: str) -> LimitedRoute | None:
        route = self.exact.get((method, path))
        if route is not None:
            return route
        for route_method, regex, candidate in self.patterns:
            if route_method == method and regex.match(path):
                return candidate
        return None


class RateLimiter:
    """Pure ASGI middleware: the limited routes' requests spend tokens before they reach the app."""

    def __init__(self, app: ASGIApp, settings: LimitsSettings, routes: Iterable[LimitedRoute] = LIMITED_ROUTES,
                 clock: Callable[[], float] = time.monotonic):
        self.app = app
        routes = list(routes)
        classes = {route.route_class for route in routes} | {REFUSED_PAYMENT}
        self.limits = {name: getattr(settings, name) for name in classes}
        self.matcher = _Matcher(routes)
        self.buckets = ClientBuckets(self.limits, settings.max_clients)
        self.keys = ClientKeys(settings.exempt_clients)
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.matcher.match(scope["method"], scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        peer = scope.get("client")
        client = self.keys.key(peer[0] if peer else "")
        if client is None:
            await self.app(scope, receive, send)
            return
        now = self.clock()
        if route.paid and _has_payment(scope):
            refusals = self.buckets.bucket(client, REFUSED_PAYMENT, now)
            wait = refusals.wait(now)
            if wait:
                await self._refuse(scope, send, route, REFUSED_PAYMENT, wait)
                return
            await self.app(scope, receive, _spend_on_refusal(send, refusals, self.clock))
            return
        wait = self.buckets.bucket(client, route.route_class, now).take(now)
        if wait:
            await self._refuse(scope, send, route, route.route_class, wait)
            return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send, route: LimitedRoute, route_class: str, wait: float) -> None:
        scope[ROUTE_TEMPLATE_KEY] = route.template
        metrics.rate_limited(route_class)
        limit = self.limits[route_class]
        retry_after = max(1, math.ceil(wait))
        error = RateLimited(
            f"Too many requests of this kind from your address; retry in {retry_after} s.",
            retry_after=retry_after,
            details={"limit": route_class, "rate": limit.rate, "burst": limit.burst},
        )
        body = json.dumps(route.error_body(error), separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-store")]
        headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _has_payment(scope: Scope) -> bool:
    return any(name in PAYMENT_HEADERS for name, _ in scope["headers"])


def _spend_on_refusal(send: Send, bucket: TokenBucket, clock: Callable[[], float]) -> Send:
    async def send_and_count(message: Message) -> None:
        if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
            bucket.take(clock())
        await send(message)

    return send_and_count
