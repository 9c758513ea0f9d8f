"""Payments: the x402 gate (``payments.x402``) or none at all, chosen by configuration.

This package is the only place that imports the x402 SDK.
"""

from __future__ import annotations

from imagegate.config import Settings
from imagegate.ledger import SqlLedger
from imagegate.payments.base import FreeGate, PaymentGate
from imagegate.types import PaymentTerms


async def build_gate(settings: Settings, ledger: SqlLedger) -> tuple[PaymentGate, PaymentTerms]:
    return FreeGate(), PaymentTerms(asset=None, network=None)
