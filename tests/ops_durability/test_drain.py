"""Graceful shutdown of real ``imagegate serve`` processes on the embedded dev chain.

The simulated GPU renders for a chosen time (``batch_ms``), so a SIGTERM lands mid-generation for sure.
Every test checks the money on chain: charged once for images delivered, never for images not.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imagegate import devchain
from tests.support.payer import SdkPayer
from tests.support.payments import decode_header
from tests.support.serve import SIMULATED, ServeProcess, embedded_config

PAYER = devchain.PAYER_ACCOUNT
PAY_TO = devchain.PAY_TO_ACCOUNT.address
BODY = {"prompt": "a slow red square", "model": SIMULATED, "width": 128, "height": 128, "numberResults": 2}
RUNNING_GENERATION = "SELECT id FROM generations WHERE status = 'running'"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    # 4 steps of 2.5 s: a render is in progress for 10 s.
    server = ServeProcess(tmp_path, embedded_config(tmp_path, batch_ms=10_000, drain_timeout_s=60))
    try:
        yield server
    finally:
        server.cleanup()


async def _payer_transfers(chain: devchain.DevChain) -> list[devchain.TokenTransfer]:
    return [t for t in await chain.token_transfers() if t.sender == PAYER.address and t.recipient == PAY_TO]


async def test_sigterm_mid_generation_finishes_settles_and_exits(serve: ServeProcess) -> None:
    await serve.start_ready()
    chain = await serve.chain()
    anvil = serve.chain_record()
    assert anvil is not None
    try:
        async with httpx.AsyncClient(base_url=serve.url, timeout=120, trust_env=False) as http:
            amount = int((await http.post("/v1/images/estimate", json=BODY)).json()["estimatedCost"]["amount"])
            payer = SdkPayer(PAYER.private_key, max_atomic=amount)
            before = await chain.balance_of(PAYER.address)
            headers = await payer.sign(http, "/v1/images/generate", BODY)
            # A second client got its challenge and signed just before the SIGTERM.
            late_headers = await payer.sign(http, "/v1/images/generate", BODY)
            paid = asyncio.create_task(http.post("/v1/images/generate", json=BODY, headers=headers))
            await serve.wait_for_ledger(RUNNING_GENERATION)
            serve.send(signal.SIGTERM)
            signalled = time.monotonic()

            # Draining: health says so, new paid work is refused before any payment step.
            health = await _wait_draining(http)
            assert health.json()["details"]["paidWorkInFlight"] == 1 and int(health.headers["retry-after"]) > 0
            unpaid = await http.post("/v1/images/generate", json=BODY)
            assert unpaid.status_code == 503 and unpaid.json()["error"] == "SERVER_DRAINING", unpaid.text
            assert int(unpaid.headers["retry-after"]) > 0 and "PAYMENT-REQUIRED" not in unpaid.headers
            late = await http.post("/v1/images/generate", json=BODY, headers=late_headers)
            assert late.status_code == 503 and late.json()["error"] == "SERVER_DRAINING"

            # The paid generation finishes, settles and answers.
            response = await paid
            assert response.status_code == 200, response.text
            images = response.json()["images"]
            assert len(images) == 2
            assert response.json()["cost"]["amount"] == str(amount)
        code = await serve.wait_exit(60)
        assert code in (0, -signal.SIGTERM), serve.log_tail()
        assert time.monotonic() - signalled < 60
    finally:
        await chain.stop()
    # The clean stop ended the dev chain too, which wrote its state on the way: charged exactly once;
    # the late payment was not even reserved, and it is still unused.
    assert not anvil.alive() and serve.chain_record() is None
    assert serve.ledger_rows("SELECT count(*) FROM payments") == [(1,)]
    async with serve.stopped_chain() as chain:
        assert await chain.balance_of(PAYER.address) == before - amount
        assert [t.value for t in await _payer_transfers(chain)] == [amount]
        late_nonce = decode_header(late_headers["PAYMENT-SIGNATURE"])["payload"]["authorization"]["nonce"]
        assert not await chain.authorization_state(PAYER.address, bytes.fromhex(late_nonce[2:]))


async def test_a_grace_too_short_cancels_releases_and_the_resend_works_after_restart(serve: ServeProcess) -> None:
    serve.config.write_text(embedded_config(serve.root, batch_ms=40_000, drain_timeout_s=1))
    await serve.start_ready()
    chain = await serve.chain()
    try:
        async with httpx.AsyncClient(base_url=serve.url, timeout=120, trust_env=False) as http:
            amount = int((await http.post("/v1/images/estimate", json=BODY)).json()["estimatedCost"]["amount"])
            payer = SdkPayer(PAYER.private_key, max_atomic=amount)
            before = await chain.balance_of(PAYER.address)
            headers = await payer.sign(http, "/v1/images/generate", BODY)
            paid = asyncio.create_task(http.post("/v1/images/generate", json=BODY, headers=headers))
            await serve.wait_for_ledger(RUNNING_GENERATION)
            serve.send(signal.SIGTERM)
            signalled = time.monotonic()
            cut = await paid
        assert cut.status_code == 503 and cut.json()["error"] == "SERVER_DRAINING", cut.text
        assert int(cut.headers["retry-after"]) > 0
        code = await serve.wait_exit(60)
        # Cut at the end of the 1 s grace: long before the render's 40 s.
        assert code in (0, -signal.SIGTERM) and time.monotonic() - signalled < 20, serve.log_tail()
    finally:
        await chain.stop()
    assert serve.ledger_rows("SELECT status FROM payments") == [("released",)]
    assert serve.ledger_rows("SELECT status FROM generations") == [("failed",)]
    assert not serve.staging_dir.exists() or not any(serve.staging_dir.iterdir())
    async with serve.stopped_chain() as chain:
        assert await chain.balance_of(PAYER.address) == before
        assert await _payer_transfers(chain) == []

    # After a restart (faster renders now), the same payment buys the images, charged once.
    serve.config.write_text(embedded_config(serve.root, batch_ms=200, drain_timeout_s=1))
    await serve.start_ready()
    chain = await serve.chain()
    try:
        async with httpx.AsyncClient(base_url=serve.url, timeout=120, trust_env=False) as http:
            resent = await http.post("/v1/images/generate", json=BODY, headers=headers)
            assert resent.status_code == 200, resent.text
            for image in resent.json()["images"]:
                assert (await http.get(image["url"])).status_code == 200
        assert await chain.balance_of(PAYER.address) == before - amount
        assert [t.value for t in await _payer_transfers(chain)] == [amount]
    finally:
        await chain.stop()
        assert await serve.stop() in (0, -signal.SIGTERM)


async def _wait_draining(http: httpx.AsyncClient) -> httpx.Response:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = await http.get("/healthz")
        if health.status_code == 503:
            assert health.json()["details"]["status"] == "draining"
            return health
        await asyncio.sleep(0.05)
    raise TimeoutError("the server never reported draining")
