"""The HTTP side of jobs and event streams: ``Prefer`` headers, webhook fields, SSE responses,
and progress streams for synchronous requests that name themselves with ``X-Request-ID``."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

from imagegate.config import WebhooksSettings
from imagegate.errors import ImagegateError, InvalidParameter, PaymentRequired
from imagegate.jobs.events import (
    CANCELLED,
    EXPIRED,
    FAILED,
    PROGRESS,
    QUEUED,
    RETRY_MS,
    RUNNING,
    SETTLING,
    SUCCEEDED,
    EventHub,
    EventRecorder,
    request_stream,
)
from imagegate.jobs.runner import WebhookRequest
from imagegate.jobs.store import StoredEvent
from imagegate.jobs.webhooks import parse_secret, resolve_target
from imagegate.workers.base import RenderProgress

WEBHOOK_FIELDS = ("webhookUrl", "webhookEvents", "webhookSecret")
WEBHOOK_EVENTS = frozenset({QUEUED, RUNNING, PROGRESS, SETTLING, SUCCEEDED, FAILED, CANCELLED, EXPIRED})
# Shorthand for every way a job ends (the default).
COMPLETED = "completed"
COMPLETED_EVENTS = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED})
MAX_WEBHOOK_URL = 2048
# Long enough to be unguessable when the client draws it at random (a UUID is 36 characters).
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{16,128}$")


@dataclass(frozen=True)
class Preference:
    """What a ``Prefer`` header asks of a generation (RFC 7240)."""

    respond_async: bool = False
    # Seconds to wait for the job before answering with it (capped); None: not asked.
    wait_s: int | None = None

    @property
    def asynchronous(self) -> bool:
        return self.respond_async or self.wait_s is not None

    @property
    def wait_for_s(self) -> int:
        return self.wait_s or 0

    def applied(self) -> str:
        applied = ["respond-async"] if self.respond_async else []
        if self.wait_s is not None:
            applied.append(f"wait={self.wait_s}")
        return ", ".join(applied)


def parse_prefer(values: list[str], max_wait_s: int) -> Preference:
    """``respond-async`` and ``wait=N`` out of any number of Prefer headers; other preferences are
    ignored, as RFC 7240 asks. Parsed by hand: the grammar is one line and no maintained library
    covers it."""
    respond_async = False
    wait_s: int | None = None
    for value in values:
        for token in value.split(","):
            name, _, argument = token.split(";", 1)[0].strip().partition("=")
            name = name.strip().lower()
            argument = argument.strip().strip('"')
            if name == "respond-async":
                respond_async = True
            elif name == "wait" and argument.isdigit():
                wait_s = min(int(argument), max_wait_s)
    return Preference(respond_async, wait_s)


def split_webhook_fields(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The generation body and the webhook fields, apart."""
    webhook = {name: body[name] for name in WEBHOOK_FIELDS if name in body}
    return {k: v for k, v in body.items() if k not in WEBHOOK_FIELDS}, webhook


async def parse_webhook(fields: dict[str, Any], settings: WebhooksSettings,
                        operator_secret: bytes | None) -> WebhookRequest | None:
    """Validate the webhook fields (before any payment step: a 400 here costs nothing)."""
    if not any(fields.get(name) is not None for name in WEBHOOK_FIELDS):
        return None
    url = fields.get("webhookUrl")
    if not isinstance(url, str) or not url or len(url) > MAX_WEBHOOK_URL:
        raise InvalidParameter(f"webhookUrl must be a URL of at most {MAX_WEBHOOK_URL} characters.",
                               field="webhookUrl")
    events = _webhook_events(fields.get("webhookEvents"))
    secret = fields.get("webhookSecret")
    if secret is not None:
        if not isinstance(secret, str):
            raise InvalidParameter("webhookSecret must be a string (whsec_...).", field="webhookSecret")
        parse_secret(secret, field="webhookSecret")
    elif operator_secret is None:
        raise InvalidParameter("This server has no webhook signing secret configured: send your own "
                               "webhookSecret (whsec_ + base64 of 24-64 random bytes).", field="webhookSecret")
    await resolve_target(url, settings)
    return WebhookRequest(url=url, events=events, secret=secret)


def _webhook_events(value: Any) -> frozenset[str]:
    if value is None:
        return COMPLETED_EVENTS
    allowed = ", ".join(sorted({*WEBHOOK_EVENTS, COMPLETED}))
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidParameter(f"webhookEvents must be a non-empty list of: {allowed}.", field="webhookEvents")
    events: set[str] = set()
    for name in value:
        if name == COMPLETED:
            events |= COMPLETED_EVENTS
        elif name in WEBHOOK_EVENTS:
            events.add(name)
        else:
            raise InvalidParameter(f"Unknown webhook event {name!r}; use {allowed}.", field="webhookEvents")
    return frozenset(events)


def last_event_id(headers: Mapping[str, str], query: Mapping[str, str]) -> int:
    """Where a reconnecting client resumes: ``Last-Event-ID`` (or ``?lastEventId=``), else the start."""
    raw = headers.get("last-event-id") or query.get("lastEventId") or ""
    raw = raw.strip()
    if not raw:
        return 0
    if not raw.isdigit():
        raise InvalidParameter(f"Last-Event-ID must be an event id from this stream, not {raw!r}.",
                               field="Last-Event-ID")
    return int(raw)


def event_stream_response(events: AsyncIterator[StoredEvent], *, ping_s: float) -> EventSourceResponse:
    """Server-Sent Events: only durable events carry an ``id:`` (resuming never skips one);
    sse-starlette adds the heartbeat comments and ``X-Accel-Buffering: no``."""

    async def frames() -> AsyncIterator[ServerSentEvent]:
        yield ServerSentEvent(retry=RETRY_MS)
        async for event in events:
            yield ServerSentEvent(data=json.dumps(event.data, separators=(",", ":")), event=event.type,
                                  id=str(event.id))

    return EventSourceResponse(frames(), ping=ping_s,
                               headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


class RequestProgress:
    """Events of one synchronous request, for ``GET /v1/requests/{id}/events``; inert without an id."""

    def __init__(self, recorder: EventRecorder | None):
        self._recorder = recorder

    @classmethod
    def of(cls, hub: EventHub | None, headers: Mapping[str, str]) -> RequestProgress:
        request_id = headers.get("x-request-id") or ""
        if hub is None or not REQUEST_ID.match(request_id):
            return cls(None)
        return cls(hub.recorder(request_stream(request_id), {"requestId": request_id}))

    def sink(self, progress: RenderProgress) -> None:
        if self._recorder is not None:
            self._recorder.sink(progress)

    @property
    def active(self) -> bool:
        return self._recorder is not None

    async def succeeded(self, generation_id: str) -> None:
        if self._recorder is not None:
            await self._recorder.emit(SUCCEEDED, {"status": "succeeded", "generationId": generation_id})
            await self._recorder.close()

    async def failed(self, error: ImagegateError) -> None:
        # A 402 is the x402 handshake, not an outcome: the client pays and sends the same request again.
        if self._recorder is not None and not isinstance(error, PaymentRequired):
            await self._recorder.emit(FAILED, {"status": "failed", "error": error.body()})
            await self._recorder.close()
