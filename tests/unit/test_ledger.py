from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from imagegate.ledger import GenerationStatus, PaymentRecord, PaymentStatus, SqlLedger


@pytest.fixture
async def ledger(tmp_path: Path):  # type: ignore[no-untyped-def]
    ledger = SqlLedger(f"sqlite+aiosqlite:///{tmp_path / 'ledger.sqlite3'}")
    await ledger.start()
    yield ledger
    await ledger.aclose()


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
