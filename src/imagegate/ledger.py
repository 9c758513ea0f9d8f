"""The ledger: every generation and every payment reservation, durably.

``Ledger`` is the seam; ``SqlLedger`` implements it with SQLAlchemy Core, on SQLite by default
(``sqlite+aiosqlite:///data/ledger.sqlite3``) and on PostgreSQL by configuration
(``postgresql+asyncpg://...``): the same statements run on both. The schema is ``metadata`` below;
every change to it ships as an Alembic revision in ``imagegate.migrations``.

A payment's key is ``<network>:<payer>:<nonce>`` (EIP-3009 nonces are unique per payer): the
primary key makes reserving it atomic across requests, workers and processes. Finishing a generation
(publishing or discarding its images after settlement) happens under ``claim_generation``, so that
several API processes on one database finish each generation once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    CursorResult,
    DateTime,
    Engine,
    Executable,
    Index,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    case,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

if TYPE_CHECKING:
    from imagegate.config import LedgerSettings

metadata = MetaData()

generations = Table(
    "generations",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("model", String(200), nullable=False, index=True),
    Column("status", String(32), nullable=False),
    Column("request", Text, nullable=False),
    Column("price_amount", BigInteger, nullable=False),
    Column("charged_amount", BigInteger, nullable=False, default=0),
    Column("provider_cost_micros", BigInteger, nullable=True),
    Column("payment_key", String(200), nullable=True, index=True),
    Column("images", Text, nullable=True),
    Column("receipt", Text, nullable=True),
    Column("error", Text, nullable=True),
)

payments = Table(
    "payments",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("status", String(32), nullable=False),
    Column("network", String(64), nullable=False),
    Column("payer", String(64), nullable=False, index=True),
    Column("nonce", String(80), nullable=False),
    Column("pay_to", String(64), nullable=False),
    Column("asset", String(64), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("valid_before", BigInteger, nullable=False),
    Column("generation_id", String(36), nullable=True),
    Column("transaction", String(80), nullable=True),
    Column("payload", Text, nullable=False),
    Column("error", Text, nullable=True),
)


# SQLite's WAL is written back to the database (and synced) by a worker thread this often.
CHECKPOINT_EVERY_COMMITS = 256

# Reconciliation looks for rows by status, and for stale ones by age: without these it reads every
# row ever written, every round, and gets slower with history.
STATUS_INDEXES = (
    Index("ix_payments_status_updated_at", payments.c.status, payments.c.updated_at),
    Index("ix_generations_status_updated_at", generations.c.status, generations.c.updated_at),
)


class GenerationStatus(StrEnum):
    RUNNING = "running"
    SETTLING = "settling"
    COMPLETED = "completed"
    FAILED = "failed"
    SETTLEMENT_FAILED = "settlement_failed"
    SETTLEMENT_PENDING = "settlement_pending"


class PaymentStatus(StrEnum):
    RESERVED = "reserved"
    SETTLING = "settling"
    SETTLED = "settled"
    PENDING = "pending"  # broadcast, outcome unknown: reconcile, never ask for a new signature
    FAILED = "failed"  # refused on chain or by the facilitator: terminal
    RELEASED = "released"  # the work failed before settlement: the client may use it again


@dataclass(frozen=True)
class GenerationRecord:
    id: str
    model: str
    status: GenerationStatus
    request: dict[str, Any]
    price_amount: int
    charged_amount: int
    provider_cost_micros: int | None
    payment_key: str | None
    images: list[dict[str, Any]]
    receipt: dict[str, Any] | None
    error: str | None
    created_at: datetime


@dataclass(frozen=True)
class PaymentRecord:
    key: str
    status: PaymentStatus
    network: str
    payer: str
    nonce: str
    pay_to: str
    asset: str
    amount: int
    valid_before: int
    generation_id: str | None
    transaction: str | None
    payload: dict[str, Any]
    error: str | None


@dataclass(frozen=True)
class ModelRevenue:
    model: str
    generations: int
    revenue_micros: int
    provider_cost_micros: int
    # Generations whose provider reported no cost: their margin is unknown, not free.
    uncosted_generations: int

    @property
    def margin_micros(self) -> int:
        return self.revenue_micros - self.provider_cost_micros


class GenerationClaim(Protocol):
    """A generation held by one finisher (see ``Ledger.claim_generation``)."""

    record: GenerationRecord

    async def update(
        self,
        status: GenerationStatus,
        *,
        receipt: dict[str, Any] | None = None,
        charged_amount: int | None = None,
        error: str | None = None,
    ) -> None:
        """Record how the generation ended; committed when the claim ends without an exception."""


class Ledger(Protocol):
    """What the request flow and the payment gate need from durable storage."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def start_generation(
        self, generation_id: str, model: str, request: dict[str, Any], price_amount: int, payment_key: str | None
    ) -> None: ...

    async def update_generation(
        self,
        generation_id: str,
        status: GenerationStatus,
        *,
        images: list[dict[str, Any]] | None = None,
        receipt: dict[str, Any] | None = None,
        charged_amount: int | None = None,
        provider_cost_micros: int | None = None,
        error: str | None = None,
    ) -> None: ...

    async def generation(self, generation_id: str) -> GenerationRecord | None: ...

    def claim_generation(
        self, generation_id: str, statuses: Sequence[GenerationStatus], *, skip_locked: bool = False
    ) -> AbstractAsyncContextManager[GenerationClaim | None]:
        """Hold ``generation_id`` while finishing it, if it is in one of ``statuses``; None otherwise.

        Whoever finishes a generation (the request that paid, a replayed request, a reconciler in any
        process) does it inside this block: others wait for the block to end and then see the new status
        (``skip_locked``: they get None at once instead, for background work). A claim that ends with an
        exception changes nothing.
        """
        ...

    async def revenue_by_model(self) -> list[ModelRevenue]: ...

    async def reserve_payment(self, record: PaymentRecord) -> PaymentRecord | None: ...

    async def update_payment(
        self,
        key: str,
        status: PaymentStatus,
        *,
        generation_id: str | None = None,
        transaction: str | None = None,
        error: str | None = None,
        expected: Sequence[PaymentStatus] | None = None,
        for_generation: str | None = None,
        updated_before: datetime | None = None,
    ) -> bool: ...

    async def payment(self, key: str) -> PaymentRecord | None: ...

    async def payments_with_status(
        self, status: PaymentStatus, *, updated_before: datetime | None = None
    ) -> list[PaymentRecord]: ...

    async def generations_with_status(
        self, status: GenerationStatus, *, updated_before: datetime | None = None
    ) -> list[GenerationRecord]: ...

    def atomic(self) -> AbstractAsyncContextManager[None]:
        """The ledger calls made inside the block (in this task) commit together, or not at all.

        Only ledger calls belong inside: the block holds the database's write lock from its first write.
        """
        ...


def _now() -> datetime:
    return datetime.now(UTC)


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def default_url(data_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{data_dir / 'ledger.sqlite3'}"


class _LoopConnection:
    """A synchronous SQLAlchemy connection, awaited like an ``AsyncConnection`` (see ``SqlLedger``)."""

    def __init__(self, connection: Connection):
        self._connection = connection

    async def execute(self, statement: Executable, parameters: dict[str, Any] | None = None) -> CursorResult[Any]:
        return self._connection.execute(statement, parameters)


# What the ledger's statements (and those of stores sharing its database) run on.
LedgerConnection = AsyncConnection | _LoopConnection


class SqlLedger:
    """The ledger on SQLAlchemy: SQLite by default, PostgreSQL for several API processes.

    On SQLite, statements run on the event loop's own thread through a synchronous engine. That is
    blocking work on the loop, on purpose: a WAL commit without fsync takes tens of microseconds,
    while aiosqlite hands every statement, cursor and commit to a worker thread and back (a dozen
    thread hops per paid request, each a scheduler wakeup; measured 2-7 ms of wall time per
    transaction on a busy 2-core machine). This process's writers queue on an asyncio lock, so
    SQLite's busy handler (which sleeps, on the loop) only ever meets another process's writer: an
    SQLite ledger is the embedded default for one server process (several processes belong on
    PostgreSQL). The WAL is checkpointed (and synced) in a worker thread every
    ``CHECKPOINT_EVERY_COMMITS`` commits instead of inline. Migrations and ``imagegate db`` use the
    async engine.

    Other stores keeping their tables in the ledger's database (the jobs) run their statements through
    ``transaction()`` and ``connection()``, so they share the ledger's write lock and connections.
    """

    def __init__(self, url: str, settings: LedgerSettings | None = None):
        from imagegate.config import LedgerSettings

        self.url = url
        self.settings = settings or LedgerSettings()
        self._sqlite = url.startswith("sqlite")
        try:
            self._engine: AsyncEngine = create_async_engine(url, **self._engine_options())
        except ModuleNotFoundError as exc:
            raise RuntimeError(f"the ledger's database driver is not installed ({exc}); for PostgreSQL: "
                               'pip install "imagegate[postgres]"') from exc
        self._loop_engine: Engine | None = None
        if self._sqlite:
            event.listen(self._engine.sync_engine, "connect", _sqlite_connection_settings)
            # No busy timeout: SQLite's busy handler sleeps, and here it would sleep on the event loop's
            # thread. A write transaction that finds the database locked (another process writes) is
            # retried after an asyncio sleep instead (``_write_transaction``).
            self._loop_engine = create_engine(make_url(url).set(drivername="sqlite"), connect_args={
                "timeout": 0, "check_same_thread": False})
            event.listen(self._loop_engine, "connect", _loop_connection_settings)
            event.listen(self._loop_engine, "begin", _begin_loop_transaction)
        # The transaction of the ``atomic`` block (or claim) this task is in, if any. Bound to the task that
        # opened it: a task started inside the block inherits the context variable, not the transaction.
        self._transaction: ContextVar[tuple[asyncio.Task[Any] | None, LedgerConnection] | None] = ContextVar(
            f"ledger-{id(self)}", default=None)
        # SQLite has one writer at a time, and a writer that finds the database locked waits in
        # sleeps of growing length (1, 2, 5, 10 ... 100 ms): this process's own writers queue here instead.
        self._write_lock = asyncio.Lock()
        self._commits = 0
        self._checkpoint: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: LedgerSettings, data_dir: Path) -> SqlLedger:
        if settings.url is None:
            data_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings.url or default_url(data_dir), settings)

    def _engine_options(self) -> dict[str, Any]:
        settings = self.settings
        if self._sqlite:
            # The busy timeout: how long a writer waits for SQLite's one write lock.
            return {"connect_args": {"timeout": settings.lock_timeout_s or 3600.0}}
        server_settings = {"application_name": "imagegate"}
        for name, seconds in (("statement_timeout", settings.statement_timeout_s),
                              ("lock_timeout", settings.lock_timeout_s)):
            if seconds is not None:
                server_settings[name] = str(max(1, round(seconds * 1000)))
        options: dict[str, Any] = {
            "pool_size": settings.pool_size,
            "max_overflow": settings.max_overflow,
            "pool_timeout": settings.pool_timeout_s,
            "pool_recycle": settings.pool_recycle_s if settings.pool_recycle_s is not None else -1,
            "pool_pre_ping": settings.pool_pre_ping,
        }
        if self.url.startswith("postgresql+asyncpg"):
            options["connect_args"] = {"server_settings": server_settings, "timeout": settings.connect_timeout_s}
        return options

    async def start(self) -> None:
        """Connect, and bring the schema to this version's (``upgrade_on_start``) or check that it is."""
        from imagegate import migrations

        if self._sqlite:
            await self._use_wal()
        if await migrations.is_current(self._engine):
            return  # the usual restart: one query, Alembic never loaded
        if self.settings.upgrade_on_start:
            await migrations.upgrade(self._engine)
        else:
            await migrations.require_head(self._engine)

    async def _use_wal(self) -> None:
        """WAL lets the image route read while a generation writes (persistent, set once per file).

        Switching needs the file to itself, and SQLite answers "locked" at once instead of waiting out its
        busy timeout while another connection uses the file (processes starting together on a new
        ledger, one of them already creating the schema): retried until the lock timeout.
        """
        deadline = time.monotonic() + (self.settings.lock_timeout_s or DEFAULT_SQLITE_LOCK_WAIT_S)
        delay = 0.01
        while True:
            try:
                async with self._engine.connect() as connection:
                    await connection.exec_driver_sql("PRAGMA journal_mode=WAL")
                return
            except OperationalError as exc:
                if "locked" not in str(exc.orig) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def aclose(self) -> None:
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        if self._loop_engine is not None:
            self._loop_engine.dispose()
        await self._engine.dispose()

    @property
    def engine(self) -> AsyncEngine:
        """The async connection pool: migrations and the ``imagegate db`` commands."""
        return self._engine

    # transactions

    def _current(self) -> LedgerConnection | None:
        """The transaction of the ``atomic`` block this very task is in."""
        current = self._transaction.get()
        if current is None or current[0] is not asyncio.current_task():
            return None
        return current[1]

    @asynccontextmanager
    async def atomic(self) -> AsyncIterator[None]:
        if self._current() is not None:
            yield  # already inside one: join it
            return
        async with self._write_transaction() as connection:
            token = self._transaction.set((asyncio.current_task(), connection))
            try:
                yield
            finally:
                self._transaction.reset(token)

    def transaction(self) -> AbstractAsyncContextManager[LedgerConnection]:
        """A write transaction (the current ``atomic`` one, if any), for stores sharing the database."""
        return self._write()

    def connection(self) -> AbstractAsyncContextManager[LedgerConnection]:
        """A connection for reads, for stores sharing the database."""
        return self._read()

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[LedgerConnection]:
        """The current ``atomic`` transaction, or a transaction of its own."""
        current = self._current()
        if current is not None:
            yield current
            return
        async with self._write_transaction() as connection:
            yield connection

    @asynccontextmanager
    async def _write_transaction(self) -> AsyncIterator[LedgerConnection]:
        if self._loop_engine is None:
            async with self._engine.begin() as connection:
                yield connection
            return
        async with self._write_lock:
            sync_connection = await self._begin_immediate(self._loop_engine)
            try:
                yield _LoopConnection(sync_connection)
                sync_connection.commit()
            finally:
                sync_connection.close()  # rolls back what was not committed
            self._commits += 1
            if self._commits % CHECKPOINT_EVERY_COMMITS == 0 and (self._checkpoint is None or self._checkpoint.done()):
                self._checkpoint = asyncio.create_task(self._checkpoint_between_writes())

    async def _begin_immediate(self, engine: Engine) -> Connection:
        """A connection holding SQLite's write lock (BEGIN IMMEDIATE): later statements of the transaction
        never meet a lock. While another process holds it, wait here, off the loop's thread."""
        deadline = time.monotonic() + (self.settings.lock_timeout_s or DEFAULT_SQLITE_LOCK_WAIT_S)
        delay = 0.001
        while True:
            connection = engine.connect()
            # ``info`` stays with the pooled DBAPI connection: the flag must not outlive this BEGIN, or
            # later reads on the same connection would begin IMMEDIATE too (and meet the write lock).
            connection.info[WRITE_TRANSACTION] = True
            try:
                connection.begin()
                return connection
            except OperationalError as exc:
                connection.info.pop(WRITE_TRANSACTION, None)
                connection.close()
                if "locked" not in str(exc.orig) or time.monotonic() > deadline:
                    raise
            finally:
                if not connection.closed:
                    connection.info.pop(WRITE_TRANSACTION, None)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _checkpoint_between_writes(self) -> None:
        """Write the WAL back into the database (and sync it) in a worker thread, with this process's
        writers held back meanwhile: the next commit can then start the WAL over. A checkpoint that
        races writes never catches up with them, and the WAL grows for ever (measured: 340 MB after
        5,000 paid requests, every commit slower)."""
        async with self._write_lock:
            await asyncio.to_thread(self._checkpoint_wal)

    def _checkpoint_wal(self) -> None:
        assert self._loop_engine is not None
        with self._loop_engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").all()

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[LedgerConnection]:
        current = self._current()
        if current is not None:
            yield current
            return
        if self._loop_engine is not None:
            with self._loop_engine.connect() as connection:
                yield _LoopConnection(connection)
            return
        async with self._engine.connect() as connection:
            yield connection

    # generations

    async def start_generation(
        self, generation_id: str, model: str, request: dict[str, Any], price_amount: int, payment_key: str | None
    ) -> None:
        now = _now()
        async with self._write() as connection:
            await connection.execute(_INSERT_GENERATION, {
                "id": generation_id, "created_at": now, "updated_at": now, "model": model,
                "status": GenerationStatus.RUNNING, "request": _dump(request), "price_amount": price_amount,
                "charged_amount": 0, "payment_key": payment_key,
            })

    async def update_generation(
        self,
        generation_id: str,
        status: GenerationStatus,
        *,
        images: list[dict[str, Any]] | None = None,
        receipt: dict[str, Any] | None = None,
        charged_amount: int | None = None,
        provider_cost_micros: int | None = None,
        error: str | None = None,
    ) -> None:
        values = _generation_values(status, images=images, receipt=receipt, charged_amount=charged_amount,
                                    provider_cost_micros=provider_cost_micros, error=error)
        async with self._write() as connection:
            await connection.execute(_update_statement(generations, frozenset(values)),
                                     {**_set_params(values), "where_key": generation_id})

    async def generation(self, generation_id: str) -> GenerationRecord | None:
        async with self._read() as connection:
            row = (await connection.execute(select(generations).where(generations.c.id == generation_id))).first()
        return None if row is None else _generation_record(row)

    @asynccontextmanager
    async def claim_generation(
        self, generation_id: str, statuses: Sequence[GenerationStatus], *, skip_locked: bool = False
    ) -> AsyncIterator[GenerationClaim | None]:
        async with self.atomic():
            connection = self._current()
            assert connection is not None
            if self._sqlite:
                # SQLite has no row locks (FOR UPDATE renders as nothing): writing first takes its one write
                # lock, which then serializes claims in this process and in every other one on the file.
                await connection.execute(update(generations).where(generations.c.id == generation_id)
                                         .values(updated_at=generations.c.updated_at))
            statement = select(generations).where(generations.c.id == generation_id)
            row = (await connection.execute(statement.with_for_update(skip_locked=skip_locked))).first()
            if row is None or GenerationStatus(row.status) not in statuses:
                yield None
            else:
                yield _SqlGenerationClaim(connection, _generation_record(row))

    async def revenue_by_model(self) -> list[ModelRevenue]:
        g = generations.c
        statement = (
            select(
                g.model,
                func.count().label("count"),
                func.coalesce(func.sum(g.charged_amount), 0).label("revenue"),
                func.coalesce(func.sum(g.provider_cost_micros), 0).label("cost"),
                # CASE, not a boolean cast: PostgreSQL has no boolean -> bigint cast.
                func.sum(case((g.provider_cost_micros.is_(None), 1), else_=0)).label("uncosted"),
            )
            .where(g.status == GenerationStatus.COMPLETED)
            .group_by(g.model)
            .order_by(g.model)
        )
        async with self._read() as connection:
            rows = (await connection.execute(statement)).all()
        return [ModelRevenue(r.model, int(r[1]), int(r.revenue), int(r.cost), int(r.uncosted or 0))
                for r in rows]

    # payments

    async def reserve_payment(self, record: PaymentRecord) -> PaymentRecord | None:
        """Reserve ``record.key``; None when we now hold it, else the existing record.

        A ``released`` reservation (its work failed) is taken over atomically.
        """
        now = _now()
        values = {
            "key": record.key,
            "created_at": now,
            "updated_at": now,
            "status": PaymentStatus.RESERVED,
            "network": record.network,
            "payer": record.payer,
            "nonce": record.nonce,
            "pay_to": record.pay_to,
            "asset": record.asset,
            "amount": record.amount,
            "valid_before": record.valid_before,
            "payload": _dump(record.payload),
        }
        try:
            async with self._write() as connection:
                await connection.execute(_INSERT_PAYMENT, values)
            return None
        except IntegrityError:
            pass
        async with self._write() as connection:
            taken = await connection.execute(
                update(payments)
                .where(payments.c.key == record.key, payments.c.status == PaymentStatus.RELEASED)
                .values(status=PaymentStatus.RESERVED, updated_at=now, generation_id=None, error=None,
                        payload=_dump(record.payload), amount=record.amount)
            )
        if taken.rowcount == 1:
            return None
        existing = await self.payment(record.key)
        if existing is None:  # deleted in between: not something this service does
            raise RuntimeError(f"payment {record.key} vanished during reservation")
        return existing

    async def update_payment(
        self,
        key: str,
        status: PaymentStatus,
        *,
        generation_id: str | None = None,
        transaction: str | None = None,
        error: str | None = None,
        expected: Sequence[PaymentStatus] | None = None,
        for_generation: str | None = None,
        updated_before: datetime | None = None,
    ) -> bool:
        """Set the status (only from one of ``expected``, only while the payment is linked to
        ``for_generation``, only if untouched since ``updated_before``, when given); True when a row changed."""
        values: dict[str, Any] = {"status": status, "updated_at": _now()}
        if generation_id is not None:
            values["generation_id"] = generation_id
        if transaction is not None:
            values["transaction"] = transaction
        if error is not None:
            values["error"] = error
        parameters = {**_set_params(values), "where_key": key}
        if expected is not None:
            parameters["where_status"] = [str(s) for s in expected]
        if for_generation is not None:
            parameters["where_generation_id"] = for_generation
        if updated_before is not None:
            parameters["where_updated_before"] = updated_before
        statement = _update_statement(payments, frozenset(values), with_expected_status=expected is not None,
                                      with_generation=for_generation is not None,
                                      with_updated_before=updated_before is not None)
        async with self._write() as connection:
            result = await connection.execute(statement, parameters)
        return bool(result.rowcount == 1)

    async def payment(self, key: str) -> PaymentRecord | None:
        async with self._read() as connection:
            row = (await connection.execute(select(payments).where(payments.c.key == key))).first()
        return None if row is None else _payment_record(row)

    async def payments_with_status(
        self, status: PaymentStatus, *, updated_before: datetime | None = None
    ) -> list[PaymentRecord]:
        statement = select(payments).where(payments.c.status == status)
        if updated_before is not None:
            statement = statement.where(payments.c.updated_at < updated_before)
        async with self._read() as connection:
            rows = (await connection.execute(statement)).all()
        return [_payment_record(row) for row in rows]

    async def generations_with_status(
        self, status: GenerationStatus, *, updated_before: datetime | None = None
    ) -> list[GenerationRecord]:
        statement = select(generations).where(generations.c.status == status)
        if updated_before is not None:
            statement = statement.where(generations.c.updated_at < updated_before)
        async with self._read() as connection:
            rows = (await connection.execute(statement)).all()
        return [_generation_record(row) for row in rows]


class _SqlGenerationClaim:
    def __init__(self, connection: LedgerConnection, record: GenerationRecord):
        self._connection = connection
        self.record = record

    async def update(
        self,
        status: GenerationStatus,
        *,
        receipt: dict[str, Any] | None = None,
        charged_amount: int | None = None,
        error: str | None = None,
    ) -> None:
        values = _generation_values(status, receipt=receipt, charged_amount=charged_amount, error=error)
        await self._connection.execute(_update_statement(generations, frozenset(values)),
                                       {**_set_params(values), "where_key": self.record.id})


def _generation_values(status: GenerationStatus, *, images: list[dict[str, Any]] | None = None,
                       receipt: dict[str, Any] | None = None, charged_amount: int | None = None,
                       provider_cost_micros: int | None = None, error: str | None = None) -> dict[str, Any]:
    values: dict[str, Any] = {"status": status, "updated_at": _now()}
    if images is not None:
        values["images"] = _dump(images)
    if receipt is not None:
        values["receipt"] = _dump(receipt)
    if charged_amount is not None:
        values["charged_amount"] = charged_amount
    if provider_cost_micros is not None:
        values["provider_cost_micros"] = provider_cost_micros
    if error is not None:
        values["error"] = error
    return values


# The hot path's statements are built once and executed with parameters: building a SQLAlchemy
# statement costs more than SQLite takes to run it.
_INSERT_GENERATION = insert(generations)
_INSERT_PAYMENT = insert(payments)


@cache
def _update_statement(table: Table, columns: frozenset[str], *, with_expected_status: bool = False,
                      with_generation: bool = False, with_updated_before: bool = False) -> Executable:
    """UPDATE ``table`` SET ``columns`` WHERE its key = :where_key [AND status IN :where_status]
    [AND generation_id = :where_generation_id] [AND updated_at < :where_updated_before]."""
    key = table.primary_key.columns.values()[0]
    statement = update(table).where(key == bindparam("where_key"))
    if with_expected_status:
        statement = statement.where(table.c.status.in_(bindparam("where_status", expanding=True)))
    if with_generation:
        statement = statement.where(table.c.generation_id == bindparam("where_generation_id"))
    if with_updated_before:
        statement = statement.where(table.c.updated_at < bindparam("where_updated_before"))
    return statement.values({column: bindparam(f"set_{column}") for column in sorted(columns)})


def _set_params(values: dict[str, Any]) -> dict[str, Any]:
    return {f"set_{column}": value for column, value in values.items()}


WRITE_TRANSACTION = "imagegate.write"
# How long a write waits for another process's SQLite write lock when [ledger] lock_timeout_s is not set.
DEFAULT_SQLITE_LOCK_WAIT_S = 30.0


def _loop_connection_settings(connection: Any, record: Any) -> None:
    # The driver's own transaction handling off: ``_begin_loop_transaction`` says BEGIN, and which one.
    connection.isolation_level = None
    _sqlite_connection_settings(connection, record)


def _begin_loop_transaction(connection: Connection) -> None:
    """Writes begin IMMEDIATE (the write lock at once, or "locked" at once: see ``_begin_immediate``);
    reads begin DEFERRED (WAL readers never wait)."""
    connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.info.get(WRITE_TRANSACTION) else "BEGIN")


def _sqlite_connection_settings(connection: Any, _record: Any) -> None:
    """Per SQLite connection: WAL commits reach the OS without an fsync each (``synchronous=NORMAL``),
    and the WAL is checkpointed by ``SqlLedger`` in a worker thread rather than inside a commit.

    A commit then survives a crash of this process (the kill the server recovers from), and the WAL
    is synced at checkpoints; an OS crash or power cut can lose the commits since the last one. Each
    fsync costs milliseconds on a virtual disk, and a paid request commits four times.
    """
    cursor = connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


def _generation_record(row: Any) -> GenerationRecord:
    return GenerationRecord(
        id=row.id,
        model=row.model,
        status=GenerationStatus(row.status),
        request=json.loads(row.request),
        price_amount=row.price_amount,
        charged_amount=row.charged_amount,
        provider_cost_micros=row.provider_cost_micros,
        payment_key=row.payment_key,
        images=json.loads(row.images) if row.images else [],
        receipt=json.loads(row.receipt) if row.receipt else None,
        error=row.error,
        created_at=row.created_at,
    )


def _payment_record(row: Any) -> PaymentRecord:
    return PaymentRecord(
        key=row.key,
        status=PaymentStatus(row.status),
        network=row.network,
        payer=row.payer,
        nonce=row.nonce,
        pay_to=row.pay_to,
        asset=row.asset,
        amount=row.amount,
        valid_before=row.valid_before,
        generation_id=row.generation_id,
        transaction=row.transaction,
        payload=json.loads(row.payload),
        error=row.error,
    )
