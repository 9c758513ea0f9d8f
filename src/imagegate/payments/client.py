"""The paying side: the x402 SDK's own httpx client, for ``imagegate generate`` and the tests."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import httpx
from eth_account import Account
from x402 import max_amount, x402Client
from x402.http import x402HTTPClient
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


def _payer(private_key: str, max_atomic: int) -> x402Client:
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(private_key)))
    # Our cap replaces the SDK's default spend controls ($1, known assets only): the caller already
    # checked the estimate, and the dev chain's token is the canonical test USDC anyway.
    client.set_spend_controls(False)
    client.register_policy(max_amount(max_atomic))
    return client


async def payment_headers(challenge: httpx.Response, private_key: str, *, max_atomic: int) -> dict[str, str]:
    """The x402 SDK's payment for a 402 ``challenge``, as headers for the same request.

    For a client that must never pay twice for one request: it keeps these and sends them again, as
    they are, when the answer is lost (connection cut, server restarting) or is 202 SETTLEMENT_PENDING;
    the server then serves what this one payment bought instead of charging again."""
    http = x402HTTPClient(_payer(private_key, max_atomic))
    headers, _ = await http.handle_402_response(dict(challenge.headers), challenge.content, str(challenge.request.url))
    return headers


def decode_payment_response(headers: httpx.Headers) -> dict[str, Any] | None:
    raw = headers.get("payment-response") or headers.get("x-payment-response")
    if raw is None:
        return None
    decoded: dict[str, Any] = json.loads(base64.b64decode(raw))
    return decoded


async def post_with_payment(
    url: str, body: dict[str, Any], private_key: str, *, max_atomic: int, timeout_s: float = 600.0,
    headers: dict[str, str] | None = None,
    **http_options: Any,
) -> PaidResponse:
    """POST ``body`` (with ``headers``); on 402, pay at most ``max_atomic`` units with ``private_key`` and
    retry once. ``http_options`` go to the httpx client (``event_hooks``, ...)."""
    async with x402HttpxClient(_payer(private_key, max_atomic), timeout=timeout_s, trust_env=False,
                               **http_options) as http:
        response = await http.post(url, json=body, headers=headers)
        content = response.json() if response.content else {}
        return PaidResponse(response.status_code, content, response.headers, decode_payment_response(response.headers))
