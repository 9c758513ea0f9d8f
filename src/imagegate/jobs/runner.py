"""Jobs: paid generations delivered in the background, recorded so that nothing paid is lost.

Submitting runs ``ImageService.open`` in the request (validate, price, admit, reserve and verify the
payment: a 4xx/503 there costs nothing), records the job, and hands the ``OpenGeneration`` to a
background delivery (``ImageService.deliver``) whose progress becomes the job's events. The payment
is the idempotency key: resending it returns the job it is paying for (or paid for). It is settled
only after the images are stored; a failed, cancelled or expired job gives it back unspent.

Each job is owned by one process at a time (``store``'s claim and lease). The owner renews its
leases; a process that finds a lapsed lease (its owner died) takes the job over and recovers it from
the ledger: a payment never settled is given back and verified again for a new render, one being
settled is left to reconciliation and then delivered, one settled is delivered.

Drain hook: every background delivery is started by ``_start`` and tracked in ``_deliveries``.
``stop_accepting`` refuses new submits, ``wait_idle`` awaits the deliveries in flight, ``aclose``
cuts the ones still rendering (their payments are given back, the jobs go back to the queue for the
next start) and waits for the ones already settling.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils.exceptions import ValidationError as EthValidationError
from sqlalchemy.exc import IntegrityError

from imagegate.config import Settings, WebhooksSettings
from imagegate.errors import (
    Conflict,
    Forbidden,
    GenerationTimedOut,
    ImagegateError,
    InternalError,
    JobExpired,
    JobNotCancellable,
    ModelBusy,
    ModelUnavailable,
    NotFound,
    PaymentRequired,
    PaymentUnavailable,
    ServerDraining,
    ServiceUnavailable,
    SettlementFailed,
    SettlementPending,
)
from imagegate.jobs.events import (
    PROGRESS,
    QUEUED,
    RUNNING,
    SETTLING,
    STEP_EVENTS,
    SUCCEEDED,
    EventHub,
    EventRecorder,
    StreamHooks,
    job_stream,
)
from imagegate.jobs.store import (
    JobRecord,
    JobStatus,
    JobStore,
    NewEvent,
    StoredEvent,
    now_utc,
)
from imagegate.jobs.webhooks import WebhookDispatcher
from imagegate.ledger import GenerationStatus, PaymentRecord, PaymentStatus, SqlLedger
from imagegate.payments.base import InFlight, Payment, PaymentContext, Replay
from imagegate.service import SETTLE_MARGIN_S, ImageService, OpenGeneration
from imagegate.types import PaymentReceipt

log = logging.getLogger(__name__)

JOB_ID_PREFIX = "job_"
# The text a payer signs (EIP-191 personal_sign) to cancel a job without its cancel token.
CANCEL_MESSAGE = "Cancel imagegate job {job_id}"
# A resent payment whose job is being recorded right now: how long to wait for the job row.
IN_FLIGHT_JOB_WAIT_S = 5.0
# How long a cancel waits for the owning process (maybe another replica) to stop the job.
CANCEL_WAIT_S = 10.0
# Deliveries already settling at shutdown are waited for this long (they are seconds from done).
SETTLING_SHUTDOWN_WAIT_S = 90.0
# Webhooks for queue and step events: at most one per this many seconds per job (the final one always).
WEBHOOK_PROGRESS_INTERVAL_S = 1.0
RETRY_AFTER_BUSY_S = 5
PAYMENT_REUSED = "This job's payment was released and then used for another request; nothing was charged for this job."

ContextFactory = Callable[[Mapping[str, str], str], PaymentContext]


@dataclass(frozen=True)
class JobsOptions:
    """What the runner needs from ``Settings`` (``[jobs]``, ``[webhooks]``)."""

    enabled: bool = True
    max_wait_s: float = 240.0
    max_prefer_wait_s: int = 60
    lease_s: float = 60.0
    poll_interval_s: float = 1.0
    sse_ping_s: float = 15.0
    request_stream_wait_s: float = 300.0
    events_retention_s: float = 86_400.0
    # Payments untouched this long are taken for abandoned by reconciliation: live jobs touch theirs.
    payment_stale_after_s: float = 900.0
    webhooks: WebhooksSettings = field(default_factory=WebhooksSettings)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobsOptions:
        jobs = settings.jobs
        return cls(enabled=jobs.enabled, max_wait_s=settings.job_max_wait_s(),
                   max_prefer_wait_s=jobs.max_prefer_wait_s, lease_s=jobs.lease_s,
                   poll_interval_s=jobs.poll_interval_s, sse_ping_s=jobs.sse_ping_s,
                   request_stream_wait_s=jobs.request_stream_wait_s, events_retention_s=jobs.events_retention_s,
                   payment_stale_after_s=settings.payments.stale_after_s, webhooks=settings.webhooks)

    @property
    def sweep_interval_s(self) -> float:
        return max(0.2, min(self.lease_s / 3, 5.0))


@dataclass(frozen=True)
class WebhookRequest:
    """The webhook a job was submitted with (validated, SSRF-checked)."""

    url: str
    events: frozenset[str]
    # The job's own whsec_ secret; None: the operator's.
    secret: str | None

    def record(self) -> dict[str, Any]:
        return {"url": self.url, "events": sorted(self.events), "secret": self.secret}


@dataclass(frozen=True)
class Submitted:
    job: JobRecord
    # Only when this request created the job: resends get the job without it (cancel by signature).
    cancel_token: str | None


class JobLeaseLost(Exception):
    """Another process took this job over (this one stalled past its lease): stop before settling."""


@dataclass(eq=False)
class _Delivery:
    recorder: EventRecorder
    task: asyncio.Task[None] | None = None
    # Until the render ends; after that cancelling would throw away paid work being settled.
    cancellable: bool = True
    # Why the task was cancelled: "cancelled" (the payer), "shutdown", "lease_lost".
    stop_reason: str | None = None

    def stop(self, reason: str) -> bool:
        if not self.cancellable or self.task is None or self.task.done():
            return False
        self.stop_reason = reason
        self.task.cancel()
        return True


class _FencedPayment(Payment):
    """The job's payment, not given back by a process that lost the job: its new owner decides."""

    def __init__(self, inner: Payment, delivery: _Delivery):
        self.inner = inner
        self.delivery = delivery
        self.key = inner.key
        self.settle_deadline = inner.settle_deadline

    async def begin_settlement(self) -> None:
        await self.inner.begin_settlement()

    async def settle(self) -> PaymentReceipt | None:
        return await self.inner.settle()

    async def record_settlement(self) -> None:
        await self.inner.record_settlement()

    async def release(self) -> None:
        if self.delivery.stop_reason != "lease_lost":
            await self.inner.release()

    async def bind(self, generation_id: str) -> None:
        await self.inner.bind(generation_id)

    async def keep_alive(self) -> None:
        await self.inner.keep_alive()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def cancel_message(job_id: str) -> str:
    return CANCEL_MESSAGE.format(job_id=job_id)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


PAYMENT_STATES = {
    PaymentStatus.RESERVED: "verified",
    PaymentStatus.SETTLING: "settling",
    PaymentStatus.PENDING: "pending",
    PaymentStatus.SETTLED: "settled",
    PaymentStatus.RELEASED: "released",
    PaymentStatus.FAILED: "failed",
}


def payment_view(job: JobRecord, payment: PaymentRecord | None) -> dict[str, Any] | None:
    if job.payment_key is None:
        return None
    if payment is None:
        return {"state": "unknown", "transaction": None}
    # A payment given back and then used again belongs to another request now: for this job it was released.
    mine = payment.generation_id == job.generation_id
    state = PAYMENT_STATES[payment.status] if mine else "released"
    return {
        "state": state,
        "amount": str(payment.amount),
        "asset": payment.asset,
        "network": payment.network,
        "payer": payment.payer,
        "transaction": payment.transaction if mine and payment.status is PaymentStatus.SETTLED else None,
    }


def job_object(job: JobRecord, payment: PaymentRecord | None, latest: StoredEvent | None,
               *, cancel_token: str | None = None) -> dict[str, Any]:
    """The job as clients see it (GET /v1/jobs/{id}, the submit answer, terminal events, webhooks)."""
    base = job.base_url.rstrip("/")
    body: dict[str, Any] = {
        "id": job.id,
        "object": "job",
        "status": str(job.status),
        "model": job.model,
        "createdAt": _iso(job.created_at),
        "startedAt": _iso(job.started_at),
        "finishedAt": _iso(job.finished_at),
        "deadline": _iso(job.deadline_at),
        "payment": payment_view(job, payment),
        "result": job.result,
        "error": job.error,
        "links": {"self": f"{base}/v1/jobs/{job.id}", "events": f"{base}/v1/jobs/{job.id}/events",
                  "cancel": f"{base}/v1/jobs/{job.id}/cancel"},
    }
    if job.status is JobStatus.QUEUED:
        body["queuePosition"] = latest.data.get("queuePosition") if latest and latest.type == QUEUED else None
    if job.status is JobStatus.RUNNING:
        step = latest is not None and latest.type == PROGRESS
        body["progress"] = ({"step": latest.data.get("step"), "totalSteps": latest.data.get("totalSteps")}
                            if step and latest is not None else None)
    if job.webhook is not None:
        body["webhook"] = {"url": job.webhook["url"], "events": job.webhook["events"]}
    if cancel_token is not None:
        body["cancelToken"] = cancel_token
    return body


class JobRunner:
    def __init__(self, service: ImageService, store: JobStore, hub: EventHub, options: JobsOptions,
                 context_for: ContextFactory, webhooks: WebhookDispatcher | None = None,
                 instance_id: str | None = None):
        self.service = service
        self.store = store
        self.hub = hub
        self.options = options
        self.context_for = context_for
        self.webhooks = webhooks
        self.instance_id = instance_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._deliveries: dict[str, _Delivery] = {}
        # Jobs recorded and not yet delivering: recovery leaves them alone, a cancel waits for the start.
        self._starting: dict[str, asyncio.Event] = {}
        self._accepting = True
        self._closing = False
        self._maintainer: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_prune = 0.0
        self._last_payment_touch = 0.0

    # lifecycle

    async def start(self) -> None:
        if self.webhooks is not None:
            self.webhooks.start()
        self._maintainer = asyncio.create_task(self._maintain(), name="jobs-maintainer")

    def stop_accepting(self) -> None:
        """New submits get 503 from now on (the drain before a shutdown); deliveries go on."""
        self._accepting = False

    @property
    def in_flight(self) -> int:
        """Paid jobs being recorded or delivered by this process."""
        return len(self._deliveries) + len(self._starting)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Until no delivery is in flight in this process; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        self._accepting = False
        self._closing = True
        if self._maintainer is not None:
            self._maintainer.cancel()
            await asyncio.gather(self._maintainer, return_exceptions=True)
        for delivery in list(self._deliveries.values()):
            delivery.stop("shutdown")
        tasks = [d.task for d in self._deliveries.values() if d.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=SETTLING_SHUTDOWN_WAIT_S)
            for task in pending:
                log.error("a job delivery was still settling at shutdown; reconciliation will finish it")
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.webhooks is not None:
            await self.webhooks.aclose()

    # submit

    async def submit(self, body: dict[str, Any], context: PaymentContext, base_url: str,
                     webhook: WebhookRequest | None) -> Submitted:
        if not self._accepting or not self.options.enabled:
            raise ServiceUnavailable("This server is not taking new jobs right now; nothing was charged.",
                                     retry_after=RETRY_AFTER_BUSY_S)
        # A draining server takes no new paid work (503 SERVER_DRAINING before any payment step); the
        # submit itself counts as paid work in flight until the job is recorded and its delivery started.
        async with self.service.drain.paid_work():
            return await self._submit(body, context, base_url, webhook)

    async def _submit(self, body: dict[str, Any], context: PaymentContext, base_url: str,
                      webhook: WebhookRequest | None) -> Submitted:
        opened = await self.service.open(body, replace(context, wait_for_in_flight=False))
        if isinstance(opened, InFlight):
            return Submitted(await self._job_paying(opened.generation_id), None)
        if isinstance(opened, Replay):
            return Submitted(await self._job_paid(opened, base_url), None)
        token = secrets.token_urlsafe(32)
        job_id = JOB_ID_PREFIX + secrets.token_urlsafe(24)
        self._starting[job_id] = asyncio.Event()
        self._idle.clear()
        try:
            payer = await self._payer(opened.payment)
            job = await self.store.create(
                job_id=job_id, model=opened.spec.id, request=body,
                base_url=base_url, deadline_at=self._deadline(opened.payment, now_utc()),
                payment_context=_payment_context(context), payment_key=opened.payment.key, payer=payer,
                generation_id=opened.generation_id, cancel_token_hash=hash_token(token),
                webhook=webhook.record() if webhook else None, owner=self.instance_id, lease_s=self.options.lease_s,
            )
        except BaseException:
            self._starting.pop(job_id).set()
            self._note_idle()
            await self._abandon(opened, "the job could not be recorded")
            raise
        self._start(job, opened)
        return Submitted(job, token)

    def _deadline(self, payment: Payment, created: datetime) -> datetime:
        deadline = created + timedelta(seconds=self.options.max_wait_s)
        if payment.settle_deadline is not None:
            by_payment = datetime.fromtimestamp(payment.settle_deadline - SETTLE_MARGIN_S, tz=created.tzinfo)
            deadline = min(deadline, by_payment)
        return deadline

    async def _payer(self, payment: Payment) -> str | None:
        if payment.key is None:
            return None
        record = await self.service.ledger.payment(payment.key)
        return None if record is None else record.payer

    async def _abandon(self, opened: OpenGeneration, why: str) -> None:
        opened.admission.release()
        await opened.payment.release()
        await self.service.ledger.update_generation(opened.generation_id, GenerationStatus.FAILED, error=why)

    async def _job_paying(self, generation_id: str) -> JobRecord:
        """The job a resent payment is paying for right now (it may be a moment from being recorded)."""
        deadline = time.monotonic() + IN_FLIGHT_JOB_WAIT_S
        while True:
            job = await self.store.by_generation(generation_id)
            if job is not None:
                return job
            if time.monotonic() > deadline:
                raise PaymentUnavailable("This payment is paying for a synchronous request in progress; resend it "
                                         "without Prefer: respond-async to get its images.", retry_after=10)
            await asyncio.sleep(0.05)

    async def _job_paid(self, replay: Replay, base_url: str) -> JobRecord:
        """The job of a settled payment; one bought synchronously gets a finished job recorded for it."""
        job = await self.store.by_generation(replay.generation_id)
        if job is not None:
            return job
        outcome = await self.service.replay(replay, base_url)
        record = await self.service.ledger.generation(replay.generation_id)
        assert record is not None
        job_id = JOB_ID_PREFIX + secrets.token_urlsafe(24)
        try:
            job = await self.store.create(
                job_id=job_id, model=outcome.request.model, request=record.request, base_url=base_url,
                deadline_at=now_utc(), payment_context=None, payment_key=record.payment_key,
                payer=replay.receipt.payer, generation_id=replay.generation_id, cancel_token_hash=None,
                webhook=None, owner=None, lease_s=0, status=JobStatus.SUCCEEDED, result=outcome.body())
        except IntegrityError:
            existing = await self.store.by_generation(replay.generation_id)
            assert existing is not None
            return existing
        await self.store.append(job_stream(job.id), [NewEvent(SUCCEEDED, await self._terminal_data(job))])
        return job

    # delivery

    def _hooks(self, job: JobRecord) -> StreamHooks:
        dispatcher = self.webhooks if job.webhook else None
        return StreamHooks(
            on_running=lambda: (job.id, self.instance_id, {"status": JobStatus.RUNNING, "started_at": now_utc()}),
            deliveries=self._planner(job),
            after_write=(lambda _: dispatcher.poke()) if dispatcher is not None else None,
        )

    def _planner(self, job: JobRecord) -> Callable[[list[StoredEvent]], list[dict[str, Any]]] | None:
        webhook = job.webhook
        if webhook is None:
            return None
        wanted = set(webhook["events"])
        last_sent = [0.0]

        def plan(events: list[StoredEvent]) -> list[dict[str, Any]]:
            rows = []
            for event in events:
                if event.type not in wanted:
                    continue
                if event.type in STEP_EVENTS:
                    moment = time.monotonic()
                    if moment - last_sent[0] < WEBHOOK_PROGRESS_INTERVAL_S:
                        continue
                    last_sent[0] = moment
                payload = {"type": f"job.{event.type}", "timestamp": _iso(event.created_at), "data": event.data}
                rows.append({"id": f"msg_{event.id}", "job_id": job.id, "event_type": event.type,
                             "url": webhook["url"], "secret": webhook.get("secret"),
                             "payload": json.dumps(payload, separators=(",", ":"))})
            return rows

        return plan

    def _note_idle(self) -> None:
        if not self._deliveries and not self._starting:
            self._idle.set()

    def _start(self, job: JobRecord, opened: OpenGeneration) -> None:
        delivery = _Delivery(self.hub.recorder(job_stream(job.id), {"jobId": job.id}, self._hooks(job)))
        opened.payment = _FencedPayment(opened.payment, delivery)
        self._deliveries[job.id] = delivery
        self._idle.clear()
        started = self._starting.pop(job.id, None)
        if started is not None:
            started.set()
        delivery.task = asyncio.create_task(self._deliver(job, opened, delivery), name=f"job-{job.id}")

    async def _deliver(self, job: JobRecord, opened: OpenGeneration, delivery: _Delivery) -> None:
        recorder = delivery.recorder

        async def on_rendered() -> None:
            delivery.cancellable = False
            # The fence: settle only while this process still owns the job (it renews the lease here).
            if not await self.store.renew_one(job.id, self.instance_id, self.options.lease_s):
                delivery.stop_reason = "lease_lost"
                raise JobLeaseLost(job.id)
            await recorder.emit(SETTLING, {"status": "settling"},
                                job_update=(job.id, self.instance_id, {"status": JobStatus.SETTLING}))

        try:
            remaining = (job.deadline_at - now_utc()).total_seconds()
            # Paid work in flight for the drain: a shutdown waits for it, and cuts its render at the end of
            # the grace period (ServerDraining below).
            async with self.service.drain.tracked():
                outcome = await self.service.deliver(opened, job.base_url, progress=recorder.sink,
                                                     timeout_s=max(0.0, remaining), on_rendered=on_rendered)
        except ServerDraining:
            # Cut by the drain before settlement (deliver released the payment): back in line for the next
            # start, which verifies the payment again and renders.
            await self.store.update(job.id, self.instance_id, status=JobStatus.QUEUED, owner=None, lease_until=None)
        except asyncio.CancelledError:
            match delivery.stop_reason:
                case "cancelled":
                    await self._finish(job, JobStatus.CANCELLED, recorder)
                case "shutdown":
                    # Given back (deliver released the payment): the next start verifies it again and renders.
                    await self.store.update(job.id, self.instance_id, status=JobStatus.QUEUED, owner=None,
                                            lease_until=None)
                case "lease_lost":
                    log.error("job %s was taken over by another process while rendering here", job.id)
                case _:
                    raise
        except JobLeaseLost:
            log.error("job %s was taken over by another process; not settling it here", job.id)
        except GenerationTimedOut as exc:
            await self._finish(job, JobStatus.EXPIRED, recorder, error=_expired_error(exc))
        except SettlementPending:
            log.warning("job %s: settlement outcome unknown; reconciliation will finish it", job.id)
        except ImagegateError as exc:
            await self._finish(job, JobStatus.FAILED, recorder, error=exc.body())
        except Exception:
            log.exception("job %s failed", job.id)
            await self._finish(job, JobStatus.FAILED, recorder,
                               error=InternalError("Server error during generation; nothing was charged.").body())
        else:
            await self._finish(job, JobStatus.SUCCEEDED, recorder, result=outcome.body())
        finally:
            self._deliveries.pop(job.id, None)
            self._note_idle()
            await recorder.close()

    async def _finish(self, job: JobRecord, status: JobStatus, recorder: EventRecorder | None = None, *,
                      result: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> None:
        """The job's final status and its last event (the whole job object), in one transaction."""
        current = await self.store.get(job.id) or job
        final = replace(current, status=status, result=result, error=error, finished_at=now_utc())
        data = await self._terminal_data(final)
        recorder = recorder or self.hub.recorder(job_stream(job.id), {"jobId": job.id}, self._hooks(job))

        async def write() -> StoredEvent | None:
            return await self.store.finish(job.id, self.instance_id, status, NewEvent(str(status), data),
                                           result=result, error=error, deliveries=self._planner(job))

        if await recorder.locked(write) is None:
            log.warning("job %s: not finished as %s here, another process owns it now", job.id, status)

    async def _terminal_data(self, job: JobRecord) -> dict[str, Any]:
        payment = await self.service.ledger.payment(job.payment_key) if job.payment_key else None
        return {"jobId": job.id, "status": str(job.status), "job": job_object(job, payment, None)}

    # reading

    async def job(self, job_id: str) -> JobRecord:
        job = await self.store.get(job_id) if job_id.startswith(JOB_ID_PREFIX) else None
        if job is None:
            raise NotFound(f"No job {job_id!r}.")
        return job

    async def view(self, job: JobRecord, *, cancel_token: str | None = None) -> dict[str, Any]:
        payment = await self.service.ledger.payment(job.payment_key) if job.payment_key else None
        latest = None
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            latest = await self.store.latest_event(job_stream(job.id), [QUEUED, RUNNING, PROGRESS])
        body = job_object(job, payment, latest, cancel_token=cancel_token)
        if "webhook" in body:
            body["webhook"]["deliveries"] = await self.store.deliveries_of(job.id)
        return body

    async def receipt_headers(self, job: JobRecord) -> dict[str, str]:
        """The x402 payment-response header of a succeeded job (as the synchronous answer has it)."""
        if job.status is not JobStatus.SUCCEEDED or job.generation_id is None:
            return {}
        generation = await self.service.ledger.generation(job.generation_id)
        receipt = generation.receipt if generation else None
        return dict(receipt.get("headers") or {}) if receipt else {}

    async def wait_for(self, job_id: str, timeout_s: float) -> JobRecord:
        """The job once finished, or as it is when ``timeout_s`` runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = await self.job(job_id)
            left = deadline - time.monotonic()
            if job.status.terminal or left <= 0:
                return job
            await self.hub.wait(job_stream(job_id), min(left, self.options.poll_interval_s))

    async def is_finished(self, job_id: str) -> bool:
        job = await self.store.get(job_id)
        return job is None or job.status.terminal

    # cancel

    async def cancel(self, job_id: str, *, token: str | None, signature: str | None) -> JobRecord:
        job = await self.job(job_id)
        if not self._may_cancel(job, token, signature):
            raise Forbidden("Cancelling a job needs its cancelToken, or the paying address's EIP-191 signature of "
                            f"{cancel_message(job.id)!r}.", details={"message": cancel_message(job.id)})
        if job.status is JobStatus.CANCELLED:
            return job
        if job.status.terminal or job.status is JobStatus.SETTLING:
            raise JobNotCancellable(f"Job {job.id} is {job.status}: its images are rendered, so it can no longer "
                                    "be cancelled.", details={"status": str(job.status)})
        starting = self._starting.get(job.id)
        if starting is not None:  # submitted here a moment ago: its delivery is about to start
            await starting.wait()
        delivery = self._deliveries.get(job.id)
        if delivery is not None:
            if not delivery.stop("cancelled"):
                raise JobNotCancellable(f"Job {job.id} has finished rendering and is being settled; it can no "
                                        "longer be cancelled.", details={"status": "settling"})
            await asyncio.gather(*(t for t in [delivery.task] if t is not None), return_exceptions=True)
            return await self.job(job_id)
        if await self.store.claim(job.id, self.instance_id, self.options.lease_s):
            # Nobody renders it (its owner is gone, or it waits to be opened again here): stop it now.
            claimed = await self.job(job_id)
            if claimed.status is not JobStatus.SETTLING:
                await self._give_back(claimed)
                await self._finish(claimed, JobStatus.CANCELLED)
            return await self.job(job_id)
        # Another process renders it: ask it to stop, and wait a moment for the outcome.
        await self.store.request_cancel(job.id)
        return await self.wait_for(job.id, CANCEL_WAIT_S)

    def _may_cancel(self, job: JobRecord, token: str | None, signature: str | None) -> bool:
        if token and job.cancel_token_hash and hmac.compare_digest(hash_token(token), job.cancel_token_hash):
            return True
        if signature and job.payer:
            try:
                signer = Account.recover_message(encode_defunct(text=cancel_message(job.id)), signature=signature)
            except (ValueError, TypeError, EthValidationError):
                return False
            return bool(str(signer).lower() == job.payer.lower())
        return False

    async def _give_back(self, job: JobRecord) -> None:
        """Release the job's payment and end its generation, when neither got further than reserved."""
        ledger = self.service.ledger
        if job.payment_key is not None:
            payment = await ledger.payment(job.payment_key)
            if payment is not None and payment.generation_id == job.generation_id:
                await ledger.update_payment(job.payment_key, PaymentStatus.RELEASED, error="job ended before settling",
                                            expected=[PaymentStatus.RESERVED])
        if job.generation_id is not None:
            generation = await ledger.generation(job.generation_id)
            if generation is not None and generation.status in (GenerationStatus.RUNNING, GenerationStatus.SETTLING):
                await ledger.update_generation(job.generation_id, GenerationStatus.FAILED,
                                               error="its job ended before settling")

    # recovery

    async def _maintain(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                # Logged and retried next round: one failed round must not end recovery for good.
                log.exception("job maintenance round failed")
            await asyncio.sleep(self.options.sweep_interval_s)

    async def sweep(self) -> None:
        """Renew this process's leases, stop what was cancelled elsewhere, recover what nobody runs."""
        held = await self.store.renew(self.instance_id, self.options.lease_s)
        held_ids = {job.id for job in held}
        for job_id, delivery in list(self._deliveries.items()):
            if job_id not in held_ids and delivery.cancellable:
                current = await self.store.get(job_id)
                if current is not None and not current.status.terminal and current.owner != self.instance_id:
                    log.error("lost the lease of job %s to %s; stopping its render", job_id, current.owner)
                    delivery.stop("lease_lost")
        await self._touch_payments(held)
        for job in held:
            if job.id in self._starting:
                continue
            running = self._deliveries.get(job.id)
            if running is not None:
                if job.cancel_requested:
                    running.stop("cancelled")
                continue
            await self._recover_safely(job)
        for job in await self.store.claimable(self.instance_id):
            if self._closing:
                return
            if await self.store.claim(job.id, self.instance_id, self.options.lease_s):
                claimed = await self.store.get(job.id)
                if claimed is not None:
                    log.info("took over job %s (owner %s gone)", job.id, job.owner)
                    await self._recover_safely(claimed)
        await self._prune()

    async def _touch_payments(self, held: list[JobRecord]) -> None:
        """Keep live jobs' payments from looking abandoned to reconciliation (``stale_after_s``)."""
        now = time.monotonic()
        if now - self._last_payment_touch < self.options.payment_stale_after_s / 4:
            return
        self._last_payment_touch = now
        for job in held:
            if job.payment_key is not None and job.status is not JobStatus.SETTLING:
                await self.service.ledger.update_payment(job.payment_key, PaymentStatus.RESERVED,
                                                         expected=[PaymentStatus.RESERVED])

    async def _prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < 300:
            return
        self._last_prune = now
        cutoff = now_utc() - timedelta(seconds=self.options.events_retention_s)
        await self.store.prune_events(cutoff, step_types=[*STEP_EVENTS, RUNNING])

    async def _recover_safely(self, job: JobRecord) -> None:
        try:
            await self.recover(job)
        except Exception:
            log.exception("recovery of job %s failed; retrying next round", job.id)

    async def recover(self, job: JobRecord) -> None:
        """Bring a job this process owns, and nothing here runs, to its next step."""
        payment = await self.service.ledger.payment(job.payment_key) if job.payment_key else None
        mine = payment is not None and payment.generation_id == job.generation_id
        if job.status is JobStatus.SETTLING or (mine and payment is not None and payment.status in (
                PaymentStatus.SETTLING, PaymentStatus.PENDING, PaymentStatus.SETTLED)):
            await self._recover_settlement(job, payment if mine else None)
            return
        if job.cancel_requested:
            await self._give_back(job)
            await self._finish(job, JobStatus.CANCELLED)
            return
        if now_utc() >= job.deadline_at:
            await self._give_back(job)
            await self._finish(job, JobStatus.EXPIRED, error=_expired_error(None))
            return
        if mine and payment is not None and payment.status is PaymentStatus.FAILED:
            await self._finish(job, JobStatus.FAILED,
                               error=SettlementFailed("The payment was refused at settlement.").body())
            return
        # Never settled: whatever the previous owner did is void; verify the payment again and render.
        await self._give_back(job)
        await self._reopen(job)

    async def _recover_settlement(self, job: JobRecord, payment: PaymentRecord | None) -> None:
        if job.status is not JobStatus.SETTLING:
            await self.store.update(job.id, self.instance_id, status=JobStatus.SETTLING)
        if payment is None or job.payment_key is None or job.generation_id is None:
            await self._finish(job, JobStatus.FAILED, error=Conflict(PAYMENT_REUSED).body())
            return
        if payment.status is PaymentStatus.SETTLED:
            outcome = await self.service.payments.outcome(job.payment_key)
            if outcome is None or not outcome.settled:
                return
            delivered = await self.service.replay(Replay(job.generation_id, outcome.receipt), job.base_url)
            await self._finish(job, JobStatus.SUCCEEDED, result=delivered.body())
        elif payment.status in (PaymentStatus.FAILED, PaymentStatus.RELEASED):
            await self._finish(job, JobStatus.FAILED, error=SettlementFailed(
                "Settlement did not happen; nothing was charged and the images were withheld.").body())
        elif payment.status is PaymentStatus.RESERVED:
            # Its owner died between storing the images and settling: nothing was charged; render again.
            await self._give_back(job)
            await self._reopen(job)
        # SETTLING / PENDING: reconciliation is finding out on chain; look again next round.

    async def _reopen(self, job: JobRecord) -> None:
        stored = job.payment_context or {}
        context = replace(self.context_for(stored.get("headers", {}), stored.get("resourceUrl", "")),
                          wait_for_in_flight=False)
        try:
            opened = await self.service.open(job.request, context)
        except (ModelBusy, ModelUnavailable, PaymentUnavailable) as exc:
            log.info("job %s waits to be reopened: %s", job.id, exc.message)
            return
        except PaymentRequired as exc:
            payment = await self.service.ledger.payment(job.payment_key) if job.payment_key else None
            expired = payment is not None and payment.valid_before < time.time() + SETTLE_MARGIN_S
            await self._finish(job, JobStatus.EXPIRED if expired else JobStatus.FAILED,
                               error=_expired_error(None) if expired else exc.body())
            return
        except ImagegateError as exc:
            await self._finish(job, JobStatus.FAILED, error=exc.body())
            return
        if isinstance(opened, InFlight | Replay):
            await self._finish(job, JobStatus.FAILED, error=Conflict(PAYMENT_REUSED).body())
            return
        try:
            if not await self.store.update(job.id, self.instance_id, generation_id=opened.generation_id,
                                           status=JobStatus.QUEUED):
                raise JobLeaseLost(job.id)
        except BaseException:
            await self._abandon(opened, "the job was taken over while being reopened")
            raise
        log.info("job %s reopened as generation %s", job.id, opened.generation_id)
        refreshed = await self.store.get(job.id)
        assert refreshed is not None
        self._start(refreshed, opened)


def _expired_error(exc: GenerationTimedOut | None) -> dict[str, Any]:
    return JobExpired("The job could not finish within its time (its wait limit or its payment's validity); it "
                      "was stopped and nothing was charged. The same payment can be sent again while it is valid.",
                      details=exc.details if exc else None).body()


def _payment_context(context: PaymentContext) -> dict[str, Any]:
    headers = {name: context.headers[name] for name in ("payment-signature", "x-payment") if name in context.headers}
    return {"headers": headers, "resourceUrl": context.resource_url}


def build_job_runner(service: ImageService, options: JobsOptions, context_for: ContextFactory) -> JobRunner:
    """Jobs keep their tables in the ledger's database, through the ledger's own connection pool."""
    if not isinstance(service.ledger, SqlLedger):
        raise TypeError("jobs need the SQL ledger (their tables live in its database)")
    if not isinstance(service.ledger, SqlLedger):
        raise TypeError("jobs keep their tables in the ledger's SQL database; this ledger is not one")
    store = JobStore(service.ledger)
    hub = EventHub(store, poll_interval_s=options.poll_interval_s)
    webhooks = WebhookDispatcher(store, options.webhooks, poll_interval_s=options.poll_interval_s)
    return JobRunner(service, store, hub, options, context_for, webhooks)
