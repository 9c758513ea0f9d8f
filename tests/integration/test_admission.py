"""Admission before payment: a model whose queue is full answers 503 MODEL_BUSY before any payment
step, the client's signed payment stays unspent, and the same payment works once there is room.
Real server on loopback, real dev chain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from imagegate import devchain
from imagegate.app import app_from_settings
from imagegate.ledger import PaymentStatus, SqlLedger
from tests.integration.conftest import network_payments, tiny_settings
from tests.support.payments import Terms, sign, v1_header, v2_header
from tests.support.server import live_server

PAYER = devchain.PAYER_ACCOUNT
# One render at a time and nobody waiting: a second request finds the model busy.
SLOW = {"prompt": "a slow render", "model": "bench-simulated", "width": 128, "height": 128}


@pytest.fixture(scope="module")
async def busy_api(chain: devchain.DevChain, tmp_path_factory: pytest.TempPathFactory,
                   tiny_model_paths: dict[str, Path]) -> AsyncIterator[tuple[httpx.AsyncClient, Path]]:
    root = tmp_path_factory.mktemp("admission")
    settings = tiny_settings(
        root, tiny_model_paths, payments=network_payments(root, chain.rpc_url),
        workers={"max_queue": 0},
        models={"bench-simulated": {"enabled": True, "options": {"batch_ms": 2500}}},
    )
    with live_server(app_from_settings(settings)) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=120, trust_env=False) as client:
            yield client, root / "ledger.sqlite3"


async def amount_of(client: httpx.AsyncClient) -> int:
    response = await client.post("/v1/images/estimate", json=SLOW)
    return int(response.json()["estimatedCost"]["amount"])


async def test_a_full_queue_is_model_busy_before_any_payment_step(
        busy_api: tuple[httpx.AsyncClient, Path], chain: devchain.DevChain) -> None:
    client, ledger_file = busy_api
    amount = await amount_of(client)
    first_terms, waiting_terms = Terms(amount), Terms(amount)
    before = await chain.balance_of(PAYER.address)
    first = asyncio.create_task(client.post("/v1/images/generate", json=SLOW,
                                            headers=v2_header(first_terms, sign(first_terms))))
    for _ in range(200):  # until the first render holds the model
        probe = await client.post("/v1/images/generate", json=SLOW)
        if probe.status_code == 503:
            break
        assert probe.status_code == 402
        await asyncio.sleep(0.02)
    # No payment header: busy instead of a challenge nobody could use now.
    assert probe.json()["error"] == "MODEL_BUSY" and int(probe.headers["retry-after"]) >= 1
    assert "PAYMENT-REQUIRED" not in probe.headers

    # A signed payment: refused before verification, never settled, recorded as released.
    waiting_headers = v1_header(waiting_terms, sign(waiting_terms))
    busy = await client.post("/v1/images/generate", json=SLOW, headers=waiting_headers)
    assert busy.status_code == 503 and busy.json()["error"] == "MODEL_BUSY", busy.text
    assert busy.json()["details"]["model"] == "bench-simulated"

    done = await first
    assert done.status_code == 200, done.text
    ledger = SqlLedger(f"sqlite+aiosqlite:///{ledger_file}")
    try:
        key = f"{devchain.NETWORK_V2}:{PAYER.address.lower()}:0x{waiting_terms.nonce.hex()}"
        record = await ledger.payment(key)
        assert record is not None and record.status is PaymentStatus.RELEASED
    finally:
        await ledger.aclose()

    # The same signed payment buys the images once the model has room; charged once each.
    retried = await client.post("/v1/images/generate", json=SLOW, headers=waiting_headers)
    assert retried.status_code == 200, retried.text
    assert await chain.balance_of(PAYER.address) == before - 2 * amount


async def test_a_resent_paid_request_is_answered_even_while_the_model_is_busy(
        busy_api: tuple[httpx.AsyncClient, Path]) -> None:
    client, _ = busy_api
    amount = await amount_of(client)
    paid_terms, blocker_terms = Terms(amount), Terms(amount)
    paid_headers = v2_header(paid_terms, sign(paid_terms))
    paid = await client.post("/v1/images/generate", json=SLOW, headers=paid_headers)
    assert paid.status_code == 200, paid.text
    blocker = asyncio.create_task(client.post("/v1/images/generate", json=SLOW,
                                              headers=v2_header(blocker_terms, sign(blocker_terms))))
    for _ in range(200):
        if (await client.post("/v1/images/generate", json=SLOW)).status_code == 503:
            break
        await asyncio.sleep(0.02)
    # A settled payment needs no new work: its images come back, busy or not.
    again = await client.post("/v1/images/generate", json=SLOW, headers=paid_headers)
    assert again.status_code == 200 and again.json()["id"] == paid.json()["id"]
    assert (await blocker).status_code == 200
