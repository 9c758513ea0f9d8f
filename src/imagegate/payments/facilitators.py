"""Facilitators: who verifies a payment and settles it on chain.

``HttpFacilitator`` talks to any facilitator speaking the standard API (``/verify``, ``/settle``,
``/supported``) through the x402 SDK's HTTP client. ``BuiltinFacilitator`` is the x402 SDK's own
facilitator in this process, signing settlement transactions with the operator's gas key; its
web3 calls are blocking, so they run in worker threads.

Transport failures are told apart by what they imply for the money:
``FacilitatorUnreachable`` (the request never reached it: nothing happened) and
``SettlementOutcomeUnknown`` (a settle request may have been acted on: reconcile, never re-ask).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Protocol

import httpx
from x402 import x402FacilitatorSync
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.http.facilitator_client_base import FacilitatorResponseError
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import register_exact_evm_facilitator
from x402.schemas import PaymentPayload, PaymentRequirements, SettleResponse, SupportedResponse, VerifyResponse
from x402.schemas.v1 import PaymentPayloadV1, PaymentRequirementsV1

log = logging.getLogger(__name__)

AnyPayload = PaymentPayload | PaymentPayloadV1
AnyRequirements = PaymentRequirements | PaymentRequirementsV1


class FacilitatorUnreachable(Exception):
    """The facilitator could not be asked (connection refused, DNS, bad answer): nothing was done."""


class SettlementOutcomeUnknown(Exception):
    """A settle request was sent but its answer was lost (timeout): the transfer may have happened."""


class Facilitator(Protocol):
    async def verify(self, payload: AnyPayload, requirements: AnyRequirements) -> VerifyResponse: ...

    async def settle(self, payload: AnyPayload, requirements: AnyRequirements) -> SettleResponse: ...

    async def supported(self) -> SupportedResponse: ...

    async def aclose(self) -> None: ...


class HttpFacilitator:
    def __init__(self, url: str, *, headers: dict[str, str], timeout_s: float,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.url = url.rstrip("/")
        # Our own client: no proxies from the environment, our timeout, our auth headers on every call.
        self._http = httpx.AsyncClient(timeout=timeout_s, headers=headers, trust_env=False, transport=transport,
                                       follow_redirects=True)
        self._client = HTTPFacilitatorClient(FacilitatorConfig(url=self.url, timeout=timeout_s, http_client=self._http))

    async def verify(self, payload: AnyPayload, requirements: AnyRequirements) -> VerifyResponse:
        try:
            return await self._client.verify(payload, requirements)
        except (httpx.TransportError, FacilitatorResponseError, ValueError) as exc:
            # Verify changes nothing on chain, so any failure to get an answer is "unreachable".
            raise FacilitatorUnreachable(f"facilitator {self.url} /verify failed: {exc}") from exc

    async def settle(self, payload: AnyPayload, requirements: AnyRequirements) -> SettleResponse:
        try:
            return await self._client.settle(payload, requirements)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise FacilitatorUnreachable(f"facilitator {self.url} /settle unreachable: {exc}") from exc
        except (httpx.TransportError, FacilitatorResponseError, ValueError) as exc:
            raise SettlementOutcomeUnknown(f"facilitator {self.url} /settle gave no usable answer: {exc}") from exc

    async def supported(self) -> SupportedResponse:
        try:
            response = await self._http.get(f"{self.url}/supported")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise FacilitatorUnreachable(f"facilitator {self.url} /supported failed: {exc}") from exc
        return SupportedResponse.model_validate(response.json())

    async def aclose(self) -> None:
        await self._http.aclose()


def read_private_key(env_var: str, key_file: Path | None) -> str | None:
    """The gas key from a file (preferred: not in the process environment) or an env var."""
    if key_file is not None:
        return key_file.read_text(encoding="utf-8").strip()
    return os.environ.get(env_var) or None


class BuiltinFacilitator:
    """The x402 SDK facilitator, run in worker threads against ``rpc_url``."""

    def __init__(self, private_key: str, rpc_url: str, networks: list[str], *, confirmation_timeout_s: float):
        self.rpc_url = rpc_url
        signer = FacilitatorWeb3Signer(
            private_key=private_key, rpc_url=rpc_url, confirmation_timeout_seconds=confirmation_timeout_s
        )
        self.address: str = signer.address
        self._facilitator = x402FacilitatorSync()
        register_exact_evm_facilitator(self._facilitator, signer, networks=networks)
        # The signer keeps a local nonce counter: transactions from one key go out one at a time.
        self._settle_lock = asyncio.Lock()

    async def verify(self, payload: AnyPayload, requirements: AnyRequirements) -> VerifyResponse:
        try:
            return await asyncio.to_thread(self._facilitator.verify, payload, requirements)
        except (OSError, ConnectionError) as exc:
            raise FacilitatorUnreachable(f"RPC {self.rpc_url} unreachable during verify: {exc}") from exc

    async def settle(self, payload: AnyPayload, requirements: AnyRequirements) -> SettleResponse:
        async with self._settle_lock:
            try:
                return await asyncio.to_thread(self._facilitator.settle, payload, requirements)
            except (OSError, ConnectionError) as exc:
                raise SettlementOutcomeUnknown(f"RPC {self.rpc_url} failed during settle: {exc}") from exc

    async def supported(self) -> SupportedResponse:
        return self._facilitator.get_supported()

    async def aclose(self) -> None:
        return None
