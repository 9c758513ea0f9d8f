"""The 402 challenge of a paid route, answered from memory for requests already seen.

A client's first request carries no payment and gets the x402 challenge: validation, pricing, the
model's availability and admission, then a dual v1/v2 challenge to render. All of that is a pure
function of the request body and the URL it was sent to, except availability and admission, which
can change from one request to the next. ``ChallengeCache`` (pure ASGI, inside the CORS middleware)
remembers the rendered 402 per (body, origin) and, for a body it has seen, checks only those two
before answering; a body it has not seen (or any request carrying a payment, or any that would not
get a 402) goes to the route unchanged. Without it the 402 costs several times a bare route: the
framework's routing and dependency handling, validation, two pydantic dumps and a JSON render.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegate.errors import ImagegateError
from imagegate.observe import ROUTE_TEMPLATE_KEY
from imagegate.payments.base import PaymentContext

PAYMENT_HEADERS = (b"x-payment", b"payment-signature")
# Bodies this large are not remembered (a generate body is a few hundred bytes).
MAX_REMEMBERED_BODY_BYTES = 4096
MAX_ENTRIES = 1024


class ChallengeSource(Protocol):
    """What the request flow tells the cache (``ImageService``)."""

    async def challenge(self, raw_body: bytes, context: PaymentContext) -> tuple[Any, ImagegateError] | None:
        """The 402 this body gets in this context and what to re-check before reusing it (a model), None
        when the route does not challenge (payments off); raises the error the route would answer instead."""
        ...

    async def check_challenge(self, model: Any) -> None:
        """Raises when the model could not take the request now (unavailable, busy)."""
        ...


@dataclass(frozen=True)
class _Entry:
    model: Any
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class ChallengeCache:
    def __init__(self, app: ASGIApp, *, path: str, source: Callable[[], ChallengeSource | None],
                 render: Callable[[ImagegateError], Response], context: Callable[[Scope], PaymentContext],
                 max_body_bytes: int):
        self.app = app
        self.path = path
        self._source = source
        self._render = render
        self._context = context
        self._max_body = min(max_body_bytes, MAX_REMEMBERED_BODY_BYTES)
        self._entries: dict[tuple[bytes, ...], _Entry] = {}
        # Set when the route turns out not to challenge at all (payments switched off).
        self._never_challenges = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST"
                or self._never_challenges):
            await self.app(scope, receive, send)
            return
        host = b""
        for name, value in scope["headers"]:
            if name in PAYMENT_HEADERS:
                await self.app(scope, receive, send)
                return
            if name == b"host":
                host = value
        source = self._source()
        body, finished = await self._read_body(receive)
        replay = _replaying(body, finished, receive)
        if source is None or not finished or len(body) > self._max_body:
            await self.app(scope, replay, send)
            return
        key = (body, host, scope["scheme"].encode(), scope.get("root_path", "").encode())
        entry = self._entries.get(key)
        try:
            if entry is None:
                found = await source.challenge(body, self._context(scope))
                if found is None:
                    self._never_challenges = True
                    await self.app(scope, replay, send)
                    return
                entry = self._remember(key, *found)
            else:
                await source.check_challenge(entry.model)
        except ImagegateError:
            # Not a 402 this time (invalid, unavailable, busy): the route answers it the usual way.
            await self.app(scope, replay, send)
            return
        scope[ROUTE_TEMPLATE_KEY] = self.path  # answered before routing: labelled by its route all the same
        await send({"type": "http.response.start", "status": entry.status, "headers": entry.headers})
        await send({"type": "http.response.body", "body": entry.body})

    def _remember(self, key: tuple[bytes, ...], model: Any, challenge: ImagegateError) -> _Entry:
        response = self._render(challenge)
        entry = _Entry(model, response.status_code, list(response.raw_headers), bytes(response.body))
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.pop(next(iter(self._entries)))  # the oldest
        self._entries[key] = entry
        return entry

    async def _read_body(self, receive: Receive) -> tuple[bytes, bool]:
        """The body as far as worth remembering, and whether that was all of it."""
        chunks: list[bytes] = []
        size = 0
        while size <= self._max_body:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: the route will see it
                return b"".join(chunks), False
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if not message.get("more_body", False):
                return b"".join(chunks), True
        return b"".join(chunks), False


def _replaying(body: bytes, finished: bool, receive: Receive) -> Receive:
    """A ``receive`` that hands the route the body already read, then the rest of the stream."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not finished}
        return await receive()

    return replay
