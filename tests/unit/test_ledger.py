"""The ledger's behaviour, on SQLite and on a real PostgreSQL (every test runs on both)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError

from imagegate.config import LedgerSettings
from imagegate.ledger import GenerationStatus, PaymentRecord, PaymentStatus, SqlLedger
from tests.support.postgres import PostgresServer


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'ledger.sqlite3'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database("ledger")


@pytest.fixture
async def ledger(ledger_url: str) -> AsyncIterator[SqlLedger]:
    ledger = SqlLedger(ledger_url)
    await ledger.start()
    yield ledger
    await ledger.aclose()


@pytest.fixture
async def other_process_ledger(ledger: SqlLedger) -> AsyncIterator[SqlLedger]:
    """A second ledger on the same database with its own connections: what another API process has."""
    other = SqlLedger(ledger.url)
    await other.start()
    yield other
    await other.aclose()


def _payment(key: str = "base-sepolia:0xpayer:0x01") -> PaymentRecord:
    return PaymentRecord(key=key, status=PaymentStatus.RESERVED, network="base-sepolia", payer="0xpayer",
                         nonce="0x01", pay_to="0xpayto", asset="0xasset", amount=1739, valid_before=2**40,
                         generation_id=None, transaction=None, payload={"v": 1}, error=None)


async def test_concurrent_reservations_have_exactly_one_winner(ledger: SqlLedger) -> None:
    results = await asyncio.gather(*(ledger.reserve_payment(_payment()) for _ in range(20)))
    assert sum(result is None for result in results) == 1
    assert all(result.status is PaymentStatus.RESERVED for result in results if result is not None)


async def test_released_payments_can_be_reserved_again(ledger: SqlLedger) -> None:
    assert await ledger.reserve_payment(_payment()) is None
    assert await ledger.update_payment(_payment().key, PaymentStatus.RELEASED, expected=[PaymentStatus.RESERVED])
    assert await ledger.reserve_payment(_payment()) is None
    existing = await ledger.reserve_payment(_payment())
    assert existing is not None and existing.status is PaymentStatus.RESERVED


async def test_conditional_updates(ledger: SqlLedger) -> None:
    await ledger.reserve_payment(_payment())
    assert not await ledger.update_payment(_payment().key, PaymentStatus.SETTLED, expected=[PaymentStatus.SETTLING])
    assert await ledger.update_payment(_payment().key, PaymentStatus.SETTLED, transaction="0xabc")
    record = await ledger.payment(_payment().key)
    assert record is not None and record.transaction == "0xabc" and record.payload == {"v": 1}


async def test_revenue_by_model(ledger: SqlLedger) -> None:
    for index, (model, charged, cost) in enumerate([("a", 100, 30), ("a", 100, None), ("b", 50, 60)]):
        await ledger.start_generation(f"g{index}", model, {"prompt": "x"}, charged, None)
        await ledger.update_generation(f"g{index}", GenerationStatus.COMPLETED, charged_amount=charged,
                                       provider_cost_micros=cost)
    await ledger.start_generation("failed", "a", {}, 999, None)
    await ledger.update_generation("failed", GenerationStatus.FAILED, error="boom")
    rows = {row.model: row for row in await ledger.revenue_by_model()}
    assert (rows["a"].generations, rows["a"].revenue_micros, rows["a"].provider_cost_micros) == (2, 200, 30)
    assert rows["a"].uncosted_generations == 1 and rows["a"].margin_micros == 170
    assert rows["b"].margin_micros == -10


async def _settling_generation(ledger: SqlLedger, generation_id: str = "g-settling") -> str:
    await ledger.start_generation(generation_id, "m", {"prompt": "x"}, 100, "key")
    await ledger.update_generation(generation_id, GenerationStatus.SETTLING, images=[{"uuid": "u"}])
    return generation_id


async def test_claims_finish_a_generation_once_across_processes(ledger: SqlLedger,
                                                                other_process_ledger: SqlLedger) -> None:
    """Finishers in two "processes" race: exactly one finishes; the others wait for it and then see the
    generation finished (never the status it had before), so none of them publishes again."""
    generation_id = await _settling_generation(ledger)
    finished: list[int] = []
    saw_unclaimable: list[int] = []
    first_holds = asyncio.Event()

    async def finisher(index: int, on: SqlLedger) -> None:
        if index > 0:
            await first_holds.wait()
        async with on.claim_generation(generation_id, [GenerationStatus.SETTLING]) as claim:
            if claim is None:
                saw_unclaimable.append(index)
                return
            assert claim.record.status is GenerationStatus.SETTLING and claim.record.images == [{"uuid": "u"}]
            first_holds.set()
            await asyncio.sleep(0.3)  # "publishing": the others must be waiting meanwhile
            await claim.update(GenerationStatus.COMPLETED, charged_amount=100, receipt={"tx": "0x1"})
            finished.append(index)

    await asyncio.gather(*(finisher(i, ledger if i % 2 else other_process_ledger) for i in range(6)))
    assert finished == [0] and sorted(saw_unclaimable) == [1, 2, 3, 4, 5]
    record = await ledger.generation(generation_id)
    assert record is not None and record.status is GenerationStatus.COMPLETED and record.charged_amount == 100
    assert record.receipt == {"tx": "0x1"}


async def test_skip_locked_claims_pass_over_a_held_generation(ledger: SqlLedger,
                                                              other_process_ledger: SqlLedger) -> None:
    generation_id = await _settling_generation(ledger)
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with ledger.claim_generation(generation_id, [GenerationStatus.SETTLING]) as claim:
            assert claim is not None
            held.set()
            await release.wait()
            await claim.update(GenerationStatus.COMPLETED)

    holding = asyncio.create_task(holder())
    await held.wait()
    if ledger.url.startswith("postgresql"):
        started = time.monotonic()
        async with other_process_ledger.claim_generation(generation_id, [GenerationStatus.SETTLING],
                                                         skip_locked=True) as claim:
            assert claim is None  # a reconciler moves on at once instead of waiting
        assert time.monotonic() - started < 2
        release.set()
    else:
        # SQLite has no row locks: the claim waits for the write lock, then finds the generation finished.
        asyncio.get_running_loop().call_later(0.3, release.set)
        async with other_process_ledger.claim_generation(generation_id, [GenerationStatus.SETTLING],
                                                         skip_locked=True) as claim:
            assert claim is None
    await holding
    record = await ledger.generation(generation_id)
    assert record is not None and record.status is GenerationStatus.COMPLETED


async def test_a_failed_claim_changes_nothing(ledger: SqlLedger) -> None:
    generation_id = await _settling_generation(ledger)
    with pytest.raises(RuntimeError, match="publish failed"):
        async with ledger.claim_generation(generation_id, [GenerationStatus.SETTLING]) as claim:
            assert claim is not None
            await claim.update(GenerationStatus.COMPLETED, charged_amount=100)
            raise RuntimeError("publish failed")
    record = await ledger.generation(generation_id)
    assert record is not None and record.status is GenerationStatus.SETTLING and record.charged_amount == 0
    async with ledger.claim_generation(generation_id, [GenerationStatus.SETTLING]) as claim:
        assert claim is not None  # the next finisher gets it
    async with ledger.claim_generation("no-such-generation", [GenerationStatus.SETTLING]) as claim:
        assert claim is None


async def test_payment_updates_hold_only_for_their_generation(ledger: SqlLedger) -> None:
    key = _payment().key
    await ledger.reserve_payment(_payment())
    assert await ledger.update_payment(key, PaymentStatus.RESERVED, generation_id="g1",
                                       expected=[PaymentStatus.RESERVED])
    # Released as stale, then taken over by a resend: the takeover unlinks g1.
    assert await ledger.update_payment(key, PaymentStatus.RELEASED, expected=[PaymentStatus.RESERVED])
    assert await ledger.reserve_payment(_payment()) is None
    assert not await ledger.update_payment(key, PaymentStatus.SETTLING, for_generation="g1",
                                           expected=[PaymentStatus.RESERVED, PaymentStatus.RELEASED])
    assert await ledger.update_payment(key, PaymentStatus.RESERVED, generation_id="g2",
                                       expected=[PaymentStatus.RESERVED])
    assert await ledger.update_payment(key, PaymentStatus.SETTLING, for_generation="g2",
                                       expected=[PaymentStatus.RESERVED, PaymentStatus.RELEASED])
    record = await ledger.payment(key)
    assert record is not None and record.status is PaymentStatus.SETTLING and record.generation_id == "g2"


async def test_stale_only_updates_leave_a_fresh_reservation_alone(ledger: SqlLedger) -> None:
    """Two reconcilers list the same stale reservation; the first releases it, a resend takes it over
    (fresh), and the second reconciler's release must not touch it."""
    key = _payment().key
    await ledger.reserve_payment(_payment())
    await asyncio.sleep(0.05)
    cutoff = datetime.now(UTC)
    assert [p.key for p in await ledger.payments_with_status(PaymentStatus.RESERVED, updated_before=cutoff)] == [key]
    assert await ledger.update_payment(key, PaymentStatus.RELEASED, expected=[PaymentStatus.RESERVED],
                                       updated_before=cutoff)
    assert await ledger.reserve_payment(_payment()) is None  # the resend's takeover
    assert not await ledger.update_payment(key, PaymentStatus.RELEASED, expected=[PaymentStatus.RESERVED],
                                           updated_before=cutoff)
    record = await ledger.payment(key)
    assert record is not None and record.status is PaymentStatus.RESERVED


async def test_records_keep_their_values(ledger: SqlLedger) -> None:
    """Column types hold what the flow stores (PostgreSQL enforces lengths and integer widths)."""
    record = PaymentRecord(
        key="eip155:84532:0x" + "ab" * 20 + ":0x" + "cd" * 32, status=PaymentStatus.RESERVED,
        network="eip155:84532", payer="0x" + "AB" * 20, nonce="0x" + "cd" * 32, pay_to="0x" + "EF" * 20,
        asset="0x" + "12" * 20, amount=2**62, valid_before=2**40, generation_id=None, transaction=None,
        payload={"payload": {"signature": "0x" + "ff" * 65}, "versión": "ü"}, error=None)
    assert await ledger.reserve_payment(record) is None
    assert await ledger.update_payment(record.key, PaymentStatus.SETTLED, transaction="0x" + "aa" * 32,
                                       generation_id="6f1c2a3e-0000-4000-8000-000000000000")
    stored = await ledger.payment(record.key)
    assert stored is not None and stored.amount == 2**62 and stored.payload == record.payload
    assert stored.transaction == "0x" + "aa" * 32
    assert [p.key for p in await ledger.payments_with_status(PaymentStatus.SETTLED)] == [record.key]


@pytest.mark.parametrize("ledger_url", ["postgresql"], indirect=True)
async def test_postgres_timeouts_and_pool_come_from_settings(ledger_url: str) -> None:
    settings = LedgerSettings(url=ledger_url, statement_timeout_s=0.3, lock_timeout_s=0.2, pool_size=3,
                              max_overflow=1)
    ledger = SqlLedger(ledger_url, settings)
    await ledger.start()
    try:
        async with ledger.engine.connect() as connection:
            timeouts = [(await connection.exec_driver_sql(f"SHOW {name}")).scalar()
                        for name in ("statement_timeout", "lock_timeout")]
            assert timeouts == ["300ms", "200ms"]
            started = time.monotonic()
            with pytest.raises(DBAPIError, match="statement timeout"):
                await connection.exec_driver_sql("SELECT pg_sleep(5)")
            assert time.monotonic() - started < 3
        pool = ledger.engine.pool
        assert pool.size() == 3  # type: ignore[attr-defined]
        # The claim's row lock is bounded by lock_timeout: a finisher never hangs behind a stuck one.
        generation_id = await _settling_generation(ledger)
        async def second_finisher() -> None:
            async with ledger.claim_generation(generation_id, [GenerationStatus.SETTLING]):
                pass

        async with ledger.claim_generation(generation_id, [GenerationStatus.SETTLING]) as claim:
            assert claim is not None
            # Another task (another request): its own transaction, waiting for the row lock.
            with pytest.raises(DBAPIError, match="lock timeout"):
                await asyncio.create_task(second_finisher())
    finally:
        await ledger.aclose()
