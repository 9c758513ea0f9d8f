"""The payment step of the request flow, independent of any payment protocol.

``PaymentGate.authorize`` runs after validation and pricing, before any work: it either raises
``PaymentRequired`` (402), or returns a ``Payment`` that is reserved and verified (and must then be
settled or released), or a ``Replay`` when this exact payment already bought a generation, or (only
for a context with ``wait_for_in_flight=False``) an ``InFlight`` when it is paying for one right now.

Its ``admit`` hook lets the flow refuse work it has no room for (503 MODEL_BUSY) before any payment
step the client can see: it is called before a challenge is issued and before a newly reserved
payment is verified, never for a payment that is already in use or already paid (those need no new
work). When it raises, the reservation is given back and the exception propagates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imagegate.types import PaymentReceipt, Price


@dataclass(frozen=True)
class PaymentContext:
    """What the payment step may look at: the request's headers and where it was sent."""

    headers: Mapping[str, str]
    resource_url: str
    description: str
    # Identifies the request's content: a payment replayed for different content is refused.
    fingerprint: str = ""
    # JSON schemas of the request body and the response, advertised for discovery in the 402 challenge.
    input_schema: dict[str, Any] = field(default_factory=dict)
    output_schema: dict[str, Any] = field(default_factory=dict)
    # A payment already in use by a request in flight: wait for its outcome (a synchronous client wants
    # the images), or report it at once as ``InFlight`` (an async job's resend wants the job it started).
    wait_for_in_flight: bool = True


@dataclass(frozen=True)
class Replay:
    """The payment already bought ``generation_id`` (settled): answer with that generation again.

    ``receipt`` carries the payment-response headers in the format this request asked for.
    """

    generation_id: str
    receipt: PaymentReceipt


@dataclass(frozen=True)
class InFlight:
    """The payment is reserved for ``generation_id``, which is being rendered or settled right now."""

    generation_id: str
    payment_key: str


@dataclass(frozen=True)
class Reconciled:
    """A settlement whose outcome was unknown and is now known."""

    generation_id: str
    settled: bool
    receipt: PaymentReceipt


AdmitHook = Callable[[], object]


def no_admission() -> None:
    return None


class Payment(ABC):
    """One reserved, verified payment for one request."""

    key: str | None
    # Unix time after which the payment can no longer be settled (its authorization expires); None: never.
    settle_deadline: float | None = None

    @abstractmethod
    async def settle(self) -> PaymentReceipt | None:
        """Move the money; raises ``SettlementFailed``/``SettlementPending``/``PaymentUnavailable``.

        Settlement is three steps so that each ledger write can share a transaction with the
        caller's: ``begin_settlement`` (before), ``settle`` (the chain; failures are recorded
        here), ``record_settlement`` (after the work is delivered).
        """

    @abstractmethod
    async def release(self) -> None:
        """Give the payment back unspent (the work failed): the client may retry with it."""

    async def bind(self, generation_id: str) -> None:
        """Link the payment to the generation it pays for (before the work starts)."""

    async def keep_alive(self) -> None:
        """Record that the request using this payment is alive: reconciliation takes a reserved or
        settling payment left untouched for ``stale_after_s`` for one whose process died."""

    async def begin_settlement(self) -> None:
        """Mark the payment as being settled (raises ``PaymentUnavailable`` if it is no longer ours)."""

    async def record_settlement(self) -> None:
        """Record the successful settlement (after ``settle`` returned)."""


class PaymentGate(ABC):
    enabled: bool

    @abstractmethod
    async def authorize(self, price: Price, context: PaymentContext, *,
                        admit: AdmitHook = no_admission) -> Payment | Replay | InFlight:
        """Reserve and verify the request's payment for exactly ``price`` (``admit``: see the module)."""

    async def aclose(self) -> None:
        """Release connections and background tasks."""

    async def reconcile(self, stale_after_s: float) -> list[Reconciled]:
        """Settle the fate of payments whose outcome was unknown, or whose request died mid-flight
        (untouched for ``stale_after_s``)."""
        return []

    async def outcome(self, key: str) -> Reconciled | None:
        """The final outcome of payment ``key``, when it has one."""
        return None

    def describe(self) -> dict[str, Any]:
        """Public facts for the manifest (networks, asset, payTo)."""
        return {"enabled": self.enabled}


class _FreePayment(Payment):
    key = None

    async def settle(self) -> PaymentReceipt | None:
        return None

    async def release(self) -> None:
        return None


class FreeGate(PaymentGate):
    """Payments switched off by the operator (``[payments] enabled = false``): nothing is charged."""

    enabled = False

    async def authorize(self, price: Price, context: PaymentContext, *,
                        admit: AdmitHook = no_admission) -> Payment | Replay | InFlight:
        admit()
        return _FreePayment()
