"""Pure request and response data: no I/O, no framework imports."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class OutputFormat(StrEnum):
    PNG = "png"
    WEBP = "webp"
    JPEG = "jpeg"

    @property
    def media_type(self) -> str:
        return f"image/{self.value}"

    @property
    def extension(self) -> str:
        return "jpg" if self is OutputFormat.JPEG else self.value


@dataclass(frozen=True)
class ImageRequest:
    """A validated body of POST /v1/images/generate (or /estimate, where the prompt may be absent).

    ``steps`` is the effective step count (the model's default filled in), ``guidance``
    is what the client sent (None: the model's own default applies).
    """

    model: str
    prompt: str | None
    width: int
    height: int
    number_results: int
    steps: int
    steps_sent: bool
    negative_prompt: str | None = None
    guidance: float | None = None
    seed: int | None = None
    output_format: OutputFormat | None = None

    def parameters(self) -> dict[str, Any]:
        """The request as recorded beside each stored image (wire names)."""
        return {
            "prompt": self.prompt,
            "model": self.model,
            "width": self.width,
            "height": self.height,
            "numberResults": self.number_results,
            "negativePrompt": self.negative_prompt,
            "steps": self.steps,
            "guidance": self.guidance,
            "seed": self.seed,
        }

    def fingerprint(self) -> str:
        """Identifies the request's content (a payment is bound to it)."""
        canonical = json.dumps({**self.parameters(), "outputFormat": self.output_format}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


USD_DECIMALS = 6


@dataclass(frozen=True)
class Price:
    """An exact price in atomic units of a 6-decimal USD stablecoin (integers only, never floats).

    Every accepted asset is such a token (USDC), so one amount is valid for all of them.
    """

    amount: int

    def usd(self) -> str:
        """The amount as a decimal string with six places, e.g. ``"0.006955"``."""
        whole, frac = divmod(self.amount, 10**USD_DECIMALS)
        return f"{whole}.{frac:0{USD_DECIMALS}d}"


@dataclass(frozen=True)
class PaymentTerms:
    """The asset prices are paid in, shown beside every estimate and model price."""

    asset: str | None
    network: str | None
    decimals: int = USD_DECIMALS


@dataclass(frozen=True)
class StoredImage:
    uuid: str
    url: str
    seed: int | None
    width: int
    height: int
    media_type: str


@dataclass(frozen=True)
class PaymentReceipt:
    """What the client is told about its payment (``X-PAYMENT-RESPONSE`` / ``PAYMENT-RESPONSE``)."""

    success: bool
    transaction: str
    network: str
    payer: str
    amount: int
    asset: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationOutcome:
    request: ImageRequest
    images: list[StoredImage]
    price: Price
    receipt: PaymentReceipt | None
    generation_id: str
    # Milliseconds per step of the flow (validate, payment, generate, store, settle).
    timings: dict[str, float] = field(default_factory=dict)

    def server_timing(self) -> str:
        return ", ".join(f"{step};dur={ms:.1f}" for step, ms in self.timings.items())

    def body(self) -> dict[str, Any]:
        cost: dict[str, Any] = {
            "usd": self.price.usd() if self.receipt else Price(0).usd(),
            "amount": str(self.receipt.amount) if self.receipt else "0",
        }
        if self.receipt:
            cost.update(
                asset=self.receipt.asset,
                network=self.receipt.network,
                transaction=self.receipt.transaction,
                payer=self.receipt.payer,
            )
        return {
            "images": [
                {
                    "url": image.url,
                    "uuid": image.uuid,
                    "seed": image.seed,
                    "width": image.width,
                    "height": image.height,
                }
                for image in self.images
            ],
            "model": self.request.model,
            "steps": self.request.steps,
            "cost": cost,
            "id": self.generation_id,
        }
