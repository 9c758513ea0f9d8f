"""The paying side: the x402 SDK's own httpx client, for ``imagegate generate`` and the tests."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import httpx
from eth_account import Account
from x402 import max_amount, x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client


@dataclass(frozen=True)
class PaidResponse:
    status: int
    body: dict[str, Any]
    headers: httpx.Headers
    # The decoded X-PAYMENT-RESPONSE / PAYMENT-RESPONSE header, when the server sent one.
    payment_response: dict[str, Any] | None


def payer_address(private_key: str) -> str:
    address: str = Account.from_key(private_key).address
    return address


def decode_payment_response(headers: httpx.Headers) -> dict[str, Any] | None:
    raw = headers.get("payment-response") or headers.get("x-payment-response")
    if raw is None:
        return None
    decoded: dict[str, Any] = json.loads(base64.b64decode(raw))
    return decoded


async def post_with_payment(
    url: str, body: dict[str, Any], private_key: str, *, max_atomic: int, timeout_s: float = 600.0
) -> PaidResponse:
    """POST ``body``; on 402, pay at most ``max_atomic`` units with ``private_key`` and retry once."""
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(private_key)))
    # Our cap replaces the SDK's default spend controls ($1, known assets only): the caller already
    # checked the estimate, and the dev chain's token is the canonical test USDC anyway.
    client.set_spend_controls(False)
    client.register_policy(max_amount(max_atomic))
    async with x402HttpxClient(client, timeout=timeout_s, trust_env=False) as http:
        response = await http.post(url, json=body)
        content = response.json() if response.content else {}
        return PaidResponse(response.status_code, content, response.headers, decode_payment_response(response.headers))
