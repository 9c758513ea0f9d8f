"""Durable event streams: what a job (or a synchronous request that named itself) goes through.

A stream is ``job:<id>`` or ``request:<X-Request-ID>``. ``EventRecorder`` turns the engine's
``RenderProgress`` (queue position, running, step i of N) and the flow's own milestones into rows of
``job_events``, in order, from one writer per stream. ``EventHub.follow`` replays a stream from any
event id (the SSE ``Last-Event-ID``) and then waits for more: woken at once by writers in this
process, and polling the database for writers in other processes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from imagegate.jobs.store import DeliveryPlanner, JobStore, NewEvent, StoredEvent
from imagegate.workers.base import RenderProgress

log = logging.getLogger(__name__)

# Event types. Every event's data carries "status" (the job's or request's status after it).
QUEUED, RUNNING, PROGRESS, SETTLING = "queued", "running", "progress", "settling"
SUCCEEDED, FAILED, CANCELLED, EXPIRED = "succeeded", "failed", "cancelled", "expired"
TERMINAL_EVENTS = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED})
# Forgotten once old (``[jobs] events_retention_s``): a finished job keeps its milestones.
STEP_EVENTS = (QUEUED, PROGRESS)
# The SSE reconnection delay suggested to clients (milliseconds).
RETRY_MS = 2000


def job_stream(job_id: str) -> str:
    return f"job:{job_id}"


def request_stream(request_id: str) -> str:
    return f"request:{request_id}"


@dataclass(frozen=True)
class StreamHooks:
    """What writing events of a stream does besides storing them (jobs: status and webhooks)."""

    # (job id, owner, column values) to apply with the first "running" event.
    on_running: Callable[[], tuple[str, str, dict[str, Any]]] | None = None
    deliveries: DeliveryPlanner | None = None
    # Runs after events are stored (webhook dispatcher wake-up).
    after_write: Callable[[list[StoredEvent]], None] | None = None


class EventHub:
    """Where events are written and followed; one per process."""

    def __init__(self, store: JobStore, *, poll_interval_s: float):
        self.store = store
        self.poll_interval_s = poll_interval_s
        self._waiters: dict[str, set[asyncio.Event]] = {}

    def recorder(self, stream: str, base: dict[str, Any], hooks: StreamHooks | None = None) -> EventRecorder:
        return EventRecorder(self, stream, base, hooks or StreamHooks())

    def notify(self, stream: str) -> None:
        for waiter in self._waiters.get(stream, ()):
            waiter.set()

    async def wait(self, stream: str, timeout_s: float) -> None:
        """Until a writer in this process adds to ``stream``, or ``timeout_s`` (writers elsewhere)."""
        waiter = asyncio.Event()
        self._waiters.setdefault(stream, set()).add(waiter)
        try:
            await asyncio.wait_for(waiter.wait(), timeout=timeout_s)
        except TimeoutError:
            pass
        finally:
            waiters = self._waiters.get(stream)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[stream]

    async def follow(self, stream: str, after_id: int, *, idle_timeout_s: float | None = None,
                     is_over: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[StoredEvent]:
        """Events of ``stream`` after ``after_id``, as they come, up to a terminal one.

        ``idle_timeout_s``: give up after that long without any event. ``is_over``: asked when there is
        nothing new, to end a stream whose subject finished without its terminal event reaching us.
        """
        last_seen = time.monotonic()
        while True:
            events = await self.store.events_after(stream, after_id)
            for event in events:
                after_id = event.id
                yield event
                if event.type in TERMINAL_EVENTS:
                    return
            if events:
                last_seen = time.monotonic()
                continue
            if idle_timeout_s is not None and time.monotonic() - last_seen > idle_timeout_s:
                return
            if is_over is not None and await is_over():
                # One more read: the terminal event may have been written just now.
                if not await self.store.events_after(stream, after_id, limit=1):
                    return
                continue
            await self.wait(stream, self.poll_interval_s)


class EventRecorder:
    """The only writer of one stream while it lives: events go out in the order they happen.

    ``sink`` is the engine's ``ProgressSink`` (called on the event loop, must not block): it buffers
    and schedules a write. ``emit`` writes a milestone after everything buffered before it.
    """

    def __init__(self, hub: EventHub, stream: str, base: dict[str, Any], hooks: StreamHooks):
        self.hub = hub
        self.stream = stream
        self.base = base
        self.hooks = hooks
        self._pending: list[NewEvent] = []
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._last_queue_position: int | None = None
        self._running_written = False
        self.last_progress: RenderProgress | None = None

    def sink(self, progress: RenderProgress) -> None:
        self.last_progress = progress
        match progress.kind:
            case "queued":
                if progress.position == self._last_queue_position:
                    return
                self._last_queue_position = progress.position
                self._pending.append(NewEvent(QUEUED, {**self.base, "status": "queued",
                                                       "queuePosition": progress.position}))
            case "running":
                self._pending.append(NewEvent(RUNNING, {**self.base, "status": "running"}))
            case "step":
                self._pending.append(NewEvent(PROGRESS, {**self.base, "status": "running", "step": progress.step,
                                                         "totalSteps": progress.total_steps}))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self.flush())

    async def flush(self) -> None:
        async with self._lock:
            await self._write_pending()

    async def _write_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            job_update = None
            if self.hooks.on_running is not None and not self._running_written and any(
                    e.type in (RUNNING, PROGRESS) for e in batch):
                job_update = self.hooks.on_running()
                self._running_written = True
            try:
                stored = await self.hub.store.append(self.stream, batch, job_update=job_update,
                                                     deliveries=self.hooks.deliveries)
            except Exception:
                # Progress is informative: a failed write must not fail the render that reports it.
                log.exception("could not record %d event(s) of %s", len(batch), self.stream)
                continue
            self._written(stored)

    async def emit(self, event_type: str, data: dict[str, Any], *,
                   job_update: tuple[str, str, dict[str, Any]] | None = None) -> StoredEvent:
        """Write one milestone event after every buffered one (with the job change it marks)."""
        async with self._lock:
            await self._write_pending()
            stored = await self.hub.store.append(self.stream, [NewEvent(event_type, {**self.base, **data})],
                                                 job_update=job_update, deliveries=self.hooks.deliveries)
            self._written(stored)
            return stored[0]

    async def locked(self, write: Callable[[], Awaitable[StoredEvent | None]]) -> StoredEvent | None:
        """Run a write of this stream's events that goes through the store directly (a job's last event,
        written with its final status), in order with the others."""
        async with self._lock:
            await self._write_pending()
            stored = await write()
            if stored is not None:
                self._written([stored])
            return stored

    def _written(self, stored: list[StoredEvent]) -> None:
        self.hub.notify(self.stream)
        if self.hooks.after_write is not None and stored:
            self.hooks.after_write(stored)

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.flush()
