"""The whole request flow: validate -> price -> payment -> generate -> store -> settle -> respond."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from imagegate import pricing
from imagegate.backends import Backends
from imagegate.backends.base import Availability, Backend, GenerationJob
from imagegate.catalog import Catalog, ModelSpec
from imagegate.errors import (
    InternalError,
    ModelUnavailable,
    PaymentUnavailable,
    SettlementFailed,
    SettlementPending,
)
from imagegate.ledger import GenerationStatus, Ledger
from imagegate.payments.base import PaymentContext, PaymentGate, Replay
from imagegate.storage import ImageStore, StagedImage
from imagegate.types import (
    GenerationOutcome,
    ImageRequest,
    OutputFormat,
    PaymentReceipt,
    PaymentTerms,
    Price,
    StoredImage,
)
from imagegate.validation import parse_image_request

log = logging.getLogger(__name__)


class StepTimer:
    """Milliseconds spent in each step of a request (sent back as a Server-Timing header)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.laps[step] = (now - self._last) * 1000
        self._last = now

ESTIMATE_NOTE = (
    "Exact charge: this amount is authorised with your payment and settled only after your images "
    "are stored; nothing is settled when generation fails."
)
MAX_DRAWN_SEED = 2**32
REPLAY_WAIT_S = 30.0


class ImageService:
    def __init__(
        self,
        catalog: Catalog,
        backends: Backends,
        store: ImageStore,
        ledger: Ledger,
        payments: PaymentGate,
        output_format: OutputFormat,
        terms: PaymentTerms,
    ):
        self.catalog = catalog
        self.backends = backends
        self.store = store
        self.ledger = ledger
        self.payments = payments
        self.output_format = output_format
        self.terms = terms

    async def generate(self, body: dict[str, Any], context: PaymentContext, base_url: str) -> GenerationOutcome:
        timings = StepTimer()
        # 1. Validate: a bad body gets its 400 before any payment step.
        request = parse_image_request(body, self.catalog, require_prompt=True)
        spec = self.catalog[request.model]
        backend = self._backend(spec)
        backend.check_request(spec, request)

        # 2. Price, with the same pure function as /v1/images/estimate.
        price = pricing.quote(spec, request.width, request.height, request.number_results, request.steps)

        # 3. Nobody is asked to pay for a model that cannot run here now.
        await self._require_available(spec, backend)

        # 4. Payment: a 402 challenge, a reserved and verified payment, or the replay of a paid one.
        timings.lap("validate")
        payment = await self.payments.authorize(price, replace(context, fingerprint=request.fingerprint()))
        timings.lap("payment")
        if isinstance(payment, Replay):
            return await self.replay(payment, base_url)
        generation_id = str(uuid.uuid4())
        await self.ledger.start_generation(generation_id, spec.id, request.parameters(), price.amount, payment.key)
        await payment.bind(generation_id)

        # 5. Generate and 6. store, unreachable until paid. Any failure gives the payment back.
        staged: list[StagedImage] = []
        output_format = request.output_format or self.output_format
        try:
            seeds = self._seeds(request)
            result = await backend.generate(GenerationJob.from_request(spec, request, seeds))
            timings.lap("generate")
            for index, rendered in enumerate(result.images):
                record = {**request.parameters(), "generationId": generation_id, "imageIndex": index}
                staged.append(await self.store.stage(rendered.image, output_format, record, rendered.seed))
        except BaseException as exc:
            await payment.release()
            await self.store.discard(staged)
            await self.ledger.update_generation(generation_id, GenerationStatus.FAILED, error=repr(exc))
            raise
        images = [_image_record(image) for image in staged]
        timings.lap("store")

        # 7. Settle: the client is charged only for images that exist.
        await self.ledger.update_generation(
            generation_id, GenerationStatus.SETTLING, images=images, provider_cost_micros=result.provider_cost_micros
        )
        try:
            receipt = await payment.settle()
        except SettlementPending as exc:
            # Kept staged: reconciliation publishes them if the transfer lands.
            await self.ledger.update_generation(generation_id, GenerationStatus.SETTLEMENT_PENDING, error=exc.message)
            raise
        except (SettlementFailed, PaymentUnavailable) as exc:
            # Refused, or never attempted: no money moved, so the images are not delivered.
            await self.store.discard(staged)
            await self.ledger.update_generation(generation_id, GenerationStatus.SETTLEMENT_FAILED, error=exc.message)
            raise

        timings.lap("settle")

        # 8. Publish and respond.
        await self.store.publish(staged)
        await self.ledger.update_generation(
            generation_id,
            GenerationStatus.COMPLETED,
            receipt=_receipt_record(receipt),
            charged_amount=receipt.amount if receipt else 0,
        )
        timings.lap("publish")
        return GenerationOutcome(
            request=request,
            images=[self._stored(image, base_url) for image in images],
            price=price,
            receipt=receipt,
            generation_id=generation_id,
            timings=timings.laps,
        )

    async def replay(self, replay: Replay, base_url: str) -> GenerationOutcome:
        """The answer a paid generation got, for a client that lost it and sent the same payment again."""
        generation_id = replay.generation_id
        record = await self.ledger.generation(generation_id)
        deadline = time.monotonic() + REPLAY_WAIT_S
        # Settled but not yet published by the request that paid: it is a moment away.
        while record is not None and record.status is GenerationStatus.SETTLING and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            record = await self.ledger.generation(generation_id)
        if record is None:
            raise InternalError(f"payment refers to unknown generation {generation_id}")
        if record.status in (GenerationStatus.SETTLEMENT_PENDING, GenerationStatus.SETTLING):
            # The payment layer replays only settled payments: finish what an unknown outcome or a
            # dead process left staged.
            await self.store.publish([_staged(image) for image in record.images])
            await self.ledger.update_generation(
                generation_id,
                GenerationStatus.COMPLETED,
                receipt=_receipt_record(replay.receipt),
                charged_amount=replay.receipt.amount,
            )
        elif record.status is not GenerationStatus.COMPLETED:
            raise InternalError(f"generation {generation_id} is {record.status}, it cannot be replayed")
        request = parse_image_request(
            {k: v for k, v in record.request.items() if v is not None}, self.catalog, require_prompt=True
        )
        return GenerationOutcome(
            request=request,
            images=[self._stored(image, base_url) for image in record.images],
            price=Price(record.price_amount),
            receipt=replay.receipt,
            generation_id=generation_id,
        )

    async def reconcile_pending(self, stale_after_s: float) -> None:
        """Finish generations whose settlement outcome was unknown, or whose process died settling.

        Settled: the staged images are published (the client gets them by resending its payment).
        Refused: they are discarded. Nothing paid for is lost, nothing unpaid is published.
        """
        outcomes = {o.generation_id: o for o in await self.payments.reconcile(stale_after_s)}
        cutoff = datetime.now(UTC) - timedelta(seconds=stale_after_s)
        for stale in await self.ledger.generations_with_status(GenerationStatus.SETTLING, updated_before=cutoff):
            if stale.payment_key is not None and stale.id not in outcomes:
                outcome = await self.payments.outcome(stale.payment_key)
                if outcome is not None:
                    outcomes[stale.id] = outcome
        for outcome in outcomes.values():
            record = await self.ledger.generation(outcome.generation_id)
            unfinished = (GenerationStatus.SETTLEMENT_PENDING, GenerationStatus.SETTLING)
            if record is None or record.status not in unfinished:
                continue
            staged = [_staged(image) for image in record.images]
            if outcome.settled:
                await self.store.publish(staged)
                await self.ledger.update_generation(record.id, GenerationStatus.COMPLETED,
                                                    receipt=_receipt_record(outcome.receipt),
                                                    charged_amount=outcome.receipt.amount)
            else:
                await self.store.discard(staged)
                await self.ledger.update_generation(record.id, GenerationStatus.SETTLEMENT_FAILED,
                                                    error="settlement did not happen")

    async def estimate(self, body: dict[str, Any]) -> dict[str, Any]:
        request = parse_image_request(body, self.catalog, require_prompt=False)
        spec = self.catalog[request.model]
        self._backend(spec).check_request(spec, request)
        price = pricing.quote(spec, request.width, request.height, request.number_results, request.steps)
        return {
            "model": spec.id,
            "dimensions": f"{request.width}×{request.height}",
            "number_of_images": request.number_results,
            "steps": request.steps,
            "estimatedCost": {
                "usd": price.usd(),
                "note": ESTIMATE_NOTE,
                "amount": str(price.amount),
                "asset": self.terms.asset,
                "network": self.terms.network,
                "decimals": self.terms.decimals,
            },
        }

    async def models(self) -> dict[str, Any]:
        entries = []
        for spec in self.catalog.values():
            availability = await self._availability(spec)
            price = pricing.quote(spec, spec.default_width, spec.default_height, 1, spec.steps.default)
            entries.append(
                {
                    "id": spec.id,
                    "name": spec.name,
                    "description": spec.description,
                    "backend": spec.backend,
                    "default": spec.id == self.catalog.default_model,
                    "supportsSteps": spec.steps.supported,
                    "defaultSteps": spec.steps.default,
                    "minSteps": spec.steps.min,
                    "maxSteps": spec.steps.max,
                    "supportsGuidance": spec.supports_guidance,
                    "guidanceMode": spec.guidance.mode,
                    "defaultGuidance": spec.guidance.default,
                    "supportsNegativePrompt": spec.supports_negative_prompt,
                    "negativePromptMode": spec.negative_prompt,
                    "parameterNotes": spec.parameter_notes(),
                    "defaultWidth": spec.default_width,
                    "defaultHeight": spec.default_height,
                    "pricing": {
                        "usdPer1024Image": pricing.quote(spec, 1024, 1024, 1, spec.steps.default).usd(),
                        "amountPer1024Image": str(pricing.quote(spec, 1024, 1024, 1, spec.steps.default).amount),
                        "usdAtDefaults": price.usd(),
                        "rule": "scales with width*height/1024² and steps/defaultSteps, rounded up per image",
                        "asset": self.terms.asset,
                        "network": self.terms.network,
                    },
                    "available": availability.available,
                    "unavailableReason": availability.reason,
                }
            )
        return {"defaultModel": self.catalog.default_model, "total": len(entries), "models": entries}

    async def aclose(self) -> None:
        await self.payments.aclose()
        await self.backends.aclose()
        await self.ledger.aclose()

    def _backend(self, spec: ModelSpec) -> Backend:
        if not self.backends.known(spec.backend):
            raise ModelUnavailable(
                f"Model {spec.id!r} needs the {spec.backend!r} backend, which is not installed on this server."
            )
        return self.backends.get(spec.backend)

    async def _availability(self, spec: ModelSpec) -> Availability:
        if not self.backends.known(spec.backend):
            return Availability(False, f"backend {spec.backend!r} is not installed")
        return await self.backends.get(spec.backend).availability(spec)

    async def _require_available(self, spec: ModelSpec, backend: Backend) -> None:
        availability = await backend.availability(spec)
        if not availability.available:
            raise ModelUnavailable(
                f"Model {spec.id!r} is not available on this server: {availability.reason}",
                retry_after=availability.retry_after,
                details={"model": spec.id},
            )

    @staticmethod
    def _seeds(request: ImageRequest) -> tuple[int, ...]:
        # Image i gets seed + i: the same request reproduces every image bit for bit, and a model with
        # options.batch_images = false also reproduces each image bit for bit when re-run alone.
        base = request.seed if request.seed is not None else secrets.randbelow(MAX_DRAWN_SEED)
        return tuple(base + index for index in range(request.number_results))

    @staticmethod
    def _stored(image: dict[str, Any], base_url: str) -> StoredImage:
        output_format = OutputFormat(image["format"])
        return StoredImage(
            uuid=image["uuid"],
            url=f"{base_url.rstrip('/')}/images/{image['uuid']}.{output_format.extension}",
            seed=image["seed"],
            width=image["width"],
            height=image["height"],
            media_type=output_format.media_type,
        )


def _image_record(image: StagedImage) -> dict[str, Any]:
    return {
        "uuid": image.uuid,
        "format": image.format.value,
        "seed": image.seed,
        "width": image.width,
        "height": image.height,
        "bytes": image.size_bytes,
    }


def _staged(image: dict[str, Any]) -> StagedImage:
    return StagedImage(
        image["uuid"], OutputFormat(image["format"]), image["width"], image["height"], image["seed"], image["bytes"]
    )


def _receipt_record(receipt: PaymentReceipt | None) -> dict[str, Any] | None:
    if receipt is None:
        return None
    return {
        "success": receipt.success,
        "transaction": receipt.transaction,
        "network": receipt.network,
        "payer": receipt.payer,
        "amount": receipt.amount,
        "asset": receipt.asset,
        "headers": receipt.headers,
    }
