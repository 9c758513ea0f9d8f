"""Jobs, their events and their webhook deliveries, durably, in the ledger's database.

The three tables live on ``ledger.metadata`` beside generations and payments (SQLite by default,
PostgreSQL when configured) and are defined here only. Every change a process makes to a job it
does as the job's *owner*: a claim row (``owner``, ``lease_until``) taken with one conditional
UPDATE, renewed while the owner lives, and taken over by another process only once it has lapsed.
That is what makes a job render at most once per payment across restarts and replicas.

Events carry the database's own increasing id: it is the SSE ``id:`` a client resumes from. One
writer per stream (``events.EventRecorder``) keeps a stream's ids visible in order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    Text,
    and_,
    delete,
    insert,
    or_,
    select,
    update,
)

from imagegate.ledger import LedgerConnection, SqlLedger, metadata

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    # Past it the job is expired and its payment released (its wait limit, or its payment's validity).
    Column("deadline_at", DateTime(timezone=True), nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("model", String(200), nullable=False),
    # The body as sent (without the webhook fields): what a recovering process opens again.
    Column("request", Text, nullable=False),
    Column("base_url", Text, nullable=False),
    # {"headers": {name: value}, "resourceUrl": ...}: the x402 header, to verify the payment again on recovery.
    Column("payment_context", Text, nullable=True),
    Column("payment_key", String(200), nullable=True, index=True),
    Column("payer", String(64), nullable=True),
    Column("generation_id", String(36), nullable=True, unique=True),
    Column("cancel_token_hash", String(64), nullable=True),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("webhook", Text, nullable=True),
    Column("result", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("owner", String(120), nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
)

job_events = Table(
    "job_events",
    metadata,
    # BIGINT on PostgreSQL; on SQLite only INTEGER PRIMARY KEY increases by itself.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    # "job:<id>" or "request:<X-Request-ID>".
    Column("stream", String(200), nullable=False),
    Column("type", String(32), nullable=False),
    Column("data", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_job_events_stream_id", "stream", "id"),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    # The webhook-id header: the same on every attempt (receivers deduplicate on it).
    Column("id", String(160), primary_key=True),
    Column("job_id", String(64), nullable=False, index=True),
    Column("event_type", String(32), nullable=False),
    Column("url", Text, nullable=False),
    # The job's own secret; NULL: the operator's.
    Column("secret", Text, nullable=True),
    Column("payload", Text, nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("last_status", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

JOB_TABLES = (jobs, job_events, webhook_deliveries)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    # Rendered and stored; the payment is being settled (the images are delivered once it lands).
    SETTLING = "settling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED})
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SETTLING)


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # every attempt of the schedule failed
    GONE = "gone"  # the receiver answered 410: no more deliveries to that URL for the job


def utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every time stored here is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def now_utc() -> datetime:
    return datetime.now(UTC)


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _load(value: str | None) -> Any:
    return None if value is None else json.loads(value)


@dataclass(frozen=True)
class JobRecord:
    id: str
    status: JobStatus
    model: str
    request: dict[str, Any]
    base_url: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deadline_at: datetime
    payment_context: dict[str, Any] | None
    payment_key: str | None
    payer: str | None
    generation_id: str | None
    cancel_token_hash: str | None
    cancel_requested: bool
    webhook: dict[str, Any] | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    owner: str | None
    lease_until: datetime | None


@dataclass(frozen=True)
class StoredEvent:
    id: int
    stream: str
    type: str
    data: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class NewEvent:
    type: str
    data: dict[str, Any]


@dataclass(frozen=True)
class DeliveryRecord:
    id: str
    job_id: str
    event_type: str
    url: str
    secret: str | None
    payload: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime


# The webhook deliveries (rows of ``webhook_deliveries`` less their bookkeeping) that stored events cause.
DeliveryPlanner = Callable[[list[StoredEvent]], list[dict[str, Any]]]


def _job(row: Any) -> JobRecord:
    return JobRecord(
        id=row.id, status=JobStatus(row.status), model=row.model, request=json.loads(row.request),
        base_url=row.base_url, created_at=utc(row.created_at), updated_at=utc(row.updated_at),
        started_at=utc(row.started_at) if row.started_at else None,
        finished_at=utc(row.finished_at) if row.finished_at else None, deadline_at=utc(row.deadline_at),
        payment_context=_load(row.payment_context), payment_key=row.payment_key, payer=row.payer,
        generation_id=row.generation_id, cancel_token_hash=row.cancel_token_hash,
        cancel_requested=bool(row.cancel_requested), webhook=_load(row.webhook), result=_load(row.result),
        error=_load(row.error), owner=row.owner, lease_until=utc(row.lease_until) if row.lease_until else None,
    )


def _event(row: Any) -> StoredEvent:
    return StoredEvent(int(row.id), row.stream, row.type, json.loads(row.data), utc(row.created_at))


def _delivery(row: Any) -> DeliveryRecord:
    return DeliveryRecord(row.id, row.job_id, row.event_type, row.url, row.secret, row.payload,
                          DeliveryStatus(row.status), row.attempts, utc(row.next_attempt_at))


class JobStore:
    """SQLAlchemy Core statements over the ledger's connections (the same statements on SQLite and
    PostgreSQL): they share its write lock and pool, so a job's writes never wait on a ledger write of
    the same process inside the database."""

    def __init__(self, ledger: SqlLedger):
        self._db = ledger

    # jobs

    async def create(self, *, job_id: str, model: str, request: dict[str, Any], base_url: str,
                     deadline_at: datetime, payment_context: dict[str, Any] | None, payment_key: str | None,
                     payer: str | None, generation_id: str, cancel_token_hash: str | None,
                     webhook: dict[str, Any] | None, owner: str | None, lease_s: float,
                     status: JobStatus = JobStatus.QUEUED, result: dict[str, Any] | None = None) -> JobRecord:
        """Insert a job; ``IntegrityError`` when its generation already has one."""
        now = now_utc()
        values = dict(
            id=job_id, created_at=now, updated_at=now, deadline_at=deadline_at, status=status, model=model,
            request=_dump(request), base_url=base_url, payment_context=_dump(payment_context),
            payment_key=payment_key, payer=payer, generation_id=generation_id,
            cancel_token_hash=cancel_token_hash, cancel_requested=False, webhook=_dump(webhook),
            result=_dump(result), owner=owner, lease_until=now + timedelta(seconds=lease_s) if owner else None,
            finished_at=now if status.terminal else None,
        )
        async with self._db.transaction() as connection:
            await connection.execute(insert(jobs).values(**values))
        job = await self.get(job_id)
        assert job is not None
        return job

    async def get(self, job_id: str) -> JobRecord | None:
        async with self._db.connection() as connection:
            row = (await connection.execute(select(jobs).where(jobs.c.id == job_id))).first()
        return None if row is None else _job(row)

    async def by_generation(self, generation_id: str) -> JobRecord | None:
        async with self._db.connection() as connection:
            row = (await connection.execute(select(jobs).where(jobs.c.generation_id == generation_id))).first()
        return None if row is None else _job(row)

    async def update(self, job_id: str, by: str, **values: Any) -> bool:
        """Change a job owned by ``by`` (this process); False when it no longer is (or the job is finished)."""
        return await self._update_owned(job_id, by, values)

    async def _update_owned(self, job_id: str, owner: str, values: dict[str, Any],
                            connection: LedgerConnection | None = None) -> bool:
        values = {**values, "updated_at": now_utc()}
        for name in ("result", "error", "request", "payment_context", "webhook"):
            if name in values:
                values[name] = _dump(values[name])
        statement = (update(jobs)
                     .where(jobs.c.id == job_id, jobs.c.owner == owner, jobs.c.status.in_([str(s) for s in ACTIVE]))
                     .values(**values))
        if connection is not None:
            result = await connection.execute(statement)
        else:
            async with self._db.transaction() as own:
                result = await own.execute(statement)
        return bool(result.rowcount == 1)

    async def claim(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Take an active job whose owner is gone (its lease lapsed) or that has none; atomic."""
        now = now_utc()
        statement = (
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status.in_([str(s) for s in ACTIVE]),
                   or_(jobs.c.owner.is_(None), jobs.c.lease_until < now, jobs.c.owner == owner))
            .values(owner=owner, lease_until=now + timedelta(seconds=lease_s), updated_at=now)
        )
        async with self._db.transaction() as connection:
            result = await connection.execute(statement)
        return bool(result.rowcount == 1)

    async def claimable(self, owner: str, limit: int = 50) -> list[JobRecord]:
        """Active jobs nobody holds, oldest first."""
        now = now_utc()
        statement = (
            select(jobs)
            .where(jobs.c.status.in_([str(s) for s in ACTIVE]),
                   or_(jobs.c.owner.is_(None), and_(jobs.c.lease_until < now, jobs.c.owner != owner)))
            .order_by(jobs.c.created_at)
            .limit(limit)
        )
        async with self._db.connection() as connection:
            rows = (await connection.execute(statement)).all()
        return [_job(row) for row in rows]

    async def renew(self, owner: str, lease_s: float) -> list[JobRecord]:
        """Extend every lease this process holds; the jobs it still holds. A lapsed lease nobody took
        over is still this process's: taking one over changes ``owner``."""
        now = now_utc()
        active = [str(s) for s in ACTIVE]
        async with self._db.transaction() as connection:
            await connection.execute(
                update(jobs).where(jobs.c.owner == owner, jobs.c.status.in_(active))
                .values(lease_until=now + timedelta(seconds=lease_s)))
            rows = (await connection.execute(
                select(jobs).where(jobs.c.owner == owner, jobs.c.status.in_(active)))).all()
        return [_job(row) for row in rows]

    async def renew_one(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extend one lease if the job is still this process's (the fence before settling)."""
        now = now_utc()
        statement = (update(jobs)
                     .where(jobs.c.id == job_id, jobs.c.owner == owner, jobs.c.status.in_([str(s) for s in ACTIVE]))
                     .values(lease_until=now + timedelta(seconds=lease_s)))
        async with self._db.transaction() as connection:
            result = await connection.execute(statement)
        return bool(result.rowcount == 1)

    async def request_cancel(self, job_id: str) -> None:
        async with self._db.transaction() as connection:
            await connection.execute(update(jobs).where(jobs.c.id == job_id).values(cancel_requested=True))

    async def finish(self, job_id: str, owner: str, status: JobStatus, event: NewEvent, *,
                     result: dict[str, Any] | None = None, error: dict[str, Any] | None = None,
                     deliveries: DeliveryPlanner | None = None) -> StoredEvent | None:
        """End a job this process owns and append its last event, in one transaction; None if not owned."""
        now = now_utc()
        async with self._db.transaction() as connection:
            changed = await self._update_owned(job_id, owner, {
                "status": status, "finished_at": now, "owner": None, "lease_until": None,
                "result": result, "error": error}, connection)
            if not changed:
                return None
            stored = await self._insert_events(connection, f"job:{job_id}", [event], now)
            if deliveries is not None:
                await self._insert_deliveries(connection, deliveries(stored), now)
        return stored[0]

    # events

    async def append(self, stream: str, events: Sequence[NewEvent], *, job_update: tuple[str, str, dict[str, Any]]
                     | None = None, deliveries: DeliveryPlanner | None = None) -> list[StoredEvent]:
        """Append events (and the job change and webhook deliveries they cause) in one transaction."""
        now = now_utc()
        async with self._db.transaction() as connection:
            if job_update is not None:
                job_id, owner, values = job_update
                await self._update_owned(job_id, owner, values, connection)
            stored = await self._insert_events(connection, stream, events, now)
            if deliveries is not None:
                await self._insert_deliveries(connection, deliveries(stored), now)
        return stored

    async def _insert_events(self, connection: LedgerConnection, stream: str, events: Iterable[NewEvent],
                             now: datetime) -> list[StoredEvent]:
        stored = []
        for event in events:
            data = _dump(event.data)
            assert data is not None
            event_id = (await connection.execute(
                insert(job_events).values(stream=stream, type=event.type, data=data, created_at=now)
                .returning(job_events.c.id))).scalar_one()
            stored.append(StoredEvent(int(event_id), stream, event.type, event.data, now))
        return stored

    async def events_after(self, stream: str, after_id: int, limit: int = 500) -> list[StoredEvent]:
        statement = (select(job_events).where(job_events.c.stream == stream, job_events.c.id > after_id)
                     .order_by(job_events.c.id).limit(limit))
        async with self._db.connection() as connection:
            rows = (await connection.execute(statement)).all()
        return [_event(row) for row in rows]

    async def latest_event(self, stream: str, types: Sequence[str]) -> StoredEvent | None:
        statement = (select(job_events).where(job_events.c.stream == stream, job_events.c.type.in_(list(types)))
                     .order_by(job_events.c.id.desc()).limit(1))
        async with self._db.connection() as connection:
            row = (await connection.execute(statement)).first()
        return None if row is None else _event(row)

    async def prune_events(self, older_than: datetime, *, step_types: Sequence[str]) -> int:
        """Forget request-id streams and the step-by-step events of jobs, once old (not the job's story)."""
        statement = delete(job_events).where(
            job_events.c.created_at < older_than,
            or_(job_events.c.stream.like("request:%"), job_events.c.type.in_(list(step_types))),
        )
        async with self._db.transaction() as connection:
            result = await connection.execute(statement)
        return int(result.rowcount or 0)

    # webhook deliveries

    async def _insert_deliveries(self, connection: LedgerConnection, deliveries: Sequence[dict[str, Any]],
                                 now: datetime) -> None:
        for delivery in deliveries:
            await connection.execute(insert(webhook_deliveries).values(
                status=DeliveryStatus.PENDING, attempts=0, next_attempt_at=now, created_at=now, updated_at=now,
                **delivery))

    async def due_deliveries(self, limit: int) -> list[DeliveryRecord]:
        now = now_utc()
        statement = (
            select(webhook_deliveries)
            .where(webhook_deliveries.c.status == DeliveryStatus.PENDING, webhook_deliveries.c.next_attempt_at <= now,
                   or_(webhook_deliveries.c.lease_until.is_(None), webhook_deliveries.c.lease_until < now))
            .order_by(webhook_deliveries.c.next_attempt_at).limit(limit)
        )
        async with self._db.connection() as connection:
            rows = (await connection.execute(statement)).all()
        return [_delivery(row) for row in rows]

    async def next_delivery_at(self) -> datetime | None:
        statement = (select(webhook_deliveries.c.next_attempt_at)
                     .where(webhook_deliveries.c.status == DeliveryStatus.PENDING)
                     .order_by(webhook_deliveries.c.next_attempt_at).limit(1))
        async with self._db.connection() as connection:
            value = (await connection.execute(statement)).scalar()
        return None if value is None else utc(value)

    async def claim_delivery(self, delivery_id: str, lease_s: float) -> bool:
        now = now_utc()
        statement = (
            update(webhook_deliveries)
            .where(webhook_deliveries.c.id == delivery_id, webhook_deliveries.c.status == DeliveryStatus.PENDING,
                   or_(webhook_deliveries.c.lease_until.is_(None), webhook_deliveries.c.lease_until < now))
            .values(lease_until=now + timedelta(seconds=lease_s), updated_at=now)
        )
        async with self._db.transaction() as connection:
            result = await connection.execute(statement)
        return bool(result.rowcount == 1)

    async def record_attempt(self, delivery_id: str, *, status: DeliveryStatus, attempts: int,
                             next_attempt_at: datetime | None, last_status: int | None,
                             last_error: str | None) -> None:
        now = now_utc()
        values: dict[str, Any] = {"status": status, "attempts": attempts, "lease_until": None, "updated_at": now,
                                  "last_status": last_status, "last_error": last_error}
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
        async with self._db.transaction() as connection:
            await connection.execute(update(webhook_deliveries).where(webhook_deliveries.c.id == delivery_id)
                                     .values(**values))

    async def give_up_url(self, job_id: str, url: str) -> None:
        """After a 410: the job's other pending deliveries to that URL are dropped too."""
        async with self._db.transaction() as connection:
            await connection.execute(
                update(webhook_deliveries)
                .where(webhook_deliveries.c.job_id == job_id, webhook_deliveries.c.url == url,
                       webhook_deliveries.c.status == DeliveryStatus.PENDING)
                .values(status=DeliveryStatus.GONE, updated_at=now_utc(), lease_until=None))

    async def url_gone(self, job_id: str, url: str) -> bool:
        """Whether the URL answered 410 to one of the job's deliveries."""
        statement = (select(webhook_deliveries.c.id)
                     .where(webhook_deliveries.c.job_id == job_id, webhook_deliveries.c.url == url,
                            webhook_deliveries.c.status == DeliveryStatus.GONE).limit(1))
        async with self._db.connection() as connection:
            return (await connection.execute(statement)).first() is not None

    async def deliveries_of(self, job_id: str) -> list[dict[str, Any]]:
        """Every delivery of a job with its outcome (for the job's view and the operator)."""
        statement = (select(webhook_deliveries).where(webhook_deliveries.c.job_id == job_id)
                     .order_by(webhook_deliveries.c.created_at, webhook_deliveries.c.id))
        async with self._db.connection() as connection:
            rows = (await connection.execute(statement)).all()
        return [{"id": row.id, "event": row.event_type, "status": row.status, "attempts": row.attempts,
                 "lastStatus": row.last_status} for row in rows]
