"""Hand-made x402 payments, for the attack and fault tests (real signatures, chosen terms)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from eth_account import Account

from imagegate import devchain


@dataclass
class Terms:
    amount: int
    pay_to: str = devchain.PAY_TO_ACCOUNT.address
    network_v1: str = devchain.NETWORK_V1
    network_v2: str = devchain.NETWORK_V2
    asset: str = devchain.USDC_ADDRESS
    valid_after: int | None = None
    valid_before: int | None = None
    nonce: bytes = field(default_factory=lambda: os.urandom(32))
    max_timeout_seconds: int = 300


def sign(terms: Terms, private_key: str = devchain.PAYER_ACCOUNT.private_key,
         signer_key: str | None = None) -> dict[str, Any]:
    """An EIP-3009 authorization payload; ``signer_key`` lets a different key sign (a forged signature)."""
    sender = Account.from_key(private_key).address
    now = int(time.time())
    valid_after = now - 600 if terms.valid_after is None else terms.valid_after
    valid_before = now + terms.max_timeout_seconds if terms.valid_before is None else terms.valid_before
    typed = devchain.transfer_authorization_typed_data(
        sender=sender, to=terms.pay_to, value=terms.amount, valid_after=valid_after, valid_before=valid_before,
        nonce=terms.nonce,
    )
    signed = Account.sign_typed_data(signer_key or private_key, full_message=typed)
    return {
        "signature": "0x" + signed.signature.hex().removeprefix("0x"),
        "authorization": {"from": sender, "to": terms.pay_to, "value": str(terms.amount),
                          "validAfter": str(valid_after), "validBefore": str(valid_before),
                          "nonce": "0x" + terms.nonce.hex()},
    }


def v1_header(terms: Terms, payload: dict[str, Any]) -> dict[str, str]:
    body = {"x402Version": 1, "scheme": "exact", "network": terms.network_v1, "payload": payload}
    return {"X-PAYMENT": base64.b64encode(json.dumps(body).encode()).decode()}


def v2_header(terms: Terms, payload: dict[str, Any]) -> dict[str, str]:
    body = {
        "x402Version": 2,
        "accepted": {"scheme": "exact", "network": terms.network_v2, "asset": terms.asset, "amount": str(terms.amount),
                     "payTo": terms.pay_to, "maxTimeoutSeconds": terms.max_timeout_seconds,
                     "extra": {"name": devchain.TOKEN_NAME, "version": devchain.TOKEN_VERSION}},
        "payload": payload,
    }
    return {"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(body).encode()).decode()}


def decode_header(value: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(base64.b64decode(value))
    return decoded


@contextlib.asynccontextmanager
async def mining_paused(chain: devchain.DevChain) -> AsyncIterator[None]:
    """Transfers wait in the mempool until the block ends (then they are mined)."""
    await chain.rpc("evm_setAutomine", False)
    try:
        yield
    finally:
        await chain.rpc("evm_setAutomine", True)
        await chain.mine()
