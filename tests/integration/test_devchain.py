"""The embedded dev chain and its test token, checked against a real anvil.

Payments here are signed with eth-account exactly as x402 clients sign them, and submitted the way
facilitators submit them, so every revert string the x402 SDKs map is exercised on chain.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils.abi import function_signature_to_4byte_selector

from imagegate.devchain import (
    ADMIN_ACCOUNT,
    ANVIL_MNEMONIC,
    CHAIN_ID,
    FACILITATOR_ACCOUNT,
    PAY_TO_ACCOUNT,
    PAYER_ACCOUNT,
    TOKEN_NAME,
    TOKEN_VERSION,
    TRANSFER_WITH_AUTHORIZATION_BYTES_SELECTOR,
    TRANSFER_WITH_AUTHORIZATION_VRS_SELECTOR,
    USDC_ADDRESS,
    WELL_KNOWN_TEST_ADDRESSES,
    WELL_KNOWN_TEST_KEYS,
    AnvilNotFoundError,
    DevChain,
    DevChainError,
    RpcError,
    encode_transfer_with_authorization,
    find_anvil,
    is_well_known_test_key,
    load_token_artifact,
    transfer_authorization_typed_data,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
OTHER_KEY = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6"  # anvil account 3
HOUR = 3600


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def chain() -> AsyncIterator[DevChain]:
    async with DevChain() as running:
        yield running


def sign_authorization(
    private_key: str,
    *,
    to: str = PAY_TO_ACCOUNT.address,
    value: int = 10_000,
    valid_after: int = 0,
    valid_before: int,
    nonce: bytes | None = None,
    domain_name: str = TOKEN_NAME,
    primary_type: str = "TransferWithAuthorization",
) -> dict[str, Any]:
    """A signed EIP-3009 authorization as x402 clients produce it; returns calldata fields."""
    sender = Account.from_key(private_key).address
    fields: dict[str, Any] = {
        "sender": sender,
        "to": to,
        "value": value,
        "valid_after": valid_after,
        "valid_before": valid_before,
        "nonce": nonce if nonce is not None else secrets.token_bytes(32),
    }
    typed = transfer_authorization_typed_data(**fields)
    typed["domain"]["name"] = domain_name
    # ReceiveWithAuthorization has the same fields under another type name (and typehash).
    typed["types"][primary_type] = typed["types"].pop("TransferWithAuthorization")
    typed["primaryType"] = primary_type
    signed = Account.sign_typed_data(private_key, full_message=typed)
    return {**fields, "signature": bytes(signed.signature)}


async def chain_now(chain: DevChain) -> int:
    return await chain.latest_block_timestamp()


async def expect_revert(chain: DevChain, calldata: str, reason: str) -> None:
    with pytest.raises(RpcError) as raised:
        await chain.call(USDC_ADDRESS, calldata, sender=ADMIN_ACCOUNT.address)
    assert reason in raised.value.message


def authorization_fields(authorization: dict[str, Any]) -> list[Any]:
    return [authorization[k] for k in ("sender", "to", "value", "valid_after", "valid_before", "nonce")]


def contract_call(signature: str, args: list[Any]) -> str:
    """Calldata for ``signature`` (e.g. ``"f(address,uint256)"``) with ``args``."""
    arg_types = signature[signature.index("(") + 1 : -1].split(",") if not signature.endswith("()") else []
    return "0x" + function_signature_to_4byte_selector(signature).hex() + abi_encode(arg_types, args).hex()


async def call_view(chain: DevChain, signature: str, types: list[str]) -> Any:
    return abi_decode(types, await chain.call(USDC_ADDRESS, contract_call(signature, [])))


# ---------------------------------------------------------------- artifact and constants


def test_artifact_matches_source() -> None:
    node = shutil.which("node")
    assert node is not None, "node is required: the test setup installs it"
    assert (REPO_ROOT / "node_modules" / "solc").is_dir(), "run `npm ci` in the repository root"
    check = subprocess.run(
        [node, "scripts/compile_contracts.mjs", "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 0, check.stderr

    artifact = load_token_artifact()
    source = (REPO_ROOT / "contracts" / "TestUSDC.sol").read_bytes()
    assert artifact.source_sha256 == hashlib.sha256(source).hexdigest()
    committed = json.loads((REPO_ROOT / "src/imagegate/contracts/TestUSDC.json").read_text())
    assert artifact.deployed_bytecode == committed["deployedBytecode"]
    assert artifact.compiler.startswith("0.8.")


def test_well_known_keys_are_anvils_default_accounts() -> None:
    Account.enable_unaudited_hdwallet_features()
    derived = [Account.from_mnemonic(ANVIL_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}") for i in range(10)]
    assert {"0x" + bytes(a.key).hex() for a in derived} == WELL_KNOWN_TEST_KEYS
    assert {a.address.lower() for a in derived} == WELL_KNOWN_TEST_ADDRESSES
    for index, role in [(0, FACILITATOR_ACCOUNT), (1, PAYER_ACCOUNT), (2, PAY_TO_ACCOUNT), (9, ADMIN_ACCOUNT)]:
        assert (role.private_key, role.address) == ("0x" + bytes(derived[index].key).hex(), derived[index].address)
    assert is_well_known_test_key(PAYER_ACCOUNT.private_key.upper().removeprefix("0X"))
    assert not is_well_known_test_key("0x" + "11" * 32)


def test_selectors_match_what_facilitators_call() -> None:
    assert TRANSFER_WITH_AUTHORIZATION_VRS_SELECTOR == "0xe3ee160e"
    assert TRANSFER_WITH_AUTHORIZATION_BYTES_SELECTOR == "0xcf092995"


def test_find_anvil_reports_a_bad_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IMAGEGATE_ANVIL", str(tmp_path / "no-such-anvil"))
    with pytest.raises(AnvilNotFoundError, match="IMAGEGATE_ANVIL"):
        find_anvil()
    monkeypatch.delenv("IMAGEGATE_ANVIL")
    assert find_anvil().name == "anvil"


# ---------------------------------------------------------------- lifecycle


async def test_start_and_stop_leave_no_process(tmp_path: Path) -> None:
    state_file = tmp_path / "chain-state.json"
    dev = DevChain(payer_balance=5_000_000, state_file=state_file)
    await dev.start()
    pid = dev.pid
    assert dev.running
    assert int(await dev.rpc("eth_chainId"), 16) == CHAIN_ID
    assert await dev.balance_of(PAYER_ACCOUNT.address) == 5_000_000
    await dev.mint(PAY_TO_ACCOUNT.address, 7)
    await dev.stop()

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(DevChainError):
        _ = dev.rpc_url
    assert state_file.is_file()

    # The state file carries balances over; the payer is topped up, not minted again.
    async with DevChain(payer_balance=5_000_000, state_file=state_file) as restarted:
        assert await restarted.balance_of(PAY_TO_ACCOUNT.address) == 7
        assert await restarted.balance_of(PAYER_ACCOUNT.address) == 5_000_000
        restarted_pid = restarted.pid
    with pytest.raises(ProcessLookupError):
        os.kill(restarted_pid, 0)


async def test_a_port_taken_by_another_chain_is_not_mistaken_for_ours(
    chain: DevChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imagegate.devchain as devchain

    taken_port = int(chain.rpc_url.rsplit(":", 1)[1])
    real_free_port = devchain._free_port
    offered = iter([taken_port])
    monkeypatch.setattr(devchain, "_free_port", lambda: next(offered, None) or real_free_port())
    async with DevChain() as second:
        assert second.rpc_url != chain.rpc_url
        assert devchain._owns_listening_socket(second.pid, int(second.rpc_url.rsplit(":", 1)[1]))

    with pytest.raises(DevChainError):
        await DevChain(port=taken_port).start()
    assert int(await chain.rpc("eth_chainId"), 16) == CHAIN_ID  # the first chain is untouched


# ---------------------------------------------------------------- the token


async def test_token_reports_usdc_metadata_at_the_canonical_address(chain: DevChain) -> None:
    assert await chain.rpc("eth_getCode", USDC_ADDRESS, "latest") == load_token_artifact().deployed_bytecode
    assert (await call_view(chain, "name()", ["string"]))[0] == TOKEN_NAME
    assert (await call_view(chain, "version()", ["string"]))[0] == TOKEN_VERSION
    assert (await call_view(chain, "decimals()", ["uint8"]))[0] == 6

    typed = transfer_authorization_typed_data(
        sender=PAYER_ACCOUNT.address,
        to=PAY_TO_ACCOUNT.address,
        value=1,
        valid_after=0,
        valid_before=1,
        nonce=b"\0" * 32,
    )
    expected_domain = bytes(encode_typed_data(full_message=typed).header)
    (domain_separator,) = await call_view(chain, "DOMAIN_SEPARATOR()", ["bytes32"])
    assert domain_separator == expected_domain

    fields, name, version, chain_id, verifying_contract, _, _ = await call_view(
        chain, "eip712Domain()", ["bytes1", "string", "string", "uint256", "address", "bytes32", "uint256[]"]
    )
    assert (fields, name, version, chain_id) == (b"\x0f", TOKEN_NAME, TOKEN_VERSION, CHAIN_ID)
    assert verifying_contract.lower() == USDC_ADDRESS.lower()


async def test_transfer_with_authorization_settles_and_replay_reverts(chain: DevChain) -> None:
    payer, pay_to = PAYER_ACCOUNT.address, PAY_TO_ACCOUNT.address
    start_block = await chain.block_number() + 1
    payer_before, pay_to_before = await chain.balance_of(payer), await chain.balance_of(pay_to)
    authorization = sign_authorization(
        PAYER_ACCOUNT.private_key, value=5_694, valid_before=await chain_now(chain) + HOUR
    )
    calldata = encode_transfer_with_authorization(**authorization)
    assert calldata.startswith(TRANSFER_WITH_AUTHORIZATION_VRS_SELECTOR)

    tx_hash = await chain.send_transaction(USDC_ADDRESS, calldata, sender=FACILITATOR_ACCOUNT.address)

    assert await chain.balance_of(payer) == payer_before - 5_694
    assert await chain.balance_of(pay_to) == pay_to_before + 5_694
    assert await chain.authorization_state(payer, authorization["nonce"])
    receipt = await chain.transaction_receipt(tx_hash)
    assert receipt is not None and int(receipt["status"], 16) == 1
    transfers = await chain.token_transfers(from_block=start_block)
    assert [(t.sender, t.recipient, t.value, t.transaction_hash) for t in transfers] == [
        (payer, pay_to, 5_694, tx_hash)
    ]

    # Replay: refused by simulation, and a facilitator that skips estimation mines a revert.
    await expect_revert(chain, calldata, "FiatTokenV2: authorization is used or canceled")
    replay = await chain.send_transaction(
        USDC_ADDRESS, calldata, sender=FACILITATOR_ACCOUNT.address, gas=500_000, allow_revert=True
    )
    replay_receipt = await chain.transaction_receipt(replay)
    assert replay_receipt is not None and int(replay_receipt["status"], 16) == 0
    mined = await chain.transactions_to(USDC_ADDRESS, from_block=start_block)
    assert [(t.selector, t.status) for t in mined] == [
        (TRANSFER_WITH_AUTHORIZATION_VRS_SELECTOR, 1),
        (TRANSFER_WITH_AUTHORIZATION_VRS_SELECTOR, 0),
    ]
    assert await chain.balance_of(payer) == payer_before - 5_694


async def test_bytes_overload_settles(chain: DevChain) -> None:
    authorization = sign_authorization(PAYER_ACCOUNT.private_key, value=1, valid_before=await chain_now(chain) + HOUR)
    # The same authorization through the `bytes signature` overload (what facilitators use for smart wallets).
    bytes_calldata = contract_call(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)",
        [*authorization_fields(authorization), authorization["signature"]],
    )
    assert bytes_calldata.startswith(TRANSFER_WITH_AUTHORIZATION_BYTES_SELECTOR)
    before = await chain.balance_of(PAY_TO_ACCOUNT.address)
    await chain.send_transaction(USDC_ADDRESS, bytes_calldata)
    assert await chain.balance_of(PAY_TO_ACCOUNT.address) == before + 1
    vrs_calldata = encode_transfer_with_authorization(**authorization)
    await expect_revert(chain, vrs_calldata, "FiatTokenV2: authorization is used or canceled")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "FiatTokenV2: authorization is expired"),
        ("not_yet_valid", "FiatTokenV2: authorization is not yet valid"),
        ("wrong_signer", "FiatTokenV2: invalid signature"),
        ("wrong_domain_name", "FiatTokenV2: invalid signature"),
        ("high_s", "FiatTokenV2: invalid signature"),
        ("insufficient_balance", "ERC20: transfer amount exceeds balance"),
    ],
)
async def test_invalid_authorizations_revert_with_fiattoken_reasons(chain: DevChain, case: str, reason: str) -> None:
    now = await chain_now(chain)
    valid_before = now - 1 if case == "expired" else now + HOUR
    valid_after = now + HOUR if case == "not_yet_valid" else 0
    value = await chain.balance_of(PAYER_ACCOUNT.address) + 1 if case == "insufficient_balance" else 10_000
    authorization = sign_authorization(
        PAYER_ACCOUNT.private_key,
        value=value,
        valid_after=valid_after,
        valid_before=valid_before,
        domain_name="USD Coin" if case == "wrong_domain_name" else TOKEN_NAME,
    )
    if case == "wrong_signer":
        forged = sign_authorization(OTHER_KEY, valid_before=valid_before, nonce=authorization["nonce"])
        authorization["signature"] = forged["signature"]
    if case == "high_s":
        # The malleable twin (s' = n - s, v flipped) recovers the same address; FiatToken refuses it.
        signature = authorization["signature"]
        high_s = SECP256K1_ORDER - int.from_bytes(signature[32:64], "big")
        authorization["signature"] = signature[:32] + high_s.to_bytes(32, "big") + bytes([55 - signature[64]])
    await expect_revert(chain, encode_transfer_with_authorization(**authorization), reason)


async def test_receive_with_authorization_needs_the_payee_as_caller(chain: DevChain) -> None:
    authorization = sign_authorization(
        PAYER_ACCOUNT.private_key,
        value=3,
        valid_before=await chain_now(chain) + HOUR,
        primary_type="ReceiveWithAuthorization",
    )
    receive = contract_call(
        "receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)",
        [*authorization_fields(authorization), authorization["signature"]],
    )
    with pytest.raises(RpcError, match="FiatTokenV2: caller must be the payee"):
        await chain.call(USDC_ADDRESS, receive, sender=ADMIN_ACCOUNT.address)
    # A TransferWithAuthorization signature is not a ReceiveWithAuthorization one (distinct typehashes).
    transfer_signed = sign_authorization(
        PAYER_ACCOUNT.private_key, value=3, valid_before=authorization["valid_before"], nonce=authorization["nonce"]
    )
    wrong_type = contract_call(
        "receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)",
        [*authorization_fields(transfer_signed), transfer_signed["signature"]],
    )
    with pytest.raises(RpcError, match="FiatTokenV2: invalid signature"):
        await chain.call(USDC_ADDRESS, wrong_type, sender=PAY_TO_ACCOUNT.address)
    before = await chain.balance_of(PAY_TO_ACCOUNT.address)
    await chain.send_transaction(USDC_ADDRESS, receive, sender=PAY_TO_ACCOUNT.address)
    assert await chain.balance_of(PAY_TO_ACCOUNT.address) == before + 3


async def test_canceled_authorization_cannot_be_used(chain: DevChain) -> None:
    authorization = sign_authorization(PAYER_ACCOUNT.private_key, value=3, valid_before=await chain_now(chain) + HOUR)
    transfer_domain = transfer_authorization_typed_data(
        sender=PAYER_ACCOUNT.address, to=PAY_TO_ACCOUNT.address, value=0, valid_after=0, valid_before=0, nonce=bytes(32)
    )
    cancel_typed = {
        "types": {
            "EIP712Domain": transfer_domain["types"]["EIP712Domain"],
            "CancelAuthorization": [{"name": "authorizer", "type": "address"}, {"name": "nonce", "type": "bytes32"}],
        },
        "primaryType": "CancelAuthorization",
        "domain": transfer_domain["domain"],
        "message": {"authorizer": PAYER_ACCOUNT.address, "nonce": authorization["nonce"]},
    }
    cancel_signature = Account.sign_typed_data(PAYER_ACCOUNT.private_key, full_message=cancel_typed).signature
    cancel = contract_call(
        "cancelAuthorization(address,bytes32,bytes)",
        [PAYER_ACCOUNT.address, authorization["nonce"], bytes(cancel_signature)],
    )
    await chain.send_transaction(USDC_ADDRESS, cancel)
    assert await chain.authorization_state(PAYER_ACCOUNT.address, authorization["nonce"])
    transfer = encode_transfer_with_authorization(**authorization)
    await expect_revert(chain, transfer, "FiatTokenV2: authorization is used or canceled")


# Runtime code of a stand-in smart wallet whose isValidSignature always answers `magic` (ERC-1271):
# PUSH4 magic, PUSH1 0xe0, SHL, PUSH1 0, MSTORE, PUSH1 0x20, PUSH1 0, RETURN.
def _erc1271_wallet_code(magic: str) -> str:
    return "0x63" + magic + "60e01b60005260206000f3"


@pytest.mark.parametrize(("magic", "accepted"), [("1626ba7e", True), ("deadbeef", False)])
async def test_contract_wallets_are_checked_with_erc1271(chain: DevChain, magic: str, accepted: bool) -> None:
    wallet = "0x" + secrets.token_hex(20)
    await chain.rpc("anvil_setCode", wallet, _erc1271_wallet_code(magic))
    await chain.mint(wallet, 50)
    calldata = encode_transfer_with_authorization(
        sender=wallet,
        to=PAY_TO_ACCOUNT.address,
        value=50,
        valid_after=0,
        valid_before=await chain_now(chain) + HOUR,
        nonce=secrets.token_bytes(32),
        signature=b"smart-wallet signature of any length",
    )
    assert calldata.startswith(TRANSFER_WITH_AUTHORIZATION_BYTES_SELECTOR)
    if accepted:
        await chain.send_transaction(USDC_ADDRESS, calldata)
        assert await chain.balance_of(wallet) == 0
    else:
        await expect_revert(chain, calldata, "FiatTokenV2: invalid signature")
