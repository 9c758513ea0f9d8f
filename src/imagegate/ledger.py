"""The ledger: every generation and every payment reservation, durably.

``Ledger`` is the seam; ``SqlLedger`` implements it with SQLAlchemy Core, on SQLite by default
(``sqlite+aiosqlite:///data/ledger.sqlite3``) and on PostgreSQL by configuration
(``postgresql+asyncpg://...``): the same statements run on both.

A payment's key is ``<network>:<payer>:<nonce>`` (EIP-3009 nonces are unique per payer): the
primary key makes reserving it atomic across requests, workers and processes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

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
    ) -> bool: ...

    async def payment(self, key: str) -> PaymentRecord | None: ...

    async def payments_with_status(
        self, status: PaymentStatus, *, updated_before: datetime | None = None
    ) -> list[PaymentRecord]: ...

    async def generations_with_status(
        self, status: GenerationStatus, *, updated_before: datetime | None = None
    ) -> list[GenerationRecord]: ...


def _now() -> datetime:
    return datetime.now(UTC)


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


class SqlLedger:
    """The ledger on any SQLAlchemy async engine (SQLite by default, PostgreSQL for scale)."""

    def __init__(self, url: str):
        self.url = url
        connect_args = {"timeout": 30} if url.startswith("sqlite") else {}
        self._engine: AsyncEngine = create_async_engine(url, connect_args=connect_args)

    async def start(self) -> None:
        async with self._engine.begin() as connection:
            if self.url.startswith("sqlite"):
                # WAL lets the image route read while a generation writes.
                await connection.exec_driver_sql("PRAGMA journal_mode=WAL")
            await connection.run_sync(metadata.create_all)

    async def aclose(self) -> None:
        await self._engine.dispose()

    # generations

    async def start_generation(
        self, generation_id: str, model: str, request: dict[str, Any], price_amount: int, payment_key: str | None
    ) -> None:
        now = _now()
        async with self._engine.begin() as connection:
            await connection.execute(
                insert(generations).values(
                    id=generation_id,
                    created_at=now,
                    updated_at=now,
                    model=model,
                    status=GenerationStatus.RUNNING,
                    request=_dump(request),
                    price_amount=price_amount,
                    charged_amount=0,
                    payment_key=payment_key,
                )
            )

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
        async with self._engine.begin() as connection:
            await connection.execute(update(generations).where(generations.c.id == generation_id).values(**values))

    async def generation(self, generation_id: str) -> GenerationRecord | None:
        async with self._engine.connect() as connection:
            row = (await connection.execute(select(generations).where(generations.c.id == generation_id))).first()
        return None if row is None else _generation_record(row)

    async def revenue_by_model(self) -> list[ModelRevenue]:
        g = generations.c
        statement = (
            select(
                g.model,
                func.count().label("count"),
                func.coalesce(func.sum(g.charged_amount), 0).label("revenue"),
                func.coalesce(func.sum(g.provider_cost_micros), 0).label("cost"),
                func.sum((g.provider_cost_micros.is_(None)).cast(BigInteger)).label("uncosted"),
            )
            .where(g.status == GenerationStatus.COMPLETED)
            .group_by(g.model)
            .order_by(g.model)
        )
        async with self._engine.connect() as connection:
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
            async with self._engine.begin() as connection:
                await connection.execute(insert(payments).values(**values))
            return None
        except IntegrityError:
            pass
        async with self._engine.begin() as connection:
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
    ) -> bool:
        """Set the status (only from one of ``expected`` when given); True when a row changed."""
        values: dict[str, Any] = {"status": status, "updated_at": _now()}
        if generation_id is not None:
            values["generation_id"] = generation_id
        if transaction is not None:
            values["transaction"] = transaction
        if error is not None:
            values["error"] = error
        condition = [payments.c.key == key]
        if expected is not None:
            condition.append(payments.c.status.in_([str(s) for s in expected]))
        async with self._engine.begin() as connection:
            result = await connection.execute(update(payments).where(*condition).values(**values))
        return bool(result.rowcount == 1)

    async def payment(self, key: str) -> PaymentRecord | None:
        async with self._engine.connect() as connection:
            row = (await connection.execute(select(payments).where(payments.c.key == key))).first()
        return None if row is None else _payment_record(row)

    async def payments_with_status(
        self, status: PaymentStatus, *, updated_before: datetime | None = None
    ) -> list[PaymentRecord]:
        statement = select(payments).where(payments.c.status == status)
        if updated_before is not None:
            statement = statement.where(payments.c.updated_at < updated_before)
        async with self._engine.connect() as connection:
            rows = (await connection.execute(statement)).all()
        return [_payment_record(row) for row in rows]

    async def generations_with_status(
        self, status: GenerationStatus, *, updated_before: datetime | None = None
    ) -> list[GenerationRecord]:
        statement = select(generations).where(generations.c.status == status)
        if updated_before is not None:
            statement = statement.where(generations.c.updated_at < updated_before)
        async with self._engine.connect() as connection:
            rows = (await connection.execute(statement)).all()
        return [_generation_record(row) for row in rows]


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
