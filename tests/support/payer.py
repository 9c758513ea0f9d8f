"""A payer that keeps its signed payment in hand: the x402 SDK's client signs, the caller sends.

``imagegate.payments.client.post_with_payment`` lets the SDK's transport pay and retry once. A client
whose server crashed or shut down must instead resend the very same payment (the idempotency key of
what it bought), so it needs the header itself: this is the SDK's own client, one step lower.
"""

from __future__ import annotations

from typing import Any

import httpx
from eth_account import Account
from x402 import max_amount, x402Client
from x402.http import x402HTTPClient
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client


class SdkPayer:
    def __init__(self, private_key: str, *, max_atomic: int):
        account = Account.from_key(private_key)
        self.address: str = account.address
        self._client = x402Client()
        register_exact_evm_client(self._client, EthAccountSigner(account))
        # The dev chain's token sits at the canonical test USDC address; the cap is ours.
        self._client.set_spend_controls(False)
        self._client.register_policy(max_amount(max_atomic))
        self._http = x402HTTPClient(self._client)

    async def payment_headers(self, challenge: httpx.Response) -> dict[str, str]:
        """The payment header(s) answering a 402 ``challenge``, signed by the SDK."""
        if challenge.status_code != 402:
            raise ValueError(f"expected a 402 challenge, got {challenge.status_code}: {challenge.text[:300]}")
        body: Any = challenge.json() if challenge.content else None
        required = self._http.get_payment_required_response(challenge.headers.get, body)
        payload = await self._client.create_payment_payload(required)
        headers: dict[str, str] = self._http.encode_payment_signature_header(payload)
        return headers

    async def sign(self, http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, str]:
        """Ask ``url`` for its price (the unpaid POST's 402) and sign a payment for it."""
        return await self.payment_headers(await http.post(url, json=body))
