"""The x402 payment gate: both protocol versions on the wire, one ledger-backed flow behind them.

Unpaid requests get a dual-format challenge: the v1 JSON body (``x402-fetch`` 1.x reads only that)
plus the v2 ``PAYMENT-REQUIRED`` header (``@x402/fetch`` 2.x and the Python SDK read it first).
Paid requests carry ``X-PAYMENT`` (v1) or ``PAYMENT-SIGNATURE`` (v2) and get ``X-PAYMENT-RESPONSE``
or ``PAYMENT-RESPONSE`` back, in the version they spoke.

Order for a paid request: decode -> match the requirements exactly -> reserve (payer, nonce) in the
ledger -> verify with the facilitator -> [the service generates and stores] -> settle -> respond.
The reservation makes a payment single-use across concurrent requests and processes, and makes it
the idempotency key: resending a settled payment returns the generation it bought.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from pydantic import ValidationError
from x402.http import PAYMENT_REQUIRED_HEADER, PAYMENT_RESPONSE_HEADER, X_PAYMENT_RESPONSE_HEADER
from x402.mechanisms.evm import ExactEIP3009Payload
from x402.mechanisms.evm.constants import (
    ERR_AUTHORIZATION_VALUE_MISMATCH,
    ERR_INSUFFICIENT_BALANCE,
    ERR_NETWORK_MISMATCH,
    ERR_RECIPIENT_MISMATCH,
    ERR_SETTLEMENT_PENDING,
    ERR_TRANSACTION_SIMULATION_FAILED,
    ERR_UNSUPPORTED_SCHEME,
    ERR_VALID_AFTER_FUTURE,
    ERR_VALID_BEFORE_EXPIRED,
)
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements, ResourceInfo, SettleResponse
from x402.schemas.v1 import PaymentPayloadV1, PaymentRequirementsV1

from imagegate import logs, metrics
from imagegate.errors import PaymentRequired as PaymentRequiredError
from imagegate.errors import PaymentUnavailable, SettlementFailed, SettlementPending
from imagegate.ledger import Ledger, PaymentRecord, PaymentStatus
from imagegate.payments.base import (
    AdmitHook,
    InFlight,
    Payment,
    PaymentContext,
    PaymentGate,
    Reconciled,
    Replay,
    no_admission,
)
from imagegate.payments.chain import ChainReader, ChainUnreachable, TransferState
from imagegate.payments.facilitators import (
    AnyPayload,
    AnyRequirements,
    Facilitator,
    FacilitatorUnreachable,
    SettlementOutcomeUnknown,
)
from imagegate.payments.rpc import RpcUnreachable
from imagegate.types import PaymentReceipt, Price

log = logging.getLogger(__name__)

X_PAYMENT = "x-payment"
PAYMENT_SIGNATURE = "payment-signature"
# Stable failure reasons of our own, beside the SDK's ERR_* strings.
REASON_MISSING = "payment_required"
REASON_INVALID_PAYLOAD = "invalid_payload"
REASON_ASSET_MISMATCH = "invalid_exact_evm_asset_mismatch"
REASON_TIMEOUT_MISMATCH = "invalid_max_timeout_seconds"
REASON_PAYMENT_FAILED = "payment_failed"
REASON_OTHER_REQUEST = "payment_used_for_another_request"
# A settling payment whose process died (left untouched for stale_after_s): the outcome is unknown.
SETTLEMENT_INTERRUPTED = "settlement interrupted"
# Settlement happens after generation: an authorization about to expire would fail there.
MIN_VALIDITY_LEFT_S = 30
RETRY_AFTER_S = 10
_HEX32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
_HEX = re.compile(r"^0x[0-9a-fA-F]+$")
# At most 78 digits: uint256 (x402-fetch's own schema caps values at 18 digits).
_UINT = re.compile(r"^[0-9]{1,78}$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


@dataclass(frozen=True)
class PaymentOption:
    """One accepts entry: where to pay, in what."""

    network_v1: str
    network_v2: str
    asset: str
    asset_name: str
    asset_version: str
    pay_to: str


@dataclass(frozen=True)
class Authorization:
    """The EIP-3009 authorization inside an exact-EVM payload, checked for shape."""

    sender: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: str

    @classmethod
    def parse(cls, payload: dict[str, Any]) -> Authorization:
        """The SDK's reading of the payload, checked for shape (the SDK type does not validate)."""
        parsed = ExactEIP3009Payload.from_dict(payload)
        if not isinstance(parsed.signature, str) or not _HEX.match(parsed.signature):
            raise ValueError("payload needs a hex signature")
        raw = parsed.authorization
        if not (_ADDRESS.match(str(raw.from_address)) and _ADDRESS.match(str(raw.to))):
            raise ValueError("authorization from/to must be 20-byte hex addresses")
        if not _HEX32.match(str(raw.nonce)):
            raise ValueError("authorization nonce must be 32 bytes of hex")
        numbers = (str(raw.value), str(raw.valid_after), str(raw.valid_before))
        if not all(_UINT.match(number) for number in numbers):
            raise ValueError("authorization value, validAfter and validBefore must be non-negative integers")
        value, valid_after, valid_before = (int(number) for number in numbers)
        return cls(str(raw.from_address), str(raw.to), value, valid_after, valid_before, str(raw.nonce))


def _b64json(value: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(value, separators=(",", ":")).encode()).decode()


class X402Gate(PaymentGate):
    enabled = True

    def __init__(
        self,
        options: list[PaymentOption],
        facilitator: Facilitator,
        ledger: Ledger,
        *,
        max_timeout_seconds: int,
        chain: ChainReader | None,
        in_flight_wait_s: float,
        facts: dict[str, Any],
        on_close: Callable[[], Awaitable[None]] | None = None,
    ):
        if not options:
            raise ValueError("x402 payments need at least one payment option")
        self.options = options
        self.facilitator = facilitator
        self.ledger = ledger
        self.max_timeout_seconds = max_timeout_seconds
        self.chain = chain
        self.in_flight_wait_s = in_flight_wait_s
        self._facts = facts
        self._on_close = on_close

    def describe(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "protocol": "x402 (v1 and v2), scheme exact, EIP-3009 USDC",
            "accepts": [
                {"network": o.network_v1, "networkId": o.network_v2, "asset": o.asset, "payTo": o.pay_to}
                for o in self.options
            ],
            **self._facts,
        }

    # 1. The challenge

    def requirements_v1(self, option: PaymentOption, price: Price, context: PaymentContext) -> PaymentRequirementsV1:
        return PaymentRequirementsV1(
            scheme="exact",
            network=option.network_v1,
            max_amount_required=str(price.amount),
            resource=context.resource_url,
            description=context.description,
            mime_type="application/json",
            pay_to=option.pay_to,
            max_timeout_seconds=self.max_timeout_seconds,
            asset=option.asset,
            # Discovery metadata (bazaar style); never null, x402-fetch rejects a null outputSchema.
            output_schema={
                "input": {"type": "http", "method": "POST", "discoverable": True, **context.input_schema},
                "output": context.output_schema,
            },
            extra={"name": option.asset_name, "version": option.asset_version},
        )

    def requirements_v2(self, option: PaymentOption, price: Price) -> PaymentRequirements:
        return PaymentRequirements(
            scheme="exact",
            network=option.network_v2,
            asset=option.asset,
            amount=str(price.amount),
            pay_to=option.pay_to,
            max_timeout_seconds=self.max_timeout_seconds,
            extra={"name": option.asset_name, "version": option.asset_version},
        )

    def challenge(self, price: Price, context: PaymentContext, reason: str, message: str) -> PaymentRequiredError:
        if reason == REASON_MISSING:
            metrics.payment("challenged")
        else:
            metrics.payment("failed", reason)
        v1_body = {
            "x402Version": 1,
            "accepts": [
                self.requirements_v1(o, price, context).model_dump(by_alias=True, exclude_none=True)
                for o in self.options
            ],
        }
        v2 = PaymentRequired(
            x402_version=2,
            error=reason,
            resource=ResourceInfo(url=context.resource_url, description=context.description,
                                  mime_type="application/json"),
            accepts=[self.requirements_v2(o, price) for o in self.options],
        )
        headers = {
            PAYMENT_REQUIRED_HEADER: base64.b64encode(v2.model_dump_json(by_alias=True, exclude_none=True).encode())
            .decode(),
        }
        return PaymentRequiredError(message, challenge_body=v1_body, headers=headers, reason=reason)

    # 2. The paid request

    async def authorize(self, price: Price, context: PaymentContext, *,
                        admit: AdmitHook = no_admission) -> Payment | Replay | InFlight:
        header_v2 = context.headers.get(PAYMENT_SIGNATURE)
        header_v1 = context.headers.get(X_PAYMENT)
        if not header_v2 and not header_v1:
            admit()  # no room: 503 instead of asking for a signature that could not be used now
            raise self.challenge(price, context, REASON_MISSING,
                                 "Payment required: pay with x402 (X-PAYMENT or PAYMENT-SIGNATURE header).")
        header_version = 2 if header_v2 else 1
        payload = self._decode(header_v2 or header_v1 or "", price, context)
        option, requirements, authorization = self._match(payload, price, context)
        logs.annotate(payer=authorization.sender, x402_version=header_version, network=option.network_v1)
        key = f"{option.network_v2}:{authorization.sender.lower()}:{authorization.nonce.lower()}"
        record = PaymentRecord(
            key=key, status=PaymentStatus.RESERVED, network=option.network_v2, payer=authorization.sender,
            nonce=authorization.nonce, pay_to=option.pay_to, asset=option.asset, amount=price.amount,
            valid_before=authorization.valid_before, generation_id=None, transaction=None,
            payload={"payload": payload.model_dump(by_alias=True, exclude_none=True),
                     "requirements": requirements.model_dump(by_alias=True, exclude_none=True),
                     "version": payload.x402_version, "fingerprint": context.fingerprint},
            error=None,
        )
        # A payment the ledger knows is answered by its state (replayed, 202 while pending, ...) however
        # close to expiry it is: the time window is checked only on a payment this request takes on.
        replay = await self._reserve(record, header_version, price, context)
        if replay is not None:
            return replay
        refusal = self._outside_time_window(authorization, price, context)
        if refusal is not None:
            await self.ledger.update_payment(key, PaymentStatus.RELEASED, error=refusal.reason,
                                             expected=[PaymentStatus.RESERVED])
            raise refusal
        try:
            admit()
        except BaseException:
            await self.ledger.update_payment(key, PaymentStatus.RELEASED, error="not admitted",
                                             expected=[PaymentStatus.RESERVED])
            raise

        # Verify before any work; a payment that fails here is released so a fixed retry can use it.
        try:
            verdict = await self.facilitator.verify(payload, requirements)
        except FacilitatorUnreachable as exc:
            await self.ledger.update_payment(key, PaymentStatus.RELEASED, error=str(exc))
            log.error("payment verification impossible: %s", exc)
            metrics.payment("unavailable", "facilitator_unreachable")
            raise PaymentUnavailable("The payment facilitator is unreachable; nothing was charged. Retry later.",
                                     retry_after=RETRY_AFTER_S) from exc
        if not verdict.is_valid:
            reason = verdict.invalid_reason or "invalid_payment"
            await self.ledger.update_payment(key, PaymentStatus.RELEASED, error=reason)
            if self.chain is not None and not await self.chain.reachable():
                metrics.payment("unavailable", "chain_unreachable")
                raise PaymentUnavailable("The chain RPC is unreachable; the payment could not be verified and "
                                         "nothing was charged. Retry later.", retry_after=RETRY_AFTER_S)
            # Without Multicall3 on the chain the SDK cannot diagnose a failed simulation; the commonest
            # cause is worth naming precisely, since the client can fix it by topping up.
            if (reason == ERR_TRANSACTION_SIMULATION_FAILED and self.chain is not None
                    and await self.chain.balance_of(option.asset, authorization.sender) < price.amount):
                reason = ERR_INSUFFICIENT_BALANCE
            detail = f": {verdict.invalid_message}" if verdict.invalid_message else ""
            raise self.challenge(price, context, reason, f"Payment rejected ({reason}){detail}.")
        metrics.payment("verified")
        log.debug("payment %s verified: %d atomic units from %s (x402 v%d)", key, price.amount,
                  authorization.sender, header_version)
        return X402Payment(self, record, payload, requirements, option, header_version)

    def _decode(self, header: str, price: Price, context: PaymentContext) -> AnyPayload:
        try:
            data = json.loads(base64.b64decode(header.strip(), validate=True))
            if not isinstance(data, dict):
                raise ValueError("the payment header must hold a JSON object")
            if data.get("x402Version") == 1:
                return PaymentPayloadV1.model_validate(data)
            if data.get("x402Version") == 2:
                return PaymentPayload.model_validate(data)
            raise ValueError(f"unsupported x402Version {data.get('x402Version')!r}")
        except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError, ValidationError, ValueError) as exc:
            raise self.challenge(price, context, REASON_INVALID_PAYLOAD,
                                 f"The payment header is not a valid base64 x402 payload: {exc}.") from exc

    def _match(
        self, payload: AnyPayload, price: Price, context: PaymentContext
    ) -> tuple[PaymentOption, AnyRequirements, Authorization]:
        """The option this payload pays, checked term by term against freshly computed requirements."""

        def reject(reason: str, message: str) -> PaymentRequiredError:
            return self.challenge(price, context, reason, message)

        if isinstance(payload, PaymentPayloadV1):
            scheme, network = payload.scheme, payload.network
            option = next((o for o in self.options if o.network_v1 == network), None)
        else:
            scheme, network = payload.accepted.scheme, payload.accepted.network
            option = next((o for o in self.options if o.network_v2 == network), None)
        if scheme != "exact":
            raise reject(ERR_UNSUPPORTED_SCHEME, f"Only the 'exact' scheme is accepted, not {scheme!r}.")
        if option is None:
            networks = ", ".join(o.network_v1 for o in self.options)
            raise reject(ERR_NETWORK_MISMATCH, f"Network {network!r} is not accepted here (accepted: {networks}).")
        requirements: AnyRequirements
        if isinstance(payload, PaymentPayloadV1):
            requirements = self.requirements_v1(option, price, context)
        else:
            requirements = self.requirements_v2(option, price)
            accepted = payload.accepted
            if accepted.asset.lower() != option.asset.lower():
                raise reject(REASON_ASSET_MISMATCH, f"Asset {accepted.asset} is not accepted; pay in {option.asset}.")
            if accepted.pay_to.lower() != option.pay_to.lower():
                raise reject(ERR_RECIPIENT_MISMATCH,
                             f"The payment is addressed to {accepted.pay_to}, not {option.pay_to}.")
            if accepted.amount != str(price.amount):
                raise reject(ERR_AUTHORIZATION_VALUE_MISMATCH,
                             f"The payment is for {accepted.amount} atomic units; this request costs {price.amount}.")
            if accepted.max_timeout_seconds != self.max_timeout_seconds:
                raise reject(REASON_TIMEOUT_MISMATCH, "maxTimeoutSeconds differs from the requirements.")
        try:
            authorization = Authorization.parse(payload.payload)
        except (ValueError, TypeError) as exc:
            raise reject(REASON_INVALID_PAYLOAD, f"The payment payload is malformed: {exc}.") from exc
        if authorization.to.lower() != option.pay_to.lower():
            raise reject(ERR_RECIPIENT_MISMATCH, f"The authorization pays {authorization.to}, not {option.pay_to}.")
        if authorization.value != price.amount:
            raise reject(ERR_AUTHORIZATION_VALUE_MISMATCH,
                         f"The authorization is for {authorization.value} atomic units; this request costs "
                         f"{price.amount} (see POST /v1/images/estimate).")
        return option, requirements, authorization

    def _outside_time_window(self, authorization: Authorization, price: Price,
                             context: PaymentContext) -> PaymentRequiredError | None:
        """The refusal of a payment to take on that is not valid now, or not long enough to render and settle."""
        now = int(time.time())
        if authorization.valid_before < now + MIN_VALIDITY_LEFT_S:
            return self.challenge(
                price, context, ERR_VALID_BEFORE_EXPIRED,
                f"The authorization expires too soon (validBefore {authorization.valid_before}; it must be "
                f"valid for at least {MIN_VALIDITY_LEFT_S} s more to cover generation and settlement).")
        if authorization.valid_after > now:
            return self.challenge(
                price, context, ERR_VALID_AFTER_FUTURE,
                f"The authorization is not valid yet (validAfter {authorization.valid_after} > now {now}).")
        return None

    async def _reserve(self, record: PaymentRecord, header_version: int, price: Price,
                       context: PaymentContext) -> Replay | InFlight | None:
        """Own ``record.key`` (None), or the replay of what that payment already bought (or, when the
        context does not wait, what it is buying now)."""
        deadline = time.monotonic() + self.in_flight_wait_s
        while True:
            existing = await self.ledger.reserve_payment(record)
            if existing is None:
                return None
            match existing.status:
                case PaymentStatus.SETTLED:
                    return self._replay(existing, header_version, context)
                case PaymentStatus.PENDING:
                    existing = await self._reconcile_one(existing)
                    if existing.status is PaymentStatus.SETTLED:
                        return self._replay(existing, header_version, context)
                    if existing.status is PaymentStatus.PENDING:
                        if not context.wait_for_in_flight and existing.generation_id is not None:
                            self._check_same_request(existing, context)
                            return InFlight(existing.generation_id, existing.key)
                        raise self._pending_error(existing)
                    if existing.status is PaymentStatus.SETTLING:
                        continue  # being settled again (see _resettle): wait for it like any in-flight use
                    raise self.challenge(price, context, existing.error or REASON_PAYMENT_FAILED,
                                         "This payment's settlement failed on chain; sign a new payment.")
                case PaymentStatus.FAILED:
                    raise self.challenge(price, context, existing.error or REASON_PAYMENT_FAILED,
                                         "This payment authorization was refused at settlement; sign a new one.")
                case PaymentStatus.RESERVED | PaymentStatus.SETTLING:
                    # The same payment is being used by a request in flight: wait for its outcome.
                    if not context.wait_for_in_flight and existing.generation_id is not None:
                        self._check_same_request(existing, context)
                        return InFlight(existing.generation_id, existing.key)
                    if time.monotonic() > deadline:
                        raise PaymentUnavailable("This payment is in use by another request in progress; retry.",
                                                 retry_after=RETRY_AFTER_S)
                    await asyncio.sleep(0.05)
                case PaymentStatus.RELEASED:
                    continue  # released in between: try to take it over again

    def _replay(self, record: PaymentRecord, header_version: int, context: PaymentContext) -> Replay:
        self._check_same_request(record, context)
        if record.generation_id is None:
            raise RuntimeError(f"settled payment {record.key} is not linked to a generation")
        metrics.payment("replayed")
        return Replay(record.generation_id, self.receipt(record, header_version))

    def _check_same_request(self, record: PaymentRecord, context: PaymentContext) -> None:
        if record.payload.get("fingerprint") != context.fingerprint:
            raise self.challenge(Price(record.amount), context, REASON_OTHER_REQUEST,
                                 "This payment already paid for a different request; sign a new payment for this one.")

    def _pending_error(self, record: PaymentRecord) -> SettlementPending:
        metrics.payment("pending")
        logs.annotate(transaction=record.transaction)
        return SettlementPending(
            "Your payment was broadcast but is not confirmed yet. Do not sign a new payment: resend this "
            "request with the same payment header to receive your images once it confirms.",
            details={"transaction": record.transaction or "", "network": record.network},
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    def receipt(self, record: PaymentRecord, header_version: int, *, success: bool = True,
                error_reason: str | None = None) -> PaymentReceipt:
        option = next(o for o in self.options if o.network_v2 == record.network)
        transaction = record.transaction or ""
        if header_version == 1:
            body: dict[str, Any] = {"success": success, "transaction": transaction, "transactionHash": transaction,
                                    "network": option.network_v1, "payer": record.payer}
            if error_reason:
                body["errorReason"] = error_reason
            headers = {X_PAYMENT_RESPONSE_HEADER: _b64json(body)}
        else:
            response = SettleResponse(success=success, error_reason=error_reason, transaction=transaction,
                                      network=record.network, payer=record.payer, amount=str(record.amount))
            headers = {PAYMENT_RESPONSE_HEADER: _b64json(response.model_dump(by_alias=True, exclude_none=True))}
        return PaymentReceipt(success=success, transaction=transaction, network=option.network_v1,
                              payer=record.payer, amount=record.amount, asset=record.asset, headers=headers)

    # 3. Reconciliation of unknown outcomes

    async def _reconcile_one(self, record: PaymentRecord) -> PaymentRecord:
        if self.chain is None:
            return record
        try:
            state, transaction = await self.chain.transfer_state(record.asset, record.payer, record.nonce,
                                                                  record.transaction,
                                                                  valid_after=_valid_after(record),
                                                                  valid_before=record.valid_before)
        except ChainUnreachable as exc:
            log.warning("reconciliation of %s postponed: %s", record.key, exc)
            return record
        if state is TransferState.SETTLED:
            settled = await self.ledger.update_payment(record.key, PaymentStatus.SETTLED, transaction=transaction,
                                                       expected=[PaymentStatus.PENDING])
            if settled:
                metrics.payment("reconciled", "settled")
        elif state is TransferState.FAILED or (state is TransferState.UNKNOWN and time.time() > record.valid_before):
            # Past validBefore an unmined authorization can never land: the money did not move.
            failed = await self.ledger.update_payment(record.key, PaymentStatus.FAILED, transaction=transaction or None,
                                                      error="transaction_failed", expected=[PaymentStatus.PENDING])
            if failed:
                metrics.payment("reconciled", "failed")
        elif (record.error == SETTLEMENT_INTERRUPTED
              and time.time() < record.valid_before - MIN_VALIDITY_LEFT_S):
            await self._resettle(record)
        return await self.ledger.payment(record.key) or record

    async def _resettle(self, record: PaymentRecord) -> None:
        """Settle again a payment whose settling process died, and whose transfer the chain has not seen.

        The images it pays for are staged and the client waits for them: leaving it pending would make
        the client wait until the authorization expires, then lose its images. Settling again is safe
        with EIP-3009: the nonce is single-use, so whatever the first attempt did, at most one transfer
        ever lands (a first broadcast still stuck in a mempool would make one of the two revert; on an
        instant chain, an unused nonce means nothing was broadcast).
        """
        if self.chain is None:
            return
        try:
            safe = await self.facilitator.nothing_in_flight()
        except (RpcUnreachable, httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            log.warning("settling %s again postponed: the facilitator's transactions cannot be checked: %s",
                        record.key, exc)
            return
        if not safe:
            # The first attempt may be in a mempool: a second one would revert, or land twice where the
            # first is replaced. Reconciliation waits for the chain (or for validBefore) instead.
            return
        if not await self.ledger.update_payment(record.key, PaymentStatus.SETTLING, expected=[PaymentStatus.PENDING]):
            return  # another request or process is on it
        payload, requirements = _stored_terms(record)
        keep_alive = asyncio.create_task(self._touch_while_settling(record.key))
        try:
            result = await self.facilitator.settle(payload, requirements)
        except FacilitatorUnreachable as exc:
            await self.ledger.update_payment(record.key, PaymentStatus.PENDING, error=SETTLEMENT_INTERRUPTED)
            log.warning("settling %s again postponed: %s", record.key, exc)
            return
        except SettlementOutcomeUnknown as exc:
            await self.ledger.update_payment(record.key, PaymentStatus.PENDING, error=str(exc))
            return
        finally:
            keep_alive.cancel()
            await asyncio.gather(keep_alive, return_exceptions=True)
        if result.success:
            log.warning("payment %s settled again after an interrupted settlement: %s", record.key, result.transaction)
            await self.ledger.update_payment(record.key, PaymentStatus.SETTLED, transaction=result.transaction)
            return
        # Refused: perhaps because the first attempt landed in between; the chain tells which.
        await self.ledger.update_payment(record.key, PaymentStatus.PENDING, transaction=result.transaction or None,
                                         error=result.error_reason or "settlement_failed")
        state, _ = await self.chain.transfer_state(record.asset, record.payer, record.nonce, None,
                                                   valid_after=_valid_after(record), valid_before=record.valid_before)
        if state is not TransferState.SETTLED and result.error_reason != ERR_SETTLEMENT_PENDING:
            await self.ledger.update_payment(record.key, PaymentStatus.FAILED,
                                             error=result.error_reason or "settlement_failed",
                                             expected=[PaymentStatus.PENDING])

    async def _touch_while_settling(self, key: str) -> None:
        # Marks the settlement alive, so that it is not taken for an interrupted one and settled twice.
        while True:
            await asyncio.sleep(1.0)
            await self.ledger.update_payment(key, PaymentStatus.SETTLING, expected=[PaymentStatus.SETTLING])

    async def reconcile(self, stale_after_s: float) -> list[Reconciled]:
        cutoff = datetime.now(UTC) - timedelta(seconds=stale_after_s)
        # Each change holds only while the row is still stale: another process's reconciler may have
        # released it meanwhile and a resend taken it over, fresh, in the same status.
        # A process that died while settling leaves the outcome unknown: the chain will tell.
        for record in await self.ledger.payments_with_status(PaymentStatus.SETTLING, updated_before=cutoff):
            await self.ledger.update_payment(record.key, PaymentStatus.PENDING, error=SETTLEMENT_INTERRUPTED,
                                             expected=[PaymentStatus.SETTLING], updated_before=cutoff)
        # One that died before settling never moved money: the payment is the client's to use again.
        for record in await self.ledger.payments_with_status(PaymentStatus.RESERVED, updated_before=cutoff):
            await self.ledger.update_payment(record.key, PaymentStatus.RELEASED, error="request interrupted",
                                             expected=[PaymentStatus.RESERVED], updated_before=cutoff)
        outcomes = []
        for record in await self.ledger.payments_with_status(PaymentStatus.PENDING):
            updated = await self._reconcile_one(record)
            # Only final outcomes: one being settled again (by a resend, meanwhile) is not "not settled".
            if updated.status in (PaymentStatus.SETTLED, PaymentStatus.FAILED) and updated.generation_id:
                outcomes.append(self._outcome_of(updated))
        return outcomes

    async def outcome(self, key: str) -> Reconciled | None:
        record = await self.ledger.payment(key)
        if record is None or record.generation_id is None:
            return None
        if record.status in (PaymentStatus.SETTLED, PaymentStatus.FAILED, PaymentStatus.RELEASED):
            return self._outcome_of(record)
        return None

    def _outcome_of(self, record: PaymentRecord) -> Reconciled:
        assert record.generation_id is not None
        receipt = self.receipt(record, int(record.payload.get("version", 1)))
        return Reconciled(record.generation_id, record.status is PaymentStatus.SETTLED, receipt)

    async def aclose(self) -> None:
        await self.facilitator.aclose()
        if self.chain is not None:
            await self.chain.aclose()
        if self._on_close is not None:
            await self._on_close()


def _stored_terms(record: PaymentRecord) -> tuple[AnyPayload, AnyRequirements]:
    """The payload and requirements of a reserved payment, as stored in the ledger at reservation."""
    stored = record.payload
    if int(stored.get("version", 1)) == 1:
        return (PaymentPayloadV1.model_validate(stored["payload"]),
                PaymentRequirementsV1.model_validate(stored["requirements"]))
    return PaymentPayload.model_validate(stored["payload"]), PaymentRequirements.model_validate(stored["requirements"])


def _valid_after(record: PaymentRecord) -> int:
    """The authorization's validAfter, as signed (the payload stored at reservation); 0 when absent."""
    try:
        return int(record.payload["payload"]["payload"]["authorization"]["validAfter"])
    except (KeyError, TypeError, ValueError):
        return 0


class X402Payment(Payment):
    def __init__(self, gate: X402Gate, record: PaymentRecord, payload: AnyPayload, requirements: AnyRequirements,
                 option: PaymentOption, header_version: int):
        self.gate = gate
        self.record = record
        self.key = record.key
        self.payload = payload
        self.requirements = requirements
        self.option = option
        self.header_version = header_version
        self.settle_deadline = float(record.valid_before)
        self.generation_id: str | None = None
        self.transaction: str | None = None

    # Every change below holds only while the payment is still linked to this request's generation: a
    # request that outlived ``stale_after_s`` may have had its reservation released by a reconciler (in
    # any API process) and taken over by a resend, and must then neither settle nor release it.

    async def bind(self, generation_id: str) -> None:
        if not await self.gate.ledger.update_payment(self.record.key, PaymentStatus.RESERVED,
                                                     generation_id=generation_id, expected=[PaymentStatus.RESERVED]):
            raise PaymentUnavailable("This payment was released before its generation started; nothing was "
                                     "charged. Send it again.", retry_after=RETRY_AFTER_S)
        self.generation_id = generation_id

    async def release(self) -> None:
        released = await self.gate.ledger.update_payment(self.record.key, PaymentStatus.RELEASED,
                                                         error="generation failed", expected=[PaymentStatus.RESERVED],
                                                         for_generation=self.generation_id)
        if released:
            metrics.payment("released")

    async def keep_alive(self) -> None:
        # Touches the record only in the state it is in: never moves it to another one.
        for status in (PaymentStatus.RESERVED, PaymentStatus.SETTLING):
            if await self.gate.ledger.update_payment(self.record.key, status, expected=[status]):
                return

    async def begin_settlement(self) -> None:
        # From RESERVED, or from RELEASED when a reconciler released it as stale but nobody took it over
        # (a takeover unlinks the generation): the images exist, so this request may still be paid.
        if not await self.gate.ledger.update_payment(self.record.key, PaymentStatus.SETTLING,
                                                     expected=[PaymentStatus.RESERVED, PaymentStatus.RELEASED],
                                                     for_generation=self.generation_id):
            raise PaymentUnavailable("This payment was taken over by another request with the same payment; "
                                     "nothing was charged for this one.", retry_after=RETRY_AFTER_S)

    async def record_settlement(self) -> None:
        if self.transaction is None:
            raise RuntimeError("record_settlement before a successful settle")
        await self._settled_as(PaymentStatus.SETTLED, transaction=self.transaction)

    async def settle(self) -> PaymentReceipt:
        """``_settle``, timed and counted by outcome."""
        started = time.perf_counter()
        outcome = "error"
        try:
            receipt = await self._settle()
            outcome = "settled"
            metrics.payment("settled")
            return receipt
        except SettlementPending:
            outcome = "pending"  # counted by _pending_error
            raise
        except SettlementFailed as exc:
            outcome = "failed"
            metrics.payment("failed", str(exc.details.get("reason", "settlement_failed")))
            raise
        except PaymentUnavailable:
            outcome = "unavailable"
            metrics.payment("unavailable", "settlement_impossible")
            raise
        finally:
            metrics.settlement(self.option.network_v1, outcome, time.perf_counter() - started)

    async def _settle(self) -> PaymentReceipt:
        ledger = self.gate.ledger
        try:
            result = await self.gate.facilitator.settle(self.payload, self.requirements)
        except FacilitatorUnreachable as exc:
            await self._settled_as(PaymentStatus.RELEASED, error=str(exc))
            log.error("settlement impossible, payment released: %s", exc)
            raise PaymentUnavailable("The payment facilitator is unreachable; nothing was charged and your payment "
                                     "is still unspent. Retry later.", retry_after=RETRY_AFTER_S) from exc
        except SettlementOutcomeUnknown as exc:
            await self._settled_as(PaymentStatus.PENDING, error=str(exc))
            log.warning("settlement outcome unknown for %s: %s", self.record.key, exc)
            record = await ledger.payment(self.record.key) or self.record
            raise self.gate._pending_error(record) from exc

        if result.success:
            # Recorded by record_settlement, in the same ledger transaction as the delivery.
            self.transaction = result.transaction
            return self.gate.receipt(replace(self.record, transaction=result.transaction), self.header_version)
        reason = result.error_reason or "settlement_failed"
        if reason == ERR_SETTLEMENT_PENDING:
            await self._settled_as(PaymentStatus.PENDING, transaction=result.transaction or None, error=reason)
            record = await ledger.payment(self.record.key) or self.record
            raise self.gate._pending_error(record)
        if not result.transaction and self.gate.chain is not None and not await self.gate.chain.reachable():
            # Nothing was broadcast (no hash) because the chain is unreachable: the payment is still unspent.
            await self._settled_as(PaymentStatus.RELEASED, error=reason)
            raise PaymentUnavailable("The chain RPC is unreachable; nothing was charged. Retry later.",
                                     retry_after=RETRY_AFTER_S)
        await self._settled_as(PaymentStatus.FAILED, transaction=result.transaction or None, error=reason)
        record = await ledger.payment(self.record.key) or self.record
        receipt = self.gate.receipt(record, self.header_version, success=False, error_reason=reason)
        message = f": {result.error_message}" if result.error_message else ""
        raise SettlementFailed(
            f"Settlement failed ({reason}){message}. Your images were withheld and nothing was charged.",
            details={"reason": reason, "transaction": result.transaction or ""},
            headers=receipt.headers,
        )

    async def _settled_as(self, status: PaymentStatus, *, transaction: str | None = None,
                          error: str | None = None) -> None:
        """The settlement's outcome, recorded unless a reconciler already moved the payment past it."""
        await self.gate.ledger.update_payment(self.record.key, status, transaction=transaction, error=error,
                                              expected=[PaymentStatus.SETTLING, PaymentStatus.PENDING],
                                              for_generation=self.generation_id)
