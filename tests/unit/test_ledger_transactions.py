"""The ledger's atomic blocks: the calls inside commit together or not at all."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text

from imagegate.ledger import GenerationStatus, PaymentRecord, PaymentStatus, SqlLedger


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SqlLedger]:
    ledger = SqlLedger(f"sqlite+aiosqlite:///{tmp_path / 'ledger.sqlite3'}")
    await ledger.start()
    yield ledger
    await ledger.aclose()


def _payment(key: str) -> PaymentRecord:
    return PaymentRecord(key=key, status=PaymentStatus.RESERVED, network="eip155:84532", payer="0xpayer",
                         nonce="0x01", pay_to="0xpayto", asset="0xasset", amount=5, valid_before=2**40,
                         generation_id=None, transaction=None, payload={"v": 2}, error=None)


async def test_an_atomic_block_commits_everything_or_nothing(ledger: SqlLedger) -> None:
    assert await ledger.reserve_payment(_payment("k1")) is None
    async with ledger.atomic():
        await ledger.start_generation("g1", "bench-simulated", {"prompt": "p"}, 5, "k1")
        assert await ledger.update_payment("k1", PaymentStatus.RESERVED, generation_id="g1",
                                           expected=[PaymentStatus.RESERVED])
        # Inside the block its own writes are visible.
        assert (await ledger.payment("k1")).generation_id == "g1"  # type: ignore[union-attr]
    assert (await ledger.generation("g1")) is not None

    with pytest.raises(RuntimeError, match="boom"):
        async with ledger.atomic():
            await ledger.update_generation("g1", GenerationStatus.SETTLING, images=[{"uuid": "u"}])
            await ledger.update_payment("k1", PaymentStatus.SETTLING, expected=[PaymentStatus.RESERVED])
            raise RuntimeError("boom")
    generation, payment = await ledger.generation("g1"), await ledger.payment("k1")
    assert generation is not None and generation.status is GenerationStatus.RUNNING and generation.images == []
    assert payment is not None and payment.status is PaymentStatus.RESERVED


async def test_conditional_updates_report_whether_they_applied(ledger: SqlLedger) -> None:
    await ledger.reserve_payment(_payment("k2"))
    assert not await ledger.update_payment("k2", PaymentStatus.SETTLED, expected=[PaymentStatus.SETTLING])
    assert await ledger.update_payment("k2", PaymentStatus.SETTLING, expected=[PaymentStatus.RESERVED])
    assert await ledger.update_payment("k2", PaymentStatus.SETTLED, transaction="0xabc",
                                       expected=[PaymentStatus.SETTLING, PaymentStatus.PENDING])
    record = await ledger.payment("k2")
    assert record is not None and record.status is PaymentStatus.SETTLED and record.transaction == "0xabc"


async def test_reconciliation_queries_use_the_status_indexes(ledger: SqlLedger) -> None:
    async with ledger._read() as connection:  # the query plan is what is under test
        plan = (await connection.execute(
            text("EXPLAIN QUERY PLAN SELECT * FROM payments WHERE status = 'pending'"))).all()
    assert any("ix_payments_status_updated_at" in str(row) for row in plan), plan


async def test_reads_never_wait_for_a_writer_even_on_a_connection_that_wrote_before(
        ledger: SqlLedger, tmp_path: Path) -> None:
    """A pooled connection used for a write transaction goes back to reading with a plain BEGIN: while
    another process holds SQLite's write lock, this one still reads (WAL readers never wait)."""
    assert await ledger.reserve_payment(_payment("k3")) is None
    other_process = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None, timeout=0)
    other_process.execute("BEGIN IMMEDIATE")
    try:
        for _ in range(3):  # whichever pooled connection the reads get
            record = await ledger.payment("k3")
            assert record is not None and record.status is PaymentStatus.RESERVED
    finally:
        other_process.execute("ROLLBACK")
        other_process.close()


async def test_ledgers_starting_together_on_a_new_sqlite_file_all_start(tmp_path: Path) -> None:
    """Switching a new file to WAL meets the other starters' connections (SQLite says "locked" at once
    there, whatever the busy timeout): every one of them still starts. Several rounds: it is a race."""
    for round_number in range(30):
        url = f"sqlite+aiosqlite:///{tmp_path / f'ledger-{round_number}.sqlite3'}"
        ledgers = [SqlLedger(url) for _ in range(6)]
        try:
            async with asyncio.timeout(60), asyncio.TaskGroup() as starting:
                for ledger in ledgers:
                    starting.create_task(ledger.start())
            async with ledgers[0]._read() as connection:
                assert (await connection.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
        finally:
            for ledger in ledgers:
                await ledger.aclose()
