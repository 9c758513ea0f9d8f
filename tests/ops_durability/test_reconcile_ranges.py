"""Reconciliation on chains that refuse long log ranges: ``AuthorizationUsed`` is looked up from the
payment's own time (the block after ``validAfter``, by binary search on block timestamps), in chunks
of ``[payments] reconcile_log_range`` blocks, through a loopback RPC that refuses anything longer,
on an anvil chain many ranges long.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_utils.abi import function_signature_to_4byte_selector

from imagegate import devchain
from imagegate.app import app_from_settings
from imagegate.ledger import PaymentStatus, SqlLedger
from imagegate.payments.chain import ChainReader, TransferState
from imagegate.payments.facilitator_server import create_facilitator_app
from imagegate.payments.facilitators import BuiltinFacilitator
from tests.integration.conftest import network_payments
from tests.support.payments import Terms, decode_header, sign, v2_header
from tests.support.rpc_proxy import RangeLimitedRpc, range_limited_rpc
from tests.support.serve import SIMULATED
from tests.support.server import live_server

PAYER = devchain.PAYER_ACCOUNT
PAY_TO = devchain.PAY_TO_ACCOUNT.address
USDC = devchain.USDC_ADDRESS
MAX_RANGE = 50


@pytest.fixture(scope="module")
async def chain() -> AsyncIterator[devchain.DevChain]:
    async with devchain.DevChain() as running:
        yield running


@pytest.fixture
def rpc(chain: devchain.DevChain) -> Iterator[RangeLimitedRpc]:
    with range_limited_rpc(chain.rpc_url, MAX_RANGE) as proxy:
        yield proxy


async def mine(chain: devchain.DevChain, blocks: int, interval_s: int = 1) -> None:
    await chain.rpc("anvil_mine", hex(blocks), hex(interval_s))


async def transfer_on_chain(chain: devchain.DevChain, terms: Terms) -> tuple[dict[str, Any], str]:
    """Signs ``terms`` as a client would and settles them as a facilitator would; returns (payload, tx)."""
    payload = sign(terms)
    authorization = payload["authorization"]
    calldata = devchain.encode_transfer_with_authorization(
        sender=authorization["from"], to=authorization["to"], value=int(authorization["value"]),
        valid_after=int(authorization["validAfter"]), valid_before=int(authorization["validBefore"]),
        nonce=bytes.fromhex(authorization["nonce"][2:]), signature=bytes.fromhex(payload["signature"][2:]))
    return payload, await chain.send_transaction(USDC, calldata)


async def test_a_settlement_is_found_in_bounded_chunks_from_its_own_time(chain: devchain.DevChain,
                                                                        rpc: RangeLimitedRpc) -> None:
    await mine(chain, 6 * MAX_RANGE)  # history before the payment: many ranges long
    now = await chain.latest_block_timestamp()
    terms = Terms(1234, valid_after=now - 1, valid_before=now + 3600)
    payload, transaction = await transfer_on_chain(chain, terms)
    transfer_block = int((await chain.transaction_receipt(transaction) or {})["blockNumber"], 16)
    await mine(chain, 4 * MAX_RANGE + 7)  # and after it

    # What reconciliation used to ask (block 0 to latest) is refused, as public endpoints do.
    reader = ChainReader(rpc.url, log_range=MAX_RANGE)
    try:
        with pytest.raises(Exception, match="limited to a 50 block range"):
            await reader._rpc("eth_getLogs", {"address": USDC, "fromBlock": "0x0", "toBlock": "latest"})
        rpc.log_ranges.clear()
        state, found = await reader.transfer_state(USDC, PAYER.address, payload["authorization"]["nonce"], None,
                                                   valid_after=terms.valid_after or 0,
                                                   valid_before=terms.valid_before)
    finally:
        await reader.aclose()
    assert (state, found) == (TransferState.SETTLED, transaction)
    assert rpc.log_ranges and all(end - start + 1 <= MAX_RANGE for start, end in rpc.log_ranges)
    # It started where the payment became valid, not at block 0, and stopped at the transfer.
    first_start = rpc.log_ranges[0][0]
    assert 6 * MAX_RANGE <= first_start <= transfer_block
    assert rpc.log_ranges[-1][0] <= transfer_block <= rpc.log_ranges[-1][1]


async def test_unused_and_cancelled_authorizations(chain: devchain.DevChain, rpc: RangeLimitedRpc) -> None:
    now = await chain.latest_block_timestamp()
    reader = ChainReader(rpc.url, log_range=MAX_RANGE)
    try:
        unused = Terms(5, valid_after=now - 10, valid_before=now + 3600)
        state, _ = await reader.transfer_state(USDC, PAYER.address, "0x" + unused.nonce.hex(), None,
                                               valid_after=now - 10, valid_before=now + 3600)
        assert state is TransferState.UNKNOWN  # not on chain (yet): never guessed as failed

        cancelled = Terms(5, valid_after=now - 10, valid_before=now + 3600)
        await cancel_authorization(chain, cancelled.nonce)
        await mine(chain, 3 * MAX_RANGE)
        state, _ = await reader.transfer_state(USDC, PAYER.address, "0x" + cancelled.nonce.hex(), None,
                                               valid_after=now - 10, valid_before=now + 3600)
        assert state is TransferState.FAILED  # used, by no transfer in the window: cancelled, no money moved
    finally:
        await reader.aclose()
    assert all(end - start + 1 <= MAX_RANGE for start, end in rpc.log_ranges)


async def cancel_authorization(chain: devchain.DevChain, nonce: bytes) -> None:
    domain = devchain.transfer_authorization_typed_data(sender=PAYER.address, to=PAY_TO, value=0, valid_after=0,
                                                        valid_before=0, nonce=bytes(32))
    typed = {"types": {"EIP712Domain": domain["types"]["EIP712Domain"],
                       "CancelAuthorization": [{"name": "authorizer", "type": "address"},
                                               {"name": "nonce", "type": "bytes32"}]},
             "primaryType": "CancelAuthorization", "domain": domain["domain"],
             "message": {"authorizer": PAYER.address, "nonce": nonce}}
    signature = Account.sign_typed_data(PAYER.private_key, full_message=typed).signature
    selector = function_signature_to_4byte_selector("cancelAuthorization(address,bytes32,bytes)")
    calldata = "0x" + selector.hex() + abi_encode(["address", "bytes32", "bytes"],
                                                  [PAYER.address, nonce, bytes(signature)]).hex()
    await chain.send_transaction(USDC, calldata)


# --- the whole flow over HTTP: a lost settlement answer, found by its logs ------------------------


def slow_settle(upstream: str, delay_s: float) -> Any:
    """A facilitator front that settles for real but answers /settle too late: the hash is lost."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def forward(request: Request) -> Response:
        async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
            answer = await client.request(request.method, f"{upstream}{request.url.path}",
                                          content=await request.body(), headers={"content-type": "application/json"})
        if request.url.path == "/settle":
            await asyncio.sleep(delay_s)
        return Response(answer.content, status_code=answer.status_code, media_type="application/json")

    return Starlette(routes=[Route(path, forward, methods=["GET", "POST"]) for path in ("/verify", "/settle",
                                                                                        "/supported")])


async def test_a_lost_settlement_answer_is_reconciled_through_a_range_limited_rpc(tmp_path: Path) -> None:
    async with devchain.DevChain() as chain:
        with range_limited_rpc(chain.rpc_url, MAX_RANGE) as rpc:
            await _lost_answer_reconciled(chain, rpc, tmp_path)


async def _lost_answer_reconciled(chain: devchain.DevChain, rpc: RangeLimitedRpc, tmp_path: Path) -> None:
    facilitator = BuiltinFacilitator(devchain.FACILITATOR_ACCOUNT.private_key, chain.rpc_url, [devchain.NETWORK_V2],
                                     confirmation_timeout_s=30)
    # History before the payment, with the chain's clock kept at the wall clock's (the payment's
    # validity is wall-clock time).
    await mine(chain, 5 * MAX_RANGE, interval_s=0)
    with live_server(create_facilitator_app(facilitator, bearer_token=None)) as facilitator_url, \
            live_server(slow_settle(facilitator_url, delay_s=4)) as slow_url:
        payments = network_payments(tmp_path, chain.rpc_url, kind="http", url=slow_url, timeout_s=2)
        payments.update(reconcile_rpc_url=rpc.url, reconcile_log_range=MAX_RANGE, reconcile_interval_s=3600)
        from imagegate.config import load_settings

        settings = load_settings(data_dir=tmp_path / "data", storage={"directory": str(tmp_path / "images")},
                                 models={SIMULATED: {"enabled": True}},
                                 payments=payments)
        body = {"prompt": "a blue square", "model": SIMULATED, "width": 128, "height": 128}
        with live_server(app_from_settings(settings)) as base_url:
            async with httpx.AsyncClient(base_url=base_url, timeout=120, trust_env=False) as http:
                amount = int((await http.post("/v1/images/estimate", json=body)).json()["estimatedCost"]["amount"])
                await asyncio.sleep(2.1)  # the payment becomes valid after every block mined so far
                terms = Terms(amount, valid_after=int(time.time()) - 1)
                await chain.mine()  # a block at the wall clock's time, in which it is valid
                headers = v2_header(terms, sign(terms))
                pending = await http.post("/v1/images/generate", json=body, headers=headers)
                assert pending.status_code == 202 and pending.json()["error"] == "SETTLEMENT_PENDING", pending.text
                await mine(chain, 2 * MAX_RANGE, interval_s=0)  # blocks keep coming after the transfer
                rpc.log_ranges.clear()
                resent = await http.post("/v1/images/generate", json=body, headers=headers)
                assert resent.status_code == 200, resent.text
                receipt = decode_header(resent.headers["PAYMENT-RESPONSE"])
                assert receipt["success"] is True and receipt["transaction"].startswith("0x")
                assert (await http.get(resent.json()["images"][0]["url"])).status_code == 200
    assert rpc.log_ranges and all(end - start + 1 <= MAX_RANGE for start, end in rpc.log_ranges)
    assert min(start for start, _ in rpc.log_ranges) >= 5 * MAX_RANGE
    ledger = SqlLedger(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'ledger.sqlite3'}")
    await ledger.start()
    try:
        (record,) = await ledger.payments_with_status(PaymentStatus.SETTLED)
        assert record.transaction == receipt["transaction"]
    finally:
        await ledger.aclose()
    transfers = [t for t in await chain.token_transfers() if t.transaction_hash == receipt["transaction"]]
    assert [(t.sender, t.recipient, t.value) for t in transfers] == [(PAYER.address, PAY_TO, amount)]
