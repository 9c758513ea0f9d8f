"""The builtin facilitator on a real anvil: local verification against the SDK's own, and settlement
with many transactions in flight, several gas keys, and transactions dropped or replaced in the mempool.

Mining is switched to manual (``evm_setAutomine false``) where a test needs transactions to wait in
the mempool; each test restores automine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from eth_account import Account
from x402 import x402FacilitatorSync
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import register_exact_evm_facilitator
from x402.schemas import PaymentPayload, PaymentRequirements

from imagegate import devchain
from imagegate.payments import eip3009
from imagegate.payments.chain import ChainReader, TransferState
from imagegate.payments.facilitators import BuiltinFacilitator
from tests.support.payments import Terms, mining_paused, sign

AMOUNT = 1234
PAYER = devchain.PAYER_ACCOUNT
# Gas accounts of their own (anvil accounts 4-6), so that nonces are not shared with other tests.
GAS_KEYS = ["0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
            "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
            "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e"]


@pytest.fixture(scope="module")
async def chain() -> AsyncIterator[devchain.DevChain]:
    async with devchain.DevChain() as running:
        yield running


@pytest.fixture
async def manual_mining(chain: devchain.DevChain) -> AsyncIterator[None]:
    async with mining_paused(chain):
        yield


def requirements(amount: int = AMOUNT) -> PaymentRequirements:
    return PaymentRequirements(scheme="exact", network=devchain.NETWORK_V2, asset=devchain.USDC_ADDRESS,
                               amount=str(amount), pay_to=devchain.PAY_TO_ACCOUNT.address, max_timeout_seconds=300,
                               extra={"name": devchain.TOKEN_NAME, "version": devchain.TOKEN_VERSION})


def payment(terms: Terms | None = None, **sign_options: Any) -> PaymentPayload:
    terms = terms or Terms(AMOUNT)
    return PaymentPayload.model_validate({
        "x402Version": 2,
        "accepted": requirements(terms.amount).model_dump(by_alias=True),
        "payload": sign(terms, **sign_options),
    })


def facilitator(chain: devchain.DevChain, keys: list[str] | None = None, **options: Any) -> BuiltinFacilitator:
    return BuiltinFacilitator(keys or GAS_KEYS[:1], chain.rpc_url, [devchain.NETWORK_V2],
                              confirmation_timeout_s=options.pop("confirmation_timeout_s", 60), **options)


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached in {timeout_s} s: {what}")
        await asyncio.sleep(0.02)


async def in_mempool(chain: devchain.DevChain, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        status = await chain.rpc("txpool_status")
        return int(status["pending"], 16) >= count
    return check


async def test_verification_gives_the_sdk_facilitators_answers(chain: devchain.DevChain) -> None:
    """Local verification (signature recovered here, one simulation) against the SDK's facilitator."""
    ours = facilitator(chain)
    reference = x402FacilitatorSync()
    register_exact_evm_facilitator(reference, FacilitatorWeb3Signer(private_key=GAS_KEYS[0], rpc_url=chain.rpc_url),
                                   networks=devchain.NETWORK_V2)
    used = Terms(AMOUNT)
    settled = await ours.settle(payment(used), requirements())
    assert settled.success, settled
    now = int(time.time())
    cases = {
        "valid": payment(),
        "recipient": payment(Terms(AMOUNT, pay_to=devchain.PAYER_ACCOUNT.address)),
        "amount": payment(Terms(AMOUNT + 1)),
        "expired": payment(Terms(AMOUNT, valid_before=now + 3)),
        "not yet valid": payment(Terms(AMOUNT, valid_after=now + 600)),
        "forged": payment(signer_key=Account.create().key.hex()),
        "no money": payment(private_key=Account.create().key.hex()),
        "nonce used": payment(used),
    }
    try:
        for name, case in cases.items():
            mine = await ours.verify(case, requirements())
            theirs = await asyncio.to_thread(reference.verify, case, requirements())
            assert (mine.is_valid, mine.invalid_reason) == (theirs.is_valid, theirs.invalid_reason), name
            assert mine.payer == theirs.payer, name
        assert (await ours.verify(cases["valid"], requirements())).is_valid
    finally:
        await ours.aclose()


@pytest.mark.parametrize("sync_send", [None, False], ids=["send-and-wait", "polled"])
async def test_many_settlements_in_flight_from_one_gas_account(chain: devchain.DevChain, manual_mining: None,
                                                               sync_send: bool | None) -> None:
    ours = facilitator(chain, sync_send=sync_send)
    before = await chain.balance_of(PAYER.address)
    try:
        settlements = [asyncio.create_task(ours.settle(payment(), requirements())) for _ in range(10)]
        # All ten are in the mempool before any is mined: nothing waits on another's receipt.
        await wait_until(await in_mempool(chain, 10), what="ten settlements in the mempool")
        await chain.mine()
        results = await asyncio.wait_for(asyncio.gather(*settlements), 60)
    finally:
        await ours.aclose()
    assert all(result.success for result in results), results
    receipts = [await chain.transaction_receipt(result.transaction) for result in results]
    assert all(receipt is not None for receipt in receipts)
    assert len({receipt["blockNumber"] for receipt in receipts if receipt}) == 1, "one block for all ten"
    assert await chain.balance_of(PAYER.address) == before - 10 * AMOUNT


async def test_several_gas_keys_share_the_settlements(chain: devchain.DevChain, manual_mining: None) -> None:
    ours = facilitator(chain, keys=GAS_KEYS)
    try:
        settlements = [asyncio.create_task(ours.settle(payment(), requirements())) for _ in range(9)]
        await wait_until(await in_mempool(chain, 9), what="nine settlements in the mempool")
        await chain.mine()
        results = await asyncio.wait_for(asyncio.gather(*settlements), 60)
    finally:
        await ours.aclose()
    assert all(result.success for result in results)
    senders = {(await chain.rpc("eth_getTransactionByHash", result.transaction))["from"].lower()
               for result in results}
    assert senders == {Account.from_key(key).address.lower() for key in GAS_KEYS}


@pytest.mark.parametrize("sync_send", [None, False], ids=["send-and-wait", "polled"])
async def test_a_settlement_dropped_from_the_mempool_is_broadcast_again(
        chain: devchain.DevChain, manual_mining: None, sync_send: bool | None) -> None:
    ours = facilitator(chain, keys=GAS_KEYS[1:2], sync_send=sync_send)
    ours.sender.sync_wait_s = 1.0  # anvil would hold a send-and-wait call for its 30 s
    before = await chain.balance_of(PAYER.address)
    try:
        settlement = asyncio.create_task(ours.settle(payment(), requirements()))
        await wait_until(await in_mempool(chain, 1), what="the settlement in the mempool")
        (tx_hash,) = await pending_hashes(chain)
        assert await chain.rpc("anvil_dropTransaction", tx_hash) == tx_hash
        assert await chain.rpc("eth_getTransactionByHash", tx_hash) is None

        async def back_and_mined() -> bool:
            await chain.mine()  # empty blocks until the watcher notices, then the one with it
            return settlement.done()
        await wait_until(back_and_mined, what="the dropped settlement broadcast again and mined")
        result = settlement.result()
    finally:
        await ours.aclose()
    assert result.success and result.transaction == tx_hash, result
    assert await chain.balance_of(PAYER.address) == before - AMOUNT


async def test_a_settlement_whose_nonce_was_taken_is_sent_again(chain: devchain.DevChain,
                                                                manual_mining: None) -> None:
    """Another transaction from the gas account replaced the settlement (same nonce, higher fee)."""
    gas_key = GAS_KEYS[2]
    ours = facilitator(chain, keys=[gas_key], sync_send=False)
    before = await chain.balance_of(PAYER.address)
    try:
        settlement = asyncio.create_task(ours.settle(payment(), requirements()))
        await wait_until(await in_mempool(chain, 1), what="the settlement in the mempool")
        (tx_hash,) = await pending_hashes(chain)
        original = await chain.rpc("eth_getTransactionByHash", tx_hash)
        gas = Account.from_key(gas_key)
        replacement = gas.sign_transaction({
            "type": 2, "chainId": devchain.CHAIN_ID, "nonce": int(original["nonce"], 16), "to": gas.address,
            "value": 0, "gas": 21_000, "maxFeePerGas": 3 * int(original["maxFeePerGas"], 16),
            "maxPriorityFeePerGas": 3 * int(original["maxPriorityFeePerGas"], 16)})
        await chain.rpc("eth_sendRawTransaction", "0x" + bytes(replacement.raw_transaction).hex())
        await chain.mine()
        assert await chain.transaction_receipt(tx_hash) is None, "the settlement was replaced"

        async def settled() -> bool:
            await chain.mine()
            return settlement.done()
        await wait_until(settled, what="the settlement sent again under a new nonce and mined")
        result = settlement.result()
    finally:
        await ours.aclose()
    assert result.success and result.transaction != tx_hash, result
    assert await chain.balance_of(PAYER.address) == before - AMOUNT


async def test_a_settlement_stuck_under_the_base_fee_is_replaced_with_higher_fees(
        chain: devchain.DevChain, manual_mining: None) -> None:
    """The base fee jumps above the settlement's fee cap (anvil then evicts it; other nodes keep it)."""
    ours = facilitator(chain, keys=GAS_KEYS[:1], sync_send=False)
    try:
        settlement = asyncio.create_task(ours.settle(payment(), requirements()))
        await wait_until(await in_mempool(chain, 1), what="the settlement in the mempool")
        (tx_hash,) = await pending_hashes(chain)
        stuck = await chain.rpc("eth_getTransactionByHash", tx_hash)
        max_fee, nonce = int(stuck["maxFeePerGas"], 16), int(stuck["nonce"], 16)
        await chain.rpc("anvil_setNextBlockBaseFeePerGas", hex(max_fee * 2))
        await chain.mine()
        assert await chain.transaction_receipt(tx_hash) is None, "priced out of the block"

        async def settled() -> bool:
            await chain.rpc("anvil_setNextBlockBaseFeePerGas", hex(max_fee * 2))  # and it stays out
            await chain.mine()
            return settlement.done()
        await wait_until(settled, what="the settlement replaced with higher fees and mined")
        result = settlement.result()
    finally:
        await ours.aclose()
    assert result.success and result.transaction != tx_hash, result
    mined = await chain.rpc("eth_getTransactionByHash", result.transaction)
    assert int(mined["nonce"], 16) == nonce and int(mined["maxFeePerGas"], 16) > max_fee, "the same nonce, re-priced"


async def test_a_settlement_not_mined_in_time_is_pending_and_reconciled(chain: devchain.DevChain,
                                                                        manual_mining: None) -> None:
    ours = facilitator(chain, keys=GAS_KEYS[1:2], confirmation_timeout_s=1.5)
    ours.sender.sync_wait_s = 0.5
    terms = Terms(AMOUNT)
    try:
        result = await ours.settle(payment(terms), requirements())
        assert not result.success and result.error_reason == "settlement_pending" and result.transaction, result
        reader = ChainReader(chain.rpc_url)
        try:
            state, _ = await reader.transfer_state(devchain.USDC_ADDRESS, PAYER.address, "0x" + terms.nonce.hex(),
                                                   result.transaction)
            assert state is TransferState.UNKNOWN
            await chain.mine()
            state, transaction = await reader.transfer_state(devchain.USDC_ADDRESS, PAYER.address,
                                                             "0x" + terms.nonce.hex(), None,
                                                             valid_before=int(time.time()) + 300)
            assert state is TransferState.SETTLED and transaction == result.transaction
        finally:
            await reader.aclose()
    finally:
        await ours.aclose()


async def pending_hashes(chain: devchain.DevChain) -> list[str]:
    content = await chain.rpc("txpool_content")
    return [tx["hash"] for by_nonce in content["pending"].values() for tx in by_nonce.values()]


def test_calldata_and_digest_match_the_reference_encoders() -> None:
    from eth_account.messages import encode_typed_data
    from eth_utils.crypto import keccak

    terms = Terms(AMOUNT)
    authorization = eip3009.TransferAuthorization.from_payload(sign(terms))
    for signature in (authorization.signature, authorization.signature + b"\x01\x02\x03"):
        signed = eip3009.TransferAuthorization(**{**authorization.__dict__, "signature": signature})
        assert eip3009.transfer_calldata(signed) == devchain.encode_transfer_with_authorization(
            sender=signed.sender, to=signed.to, value=signed.value, valid_after=signed.valid_after,
            valid_before=signed.valid_before, nonce=signed.nonce, signature=signature)
    typed = devchain.transfer_authorization_typed_data(
        sender=authorization.sender, to=authorization.to, value=authorization.value,
        valid_after=authorization.valid_after, valid_before=authorization.valid_before, nonce=authorization.nonce)
    message = encode_typed_data(full_message=typed)
    digest = eip3009.digest(authorization, name=devchain.TOKEN_NAME, version=devchain.TOKEN_VERSION,
                            chain_id=devchain.CHAIN_ID, token=devchain.USDC_ADDRESS)
    assert digest == keccak(b"\x19" + message.version + message.header + message.body)
    assert eip3009.recover_signer(digest, authorization.signature) == PAYER.address.lower()
    assert eip3009.recover_signer(digest, authorization.signature[:64] + b"\x05") is None


def test_transactions_are_signed_as_eth_account_signs_them() -> None:
    from imagegate.payments.rpc import JsonRpc
    from imagegate.payments.sender import Fees, GasAccount, TransactionSender

    sender = TransactionSender(JsonRpc("http://127.0.0.1:9"), GAS_KEYS[:1], chain_id=devchain.CHAIN_ID)
    gas_account = GasAccount(Account.from_key(GAS_KEYS[0]))
    data = eip3009.transfer_calldata(eip3009.TransferAuthorization.from_payload(sign(Terms(AMOUNT))))
    for fees in (Fees(3 * 10**9, 10**9), Fees(2 * 10**9, 0, legacy=True)):
        raw, tx_hash = sender._sign(gas_account, 7, devchain.USDC_ADDRESS, data, fees)
        transaction: dict[str, Any] = {"nonce": 7, "to": devchain.USDC_ADDRESS, "data": data, "value": 0,
                                       "gas": sender.gas_limit, "chainId": devchain.CHAIN_ID}
        if fees.legacy:
            transaction["gasPrice"] = fees.max_fee
        else:
            transaction.update(type=2, maxFeePerGas=fees.max_fee, maxPriorityFeePerGas=fees.priority_fee)
        reference = Account.from_key(GAS_KEYS[0]).sign_transaction(transaction)
        assert (raw, tx_hash) == ("0x" + bytes(reference.raw_transaction).hex(), "0x" + bytes(reference.hash).hex())
