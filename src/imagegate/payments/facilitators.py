"""Facilitators: who verifies a payment and settles it on chain.

``HttpFacilitator`` talks to any facilitator speaking the standard API (``/verify``, ``/settle``,
``/supported``) through the x402 SDK's HTTP client. ``BuiltinFacilitator`` verifies and settles in
this process with the operator's gas keys: the SDK's rules, wire types and reason strings, with
local signature recovery, one simulation per verification and non-blocking settlement.

Transport failures are told apart by what they imply for the money:
``FacilitatorUnreachable`` (the request never reached it: nothing happened) and
``SettlementOutcomeUnknown`` (a settle request may have been acted on: reconcile, never re-ask).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import httpx
from x402 import x402FacilitatorSync
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.http.facilitator_client_base import FacilitatorResponseError
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.constants import (
    ERR_ASSET_NOT_DEPLOYED_CONTRACT,
    ERR_AUTHORIZATION_VALUE_MISMATCH,
    ERR_EIP3009_NOT_SUPPORTED,
    ERR_FACTORY_NOT_ALLOWED,
    ERR_FAILED_TO_GET_NETWORK_CONFIG,
    ERR_FAILED_TO_VERIFY_SIGNATURE,
    ERR_INSUFFICIENT_BALANCE,
    ERR_INVALID_SIGNATURE,
    ERR_MISSING_EIP712_DOMAIN,
    ERR_NETWORK_MISMATCH,
    ERR_NONCE_ALREADY_USED,
    ERR_RECIPIENT_MISMATCH,
    ERR_SETTLEMENT_PENDING,
    ERR_TRANSACTION_FAILED,
    ERR_TRANSACTION_SIMULATION_FAILED,
    ERR_TRANSFER_EVENT_MISMATCH,
    ERR_UNSUPPORTED_SCHEME,
    ERR_VALID_AFTER_FUTURE,
    ERR_VALID_BEFORE_EXPIRED,
)
from x402.mechanisms.evm.erc6492 import has_deployment_info, parse_erc6492_signature
from x402.mechanisms.evm.exact import register_exact_evm_facilitator
from x402.mechanisms.evm.exact.eip3009_utils import parse_eip3009_transfer_error, verify_eip3009_transfer_event
from x402.mechanisms.evm.utils import get_evm_chain_id
from x402.mechanisms.evm.v1.utils import get_evm_chain_id as get_v1_chain_id
from x402.schemas import PaymentPayload, PaymentRequirements, SettleResponse, SupportedResponse, VerifyResponse
from x402.schemas.v1 import PaymentPayloadV1, PaymentRequirementsV1

from imagegate.payments import eip3009
from imagegate.payments.eip3009 import TransferAuthorization
from imagegate.payments.rpc import JsonRpc, RpcError, RpcUnreachable
from imagegate.payments.sender import Sent, TransactionRejected, TransactionReplaced, TransactionSender

log = logging.getLogger(__name__)

# The SDK's margin: an authorization must stay valid this long after verification.
MIN_VALIDITY_S = 6
# How far back a replaced settlement's AuthorizationUsed event is looked for.
LANDED_LOOKBACK_BLOCKS = 5_000

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

    async def nothing_in_flight(self) -> bool:
        """True only when this facilitator can tell that none of its settlement transactions is waiting
        to be mined: then a settlement whose outcome was lost (its process died) never reached the chain,
        and settling it again cannot make a second transaction revert."""
        ...

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

    async def nothing_in_flight(self) -> bool:
        return False  # a remote facilitator's mempool is out of sight

    async def supported(self) -> SupportedResponse:
        try:
            response = await self._http.get(f"{self.url}/supported")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise FacilitatorUnreachable(f"facilitator {self.url} /supported failed: {exc}") from exc
        return SupportedResponse.model_validate(response.json())

    async def aclose(self) -> None:
        await self._http.aclose()


def read_private_keys(env_var: str, key_file: Path | None) -> list[str]:
    """The gas keys from a file (preferred: not in the process environment) or an env var.

    Several keys (one per line, or separated by commas) let the builtin facilitator send from
    several accounts at once.
    """
    text = key_file.read_text(encoding="utf-8") if key_file is not None else os.environ.get(env_var) or ""
    return [key.strip() for key in text.replace(",", "\n").splitlines() if key.strip()]


def read_private_key(env_var: str, key_file: Path | None) -> str | None:
    """The first gas key (see ``read_private_keys``), or None."""
    keys = read_private_keys(env_var, key_file)
    return keys[0] if keys else None


@dataclass(frozen=True)
class _Checked:
    """A payload that passed the checks that need no chain: what to simulate and broadcast."""

    authorization: TransferAuthorization
    token: str
    network: str
    amount: int
    # A plain 65-byte ECDSA signature by ``authorization.sender`` (else the SDK verifies it).
    eoa_signature: bool


class BuiltinFacilitator:
    """A facilitator in this process: verification and settlement on ``rpc_url`` with the operator's gas keys.

    Verification does what the x402 SDK's exact-EVM facilitator does, with its reason strings, but
    locally: the terms, the EIP-712 signature recovered here (no RPC), then one ``eth_call`` that
    simulates the transfer (balance, nonce, validity window and the token's own signature check).
    Signatures that are not a plain ECDSA signature by the payer (smart wallets: EIP-1271,
    ERC-6492) are verified by the SDK's facilitator itself, in a worker thread. Settlement goes
    through ``TransactionSender``: local nonces over one or more gas accounts, many transfers in
    flight, confirmation within a block.
    """

    def __init__(self, private_keys: str | Sequence[str], rpc_url: str, networks: list[str], *,
                 confirmation_timeout_s: float, sync_send: bool | None = None, gas_limit: int = 500_000):
        keys = [private_keys] if isinstance(private_keys, str) else list(private_keys)
        if not keys:
            raise ValueError("the builtin facilitator needs at least one gas key")
        self.rpc_url = rpc_url
        self.networks = networks
        self.confirmation_timeout_s = confirmation_timeout_s
        chain_ids = {get_evm_chain_id(network) for network in networks}
        if len(chain_ids) != 1:
            raise ValueError(f"one builtin facilitator settles on one chain, not {sorted(chain_ids)}")
        (self.chain_id,) = chain_ids
        self.rpc = JsonRpc(rpc_url)
        self.sender = TransactionSender(self.rpc, keys, chain_id=self.chain_id, sync_send=sync_send,
                                        gas_limit=gas_limit)
        self.address: str = self.sender.addresses[0]
        # The SDK's facilitator: verification of smart-wallet signatures, and /supported. Its signer
        # never sends (settlement is ours), so it cannot race our nonces.
        signer = FacilitatorWeb3Signer(private_key=keys[0], rpc_url=rpc_url,
                                       confirmation_timeout_seconds=confirmation_timeout_s)
        self._sdk = x402FacilitatorSync()
        register_exact_evm_facilitator(self._sdk, signer, networks=networks)
        self._deployed_tokens: set[str] = set()
        self._node_chain_id: int | None = None

    # 1. Verification

    async def verify(self, payload: AnyPayload, requirements: AnyRequirements) -> VerifyResponse:
        checked = self._check_terms(payload, requirements)
        if isinstance(checked, VerifyResponse):
            return checked
        payer = checked.authorization.sender
        try:
            problem = await self._check_chain(checked)
            if problem is not None:
                return VerifyResponse(is_valid=False, invalid_reason=problem, payer=payer)
            if not checked.eoa_signature:
                return await asyncio.to_thread(self._sdk.verify, payload, requirements)
            return await self._simulate(checked)
        except (RpcUnreachable, OSError, ConnectionError) as exc:
            raise FacilitatorUnreachable(f"RPC {self.rpc_url} unreachable during verify: {exc}") from exc

    def _check_terms(self, payload: AnyPayload, requirements: AnyRequirements) -> _Checked | VerifyResponse:
        """The SDK's checks that need no chain, in its order and with its reasons."""
        raw = payload.payload if isinstance(payload.payload, dict) else {}
        payer = str((raw.get("authorization") or {}).get("from") or "") or None

        def invalid(reason: str, message: str | None = None) -> VerifyResponse:
            return VerifyResponse(is_valid=False, invalid_reason=reason, invalid_message=message, payer=payer)

        if isinstance(payload, PaymentPayloadV1):
            scheme, network = payload.scheme, payload.network
        else:
            scheme, network = payload.accepted.scheme, payload.accepted.network
        if scheme != "exact" or requirements.scheme != "exact":
            return invalid(ERR_UNSUPPORTED_SCHEME)
        if network != requirements.network:
            return invalid(ERR_NETWORK_MISMATCH)
        try:
            chain_id = (get_v1_chain_id(str(network)) if isinstance(requirements, PaymentRequirementsV1)
                        else get_evm_chain_id(str(network)))
        except ValueError as exc:
            return invalid(ERR_FAILED_TO_GET_NETWORK_CONFIG, str(exc))
        if chain_id != self.chain_id:
            return invalid(ERR_FAILED_TO_GET_NETWORK_CONFIG, f"this facilitator settles on chain {self.chain_id}")
        extra = requirements.extra or {}
        if "name" not in extra or "version" not in extra:
            return invalid(ERR_MISSING_EIP712_DOMAIN)
        try:
            authorization = TransferAuthorization.from_payload(raw)
        except ValueError as exc:
            return invalid(ERR_FAILED_TO_VERIFY_SIGNATURE, str(exc))
        amount = int(requirements.max_amount_required if isinstance(requirements, PaymentRequirementsV1)
                     else requirements.amount)
        if authorization.to.lower() != requirements.pay_to.lower():
            return invalid(ERR_RECIPIENT_MISMATCH)
        if authorization.value != amount:
            return invalid(ERR_AUTHORIZATION_VALUE_MISMATCH)
        now = int(time.time())
        if authorization.valid_before < now + MIN_VALIDITY_S:
            return invalid(ERR_VALID_BEFORE_EXPIRED)
        if authorization.valid_after > now:
            return invalid(ERR_VALID_AFTER_FUTURE)
        if not authorization.signature:
            return invalid(ERR_INVALID_SIGNATURE)
        token = requirements.asset
        eoa = False
        if len(authorization.signature) == 65:
            message = eip3009.digest(authorization, name=str(extra["name"]), version=str(extra["version"]),
                                     chain_id=chain_id, token=token)
            signer = eip3009.recover_signer(message, authorization.signature)
            eoa = signer is not None and signer == authorization.sender.lower()
        return _Checked(authorization, token, str(requirements.network), amount, eoa)

    async def _check_chain(self, checked: _Checked) -> str | None:
        """Once per token: the RPC is on our chain and the token is a contract (an eth_call to an
        address without code would "succeed")."""
        if checked.token.lower() in self._deployed_tokens:
            return None
        chain_id, code = await self.rpc.batch([("eth_chainId", []), ("eth_getCode", [checked.token, "latest"])])
        if isinstance(chain_id, RpcError) or isinstance(code, RpcError):
            raise RpcUnreachable(f"chain checks failed: {chain_id} {code}")
        if int(chain_id, 16) != self.chain_id:
            raise RpcUnreachable(f"RPC {self.rpc_url} serves chain {int(chain_id, 16)}, not {self.chain_id}")
        if code in ("0x", "", None):
            return ERR_ASSET_NOT_DEPLOYED_CONTRACT
        self._deployed_tokens.add(checked.token.lower())
        return None

    async def _simulate(self, checked: _Checked) -> VerifyResponse:
        """One eth_call of the transfer, as the facilitator would send it."""
        payer = checked.authorization.sender
        call = {"from": self.address, "to": checked.token, "data": eip3009.transfer_calldata(checked.authorization)}
        try:
            await self.rpc.call("eth_call", call, "latest")
        except RpcError as exc:
            reason = parse_eip3009_transfer_error(Exception(f"{exc.message} {exc.data or ''}"))
            if reason == ERR_TRANSACTION_FAILED:
                reason = await self._diagnose(checked)
            log.info("payment from %s refused by simulation: %s (%s)", payer, reason, exc.message)
            return VerifyResponse(is_valid=False, invalid_reason=reason, invalid_message=exc.message, payer=payer)
        return VerifyResponse(is_valid=True, payer=payer)

    async def _diagnose(self, checked: _Checked) -> str:
        """A revert without a known reason: the nonce and the balance say the commonest causes."""
        authorization = checked.authorization
        used, balance = await self.rpc.batch([
            ("eth_call", [{"to": checked.token, "data": eip3009.authorization_state_calldata(
                authorization.sender, authorization.nonce)}, "latest"]),
            ("eth_call", [{"to": checked.token, "data": eip3009.balance_of_calldata(authorization.sender)},
                          "latest"]),
        ])
        if isinstance(used, RpcError):
            return ERR_EIP3009_NOT_SUPPORTED
        if eip3009.decode_uint(used):
            return ERR_NONCE_ALREADY_USED
        if not isinstance(balance, RpcError) and eip3009.decode_uint(balance) < checked.amount:
            return ERR_INSUFFICIENT_BALANCE
        return ERR_TRANSACTION_SIMULATION_FAILED

    # 2. Settlement

    async def settle(self, payload: AnyPayload, requirements: AnyRequirements) -> SettleResponse:
        checked = self._check_terms(payload, requirements)
        network = str(requirements.network)
        if isinstance(checked, VerifyResponse):
            return SettleResponse(success=False, error_reason=checked.invalid_reason, network=network,
                                  payer=checked.payer, transaction="")
        authorization = checked.authorization
        payer = authorization.sender

        def failed(reason: str, transaction: str = "", message: str | None = None) -> SettleResponse:
            return SettleResponse(success=False, error_reason=reason, error_message=message, network=network,
                                  payer=payer, transaction=transaction)

        try:
            if not checked.eoa_signature:
                verdict = await asyncio.to_thread(self._sdk.verify, payload, requirements)
                if not verdict.is_valid:
                    return failed(verdict.invalid_reason or ERR_INVALID_SIGNATURE)
                calldata = await self._smart_wallet_calldata(authorization)
                if calldata is None:
                    return failed(ERR_FACTORY_NOT_ALLOWED)
            else:
                calldata = eip3009.transfer_calldata(authorization)
        except (RpcUnreachable, OSError, ConnectionError) as exc:
            raise FacilitatorUnreachable(f"RPC {self.rpc_url} unreachable before settling: {exc}") from exc
        deadline = time.monotonic() + self.confirmation_timeout_s
        for _ in range(3):
            try:
                sent = await self.sender.send(checked.token, calldata, deadline=deadline,
                                              give_up_at=authorization.valid_before)
            except TransactionRejected as exc:
                return failed(ERR_TRANSACTION_FAILED, message=str(exc))
            except RpcUnreachable as exc:
                # Raised only before the transaction reached the node: nothing was sent.
                raise FacilitatorUnreachable(f"RPC {self.rpc_url} unreachable before broadcasting: {exc}") from exc
            except TransactionReplaced as exc:
                landed = await self._landed(checked)
                if landed is not None:
                    return SettleResponse(success=True, transaction=landed, network=network, payer=payer,
                                          amount=str(checked.amount))
                if time.time() > authorization.valid_before - MIN_VALIDITY_S or time.monotonic() > deadline:
                    return failed(ERR_TRANSACTION_FAILED, message=str(exc))
                log.warning("settlement of %s must be sent again: %s", authorization.nonce_hex, exc)
                continue
            return self._settled(sent, checked, network)
        return failed(ERR_TRANSACTION_FAILED, message="the settlement kept being replaced")

    def _settled(self, sent: Sent, checked: _Checked, network: str) -> SettleResponse:
        payer = checked.authorization.sender
        if sent.receipt is None:
            # Broadcast, not confirmed in time: not a failure. The gate reconciles it from the chain.
            return SettleResponse(success=False, error_reason=ERR_SETTLEMENT_PENDING, network=network, payer=payer,
                                  transaction=sent.transaction)
        if int(str(sent.receipt.get("status", "0x0")), 16) != 1:
            return SettleResponse(success=False, error_reason=ERR_TRANSACTION_FAILED, network=network, payer=payer,
                                  transaction=sent.transaction)
        if not verify_eip3009_transfer_event(sent.receipt.get("logs"), checked.token, from_address=payer,
                                             to=checked.authorization.to, value=checked.amount):
            return SettleResponse(success=False, error_reason=ERR_TRANSFER_EVENT_MISMATCH, network=network,
                                  payer=payer, transaction=sent.transaction)
        return SettleResponse(success=True, transaction=sent.transaction, network=network, payer=payer,
                              amount=str(checked.amount))

    async def _smart_wallet_calldata(self, authorization: TransferAuthorization) -> str | None:
        """The calldata the SDK would send for a verified smart-wallet signature; None for an undeployed
        wallet (deploying it through a factory is not allowed here, as in the SDK's default)."""
        signature = parse_erc6492_signature(authorization.signature)
        if has_deployment_info(signature) and await self.rpc.call("eth_getCode", authorization.sender,
                                                                    "latest") in ("0x", "", None):
            return None
        inner = replace(authorization, signature=bytes(signature.inner_signature))
        return eip3009.transfer_calldata(inner)

    async def _landed(self, checked: _Checked) -> str | None:
        """The transaction that used this authorization, when one did (ours under another hash)."""
        authorization = checked.authorization
        used = await self.rpc.call("eth_call", {"to": checked.token, "data": eip3009.authorization_state_calldata(
            authorization.sender, authorization.nonce)}, "latest")
        if not eip3009.decode_uint(used):
            return None
        head = int(await self.rpc.call("eth_blockNumber"), 16)
        logs = await self.rpc.call("eth_getLogs", {
            "address": checked.token, "fromBlock": hex(max(0, head - LANDED_LOOKBACK_BLOCKS)), "toBlock": "latest",
            "topics": [eip3009.AUTHORIZATION_USED_TOPIC, eip3009.address_topic(authorization.sender),
                       authorization.nonce_hex]})
        return str(logs[-1]["transactionHash"]) if logs else None

    async def supported(self) -> SupportedResponse:
        supported = self._sdk.get_supported()
        signers = {family: self.sender.addresses for family in supported.signers} or {"eip155:*": self.sender.addresses}
        return supported.model_copy(update={"signers": signers})

    async def nothing_in_flight(self) -> bool:
        # None of this process's transactions, and no transaction of its gas accounts in the node's mempool.
        if any(account.in_flight for account in self.sender.accounts):
            return False
        counts = await self.rpc.batch([("eth_getTransactionCount", [address, block])
                                       for address in self.sender.addresses for block in ("pending", "latest")])
        if any(isinstance(count, RpcError) for count in counts):
            return False
        pending, latest = counts[0::2], counts[1::2]
        return all(int(str(p), 16) == int(str(q), 16) for p, q in zip(pending, latest, strict=True))

    async def aclose(self) -> None:
        await self.sender.aclose()
        await self.rpc.aclose()
