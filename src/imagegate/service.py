"""The whole request flow: validate -> price -> admit -> payment -> generate -> store -> settle -> respond.

``ImageService.generate`` runs it in one go; ``open`` (everything before any work) and ``deliver``
(render, store, settle, publish) are its two halves, for callers that run the second one later.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from imagegate import faults, logs, metrics, pricing
from imagegate.backends.base import GenerationJob
from imagegate.catalog import Catalog, ModelSpec
from imagegate.drain import Drain
from imagegate.errors import (
    InternalError,
    ModelBusy,
    ModelUnavailable,
    PaymentRequired,
    PaymentUnavailable,
    SettlementFailed,
    SettlementPending,
)
from imagegate.ledger import GenerationRecord, GenerationStatus, Ledger, PaymentStatus
from imagegate.payments.base import InFlight, Payment, PaymentContext, PaymentGate, Replay
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
from imagegate.validation import parse_image_request, parse_json_body
from imagegate.workers.base import Admission, Engine, ProgressSink

log = logging.getLogger(__name__)


class StepTimer:
    """Milliseconds spent in each step of a request (sent back as a Server-Timing header)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()
        # The request's log lines show the steps done so far.
        self._logged: dict[str, float] = {}
        logs.annotate(step_ms=self._logged)

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.laps[step] = (now - self._last) * 1000
        self._logged[step] = round(self.laps[step], 1)
        self._last = now

ESTIMATE_NOTE = (
    "Exact charge: this amount is authorised with your payment and settled only after your images "
    "are stored; nothing is settled when generation fails."
)
MAX_DRAWN_SEED = 2**32
# Rendering must end this long before the payment's authorization expires, to leave time to settle.
SETTLE_MARGIN_S = 20.0
DEFAULT_RENDER_TIMEOUT_S = 600.0


@dataclass
class OpenGeneration:
    """A request whose payment is reserved and verified and whose generation is recorded: ready to
    render. Delivering it (``ImageService.deliver``) either settles it or gives the payment back."""

    request: ImageRequest
    spec: ModelSpec
    price: Price
    payment: Payment
    generation_id: str
    seeds: tuple[int, ...]
    # Its place in the model's queue, released when the render ends.
    admission: Admission
    timings: StepTimer

    def render_timeout_s(self, cap_s: float) -> float:
        """How long rendering may take: the cap, and never so long that settlement would come too late."""
        if self.payment.settle_deadline is None:
            return cap_s
        left = self.payment.settle_deadline - SETTLE_MARGIN_S - time.time()
        return max(0.0, min(cap_s, left))


class _AdmissionOnDemand:
    """The admission the payment gate asks for (``admit`` hook), or none when it never asks."""

    def __init__(self, engine: Engine, spec: ModelSpec):
        self._engine = engine
        self._spec = spec
        self.admission: Admission | None = None

    def take(self) -> None:
        if self.admission is None:
            self.admission = self._engine.admit(self._spec)

    def release(self) -> None:
        if self.admission is not None:
            self.admission.release()


class ImageService:
    def __init__(
        self,
        catalog: Catalog,
        engine: Engine,
        store: ImageStore,
        ledger: Ledger,
        payments: PaymentGate,
        output_format: OutputFormat,
        terms: PaymentTerms,
        *,
        render_timeout_s: float = DEFAULT_RENDER_TIMEOUT_S,
        drain: Drain | None = None,
    ):
        self.catalog = catalog
        self.engine = engine
        self.store = store
        self.ledger = ledger
        self.payments = payments
        self.output_format = output_format
        self.terms = terms
        self.render_timeout_s = render_timeout_s
        # Shutdown: every entry point that takes paid work runs it inside ``drain.paid_work()``.
        self.drain = drain or Drain()
        # Generations opened by this process and not yet delivered, with their payments (kept alive).
        self._live: dict[str, Payment] = {}

    async def generate(self, body: dict[str, Any], context: PaymentContext, base_url: str, *,
                       progress: ProgressSink | None = None) -> GenerationOutcome:
        """The synchronous flow: open the generation (steps 1-5), then deliver it (steps 6-9)."""
        async with self.drain.paid_work():
            opened = await self.open(body, context)
            if isinstance(opened, Replay):
                return await self.replay(opened, base_url)
            if isinstance(opened, InFlight):  # only a context that does not wait gets one
                raise InternalError("a synchronous request was answered with a payment in flight")
            return await self.deliver(opened, base_url, progress=progress)

    async def open(self, body: dict[str, Any], context: PaymentContext) -> OpenGeneration | Replay | InFlight:
        """Everything before any work: a 4xx/503 here costs the client nothing. ``Replay``: the payment
        already bought a generation; ``InFlight`` (``context.wait_for_in_flight`` off): it is buying one."""
        timings = StepTimer()
        # 1. Validate: a bad body gets its 400 before any payment step, and 2. price, with the same
        # pure function as /v1/images/estimate.
        request, spec, price = self._quote(body)
        logs.annotate(model=spec.id, size=f"{request.width}x{request.height}", images=request.number_results,
                      price=price.amount)

        # 3. Nobody is asked to pay for a model that cannot run here now.
        await self._require_available(spec)
        timings.lap("validate")

        # 4. Admission and 5. payment: a 402 challenge, 503 MODEL_BUSY when the model's queue is full
        # (asked by the gate before any payment step), a reserved and verified payment, or the
        # replay of a paid one.
        admission = _AdmissionOnDemand(self.engine, spec)
        try:
            payment = await self.payments.authorize(price, replace(context, fingerprint=request.fingerprint()),
                                                    admit=admission.take)
            timings.lap("payment")
            if isinstance(payment, Replay | InFlight):
                admission.release()
                return payment
            faults.reached("payment_reserved")
            if admission.admission is None:  # a gate that never asks still gets the bound enforced
                admission.take()
            assert admission.admission is not None
            generation_id = str(uuid.uuid4())
            logs.annotate(generation_id=generation_id)
            async with self.ledger.atomic():  # one commit: the generation and its payment's link to it
                await self.ledger.start_generation(generation_id, spec.id, request.parameters(), price.amount,
                                                   payment.key)
                await payment.bind(generation_id)
        except BaseException as exc:
            admission.release()
            if isinstance(exc, ModelBusy):
                metrics.busy_refusal(spec.id)
            raise
        self._live[generation_id] = payment
        return OpenGeneration(request, spec, price, payment, generation_id, self._seeds(request),
                              admission.admission, timings)

    def _quote(self, body: dict[str, Any]) -> tuple[ImageRequest, ModelSpec, Price]:
        request = parse_image_request(body, self.catalog, require_prompt=True)
        spec = self.catalog[request.model]
        self.engine.check_request(spec, request)
        return request, spec, pricing.quote(spec, request.width, request.height, request.number_results,
                                            request.steps)

    async def challenge(self, raw_body: bytes, context: PaymentContext) -> tuple[ModelSpec, PaymentRequired] | None:
        """What ``open`` answers this body when it carries no payment: its 402 (None when payments are
        off); any other answer (400, 503 ...) is raised. For ``ChallengeCache``, which reuses the 402
        for the same body after ``check_challenge``."""
        if not self.payments.enabled:
            return None
        self.drain.refuse_if_draining()
        _, spec, price = self._quote(parse_json_body(raw_body))
        await self._require_available(spec)
        admission = _AdmissionOnDemand(self.engine, spec)
        try:
            await self.payments.authorize(price, replace(context, headers={}), admit=admission.take)
        except PaymentRequired as challenge:
            return spec, challenge
        finally:
            admission.release()
        raise InternalError("a request without payment was authorized")

    async def check_challenge(self, spec: ModelSpec) -> None:
        """Steps 3 and 4 again for a remembered challenge: the server takes paid work, the model is
        available and has room. Counted like a challenge the gate issues."""
        self.drain.refuse_if_draining()
        await self._require_available(spec)
        self.engine.admit(spec).release()
        metrics.payment("challenged")

    async def deliver(self, generation: OpenGeneration, base_url: str, *,
                      progress: ProgressSink | None = None, timeout_s: float | None = None,
                      on_rendered: Callable[[], Awaitable[None]] | None = None) -> GenerationOutcome:
        """Render, store, settle, publish. Any failure before settlement gives the payment back.

        ``timeout_s`` caps the render below the service's own cap (an async job's remaining wait);
        ``on_rendered`` runs between the render and storing: cancelling the delivery is harmless before
        it, and the place for a job to stop being cancellable (raising there gives the payment back).
        """
        try:
            return await self._deliver(generation, base_url, progress, timeout_s, on_rendered)
        finally:
            self._live.pop(generation.generation_id, None)

    async def _deliver(self, generation: OpenGeneration, base_url: str, progress: ProgressSink | None,
                       timeout_s: float | None,
                       on_rendered: Callable[[], Awaitable[None]] | None) -> GenerationOutcome:
        timings = generation.timings
        request, spec, payment, generation_id = (generation.request, generation.spec, generation.payment,
                                                 generation.generation_id)
        # 6. Generate and 7. store, unreachable until paid.
        staged: list[StagedImage] = []
        output_format = request.output_format or self.output_format
        try:
            job = GenerationJob.from_request(spec, request, generation.seeds)
            cap_s = self.render_timeout_s if timeout_s is None else min(timeout_s, self.render_timeout_s)
            # A shutdown whose grace runs out cancels the render here (503 SERVER_DRAINING, released).
            async with self.drain.interruptible():
                result = await self.engine.render(job, generation.admission, progress=faults.watching_steps(progress),
                                                  timeout_s=generation.render_timeout_s(cap_s))
            timings.lap("generate")
            metrics.generation_rendered(spec.id, request.width, request.height, timings.laps["generate"] / 1000)
            log.debug("generation %s: %d image(s) rendered in %.0f ms", generation_id, len(result.images),
                      timings.laps["generate"])
            if on_rendered is not None:
                await on_rendered()
            for index, rendered in enumerate(result.images):
                record = {**request.parameters(), "generationId": generation_id, "imageIndex": index}
                staged.append(await self.store.stage(rendered.image, output_format, record, rendered.seed))
        except BaseException as exc:
            generation.admission.release()
            await self.store.discard(staged)
            async with self.ledger.atomic():
                await payment.release()
                await self.ledger.update_generation(generation_id, GenerationStatus.FAILED, error=repr(exc))
            metrics.generation_finished(spec.id, "failed")
            raise
        images = [_image_record(image) for image in staged]
        timings.lap("store")

        # 8. Settle: the client is charged only for images that exist. The images' record and the
        # payment's "settling" mark are one ledger transaction; so are its success and the delivery.
        # From here on the generation may also be finished by another process (a resend replayed there, a
        # reconciler): every status change goes through the ledger's claim, so it happens once.
        try:
            async with self.ledger.atomic():
                await self.ledger.update_generation(generation_id, GenerationStatus.SETTLING, images=images,
                                                    provider_cost_micros=result.provider_cost_micros)
                await payment.begin_settlement()
            receipt = await payment.settle()
        except SettlementPending as exc:
            # Kept staged: reconciliation publishes them if the transfer lands.
            async with self.ledger.claim_generation(generation_id, [GenerationStatus.SETTLING]) as claim:
                if claim is not None:
                    await claim.update(GenerationStatus.SETTLEMENT_PENDING, error=exc.message)
                    metrics.generation_finished(spec.id, "settlement_pending")
            raise
        except (SettlementFailed, PaymentUnavailable) as exc:
            # Refused, or never attempted: no money moved, so the images are not delivered. (Running still
            # when the payment was no longer ours to settle: that whole transaction was rolled back.)
            unfinished = [GenerationStatus.RUNNING, GenerationStatus.SETTLING]
            async with self.ledger.claim_generation(generation_id, unfinished) as claim:
                if claim is not None:
                    await self.store.discard(staged)
                    await claim.update(GenerationStatus.SETTLEMENT_FAILED, error=exc.message)
                    metrics.generation_finished(spec.id, "settlement_failed")
            raise
        faults.reached("settled")
        timings.lap("settle")

        # 9. Publish and respond (unless a replay of this payment elsewhere already published them). A crash
        # before this commit leaves the payment settling: reconciliation finds the transfer on chain and
        # publishes the images then.
        async with self.ledger.claim_generation(generation_id, [GenerationStatus.SETTLING]) as claim:
            await payment.record_settlement()
            if claim is not None:
                await self.store.publish(staged)
                await claim.update(GenerationStatus.COMPLETED, receipt=_receipt_record(receipt),
                                   charged_amount=receipt.amount if receipt else 0)
                _delivered(spec.id, receipt, result.provider_cost_micros)
        timings.lap("publish")
        return GenerationOutcome(
            request=request,
            images=[self._stored(image, base_url) for image in images],
            price=generation.price,
            receipt=receipt,
            generation_id=generation_id,
            timings=timings.laps,
        )

    async def replay(self, replay: Replay, base_url: str) -> GenerationOutcome:
        """The answer a paid generation got, for a client that lost it and sent the same payment again."""
        generation_id = replay.generation_id
        logs.annotate(generation_id=generation_id, replayed=True, transaction=replay.receipt.transaction)
        # The payment layer replays only settled payments. Settled but not published yet: the request
        # that paid is about to publish, or its process died, or the outcome was unknown there. Whoever
        # claims the generation first publishes it (here or there); the other finds it completed.
        unfinished = [GenerationStatus.SETTLING, GenerationStatus.SETTLEMENT_PENDING]
        async with self.ledger.claim_generation(generation_id, unfinished) as claim:
            if claim is not None:
                await self.store.publish([_staged(image) for image in claim.record.images])
                await claim.update(GenerationStatus.COMPLETED, receipt=_receipt_record(replay.receipt),
                                   charged_amount=replay.receipt.amount)
                _delivered(claim.record.model, replay.receipt, claim.record.provider_cost_micros)
        record = await self.ledger.generation(generation_id)
        if record is None:
            raise InternalError(f"payment refers to unknown generation {generation_id}")
        if record.status is not GenerationStatus.COMPLETED:
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

    async def keep_alive(self) -> None:
        """Mark this process's paid work alive, so that ``stale_after_s`` never takes it for dead."""
        for payment in list(self._live.values()):
            await payment.keep_alive()

    async def reconcile_pending(self, stale_after_s: float) -> None:
        """Finish what unknown settlement outcomes and dead processes left behind.

        Settled: the staged images are published (the client gets them by resending its payment).
        Refused or never settled: they are discarded and the payment is the client's again. Nothing
        paid for is lost, nothing unpaid is published, and no staged image is left behind.
        """
        outcomes = {o.generation_id: o for o in await self.payments.reconcile(stale_after_s)}
        cutoff = datetime.now(UTC) - timedelta(seconds=stale_after_s)
        for stale in await self.ledger.generations_with_status(GenerationStatus.SETTLING, updated_before=cutoff):
            if stale.payment_key is not None and stale.id not in outcomes:
                outcome = await self.payments.outcome(stale.payment_key)
                if outcome is not None:
                    outcomes[stale.id] = outcome
        unfinished = [GenerationStatus.SETTLEMENT_PENDING, GenerationStatus.SETTLING]
        for outcome in outcomes.values():
            # Several API processes reconcile the same ledger: a generation another one is finishing is
            # skipped (it is done when that claim ends), one already finished is not claimable.
            async with self.ledger.claim_generation(outcome.generation_id, unfinished, skip_locked=True) as claim:
                if claim is None:
                    continue
                staged = [_staged(image) for image in claim.record.images]
                if outcome.settled:
                    await self.store.publish(staged)
                    await claim.update(GenerationStatus.COMPLETED, receipt=_receipt_record(outcome.receipt),
                                       charged_amount=outcome.receipt.amount)
                    _delivered(claim.record.model, outcome.receipt, claim.record.provider_cost_micros)
                elif await self._payment_finally_unsettled(claim.record):
                    await self.store.discard(staged)
                    await claim.update(GenerationStatus.SETTLEMENT_FAILED, error="settlement did not happen")
                else:
                    continue  # a settlement is under way again: its outcome comes in a later round
                log.info("reconciled generation %s: %s", claim.record.id,
                         "settled, images published" if outcome.settled else "not settled, images discarded")
        await self._finish_abandoned(cutoff, free_cutoff=cutoff - timedelta(seconds=self.render_timeout_s))
        await self._sweep_staged(cutoff)

    async def reconciliation_backlog(self) -> tuple[int, int]:
        """Payments whose settlement outcome is unknown, and generations waiting for that outcome."""
        payments = await self.ledger.payments_with_status(PaymentStatus.PENDING)
        generations = await self.ledger.generations_with_status(GenerationStatus.SETTLEMENT_PENDING)
        return len(payments), len(generations)

    async def _payment_finally_unsettled(self, record: GenerationRecord) -> bool:
        """Whether ``record``'s payment is, as of now, failed or released: images are only ever discarded
        then (an outcome read a moment ago may already be overtaken by a settlement under way)."""
        payment = None if record.payment_key is None else await self.ledger.payment(record.payment_key)
        return payment is None or payment.status in (PaymentStatus.FAILED, PaymentStatus.RELEASED)

    async def _finish_abandoned(self, cutoff: datetime, *, free_cutoff: datetime) -> None:
        """Generations left running or settling by a request that died: their payment tells their fate.

        A paid request keeps its payment alive (``keep_alive``) while it works, so a generation whose
        payment is released, failed, gone on to buy another generation, or settled while the
        generation never finished, has no request left to finish it.
        """
        for status in (GenerationStatus.RUNNING, GenerationStatus.SETTLING):
            for record in await self.ledger.generations_with_status(status, updated_before=cutoff):
                if record.id in self._live:
                    continue
                if record.payment_key is None:
                    # Payments off: nothing tells whether another process still renders it, but no
                    # render outlives render_timeout_s.
                    if record.created_at.replace(tzinfo=record.created_at.tzinfo or UTC) < free_cutoff:
                        await self._abandon(record, "interrupted (the server stopped while it ran)")
                    continue
                payment = await self.ledger.payment(record.payment_key)
                if payment is None or payment.generation_id != record.id:
                    await self._abandon(record, "interrupted; its payment was used again for another request")
                elif payment.status in (PaymentStatus.RELEASED, PaymentStatus.FAILED):
                    await self._abandon(record, f"interrupted; its payment is {payment.status}")
                elif payment.status is PaymentStatus.SETTLED and record.status is GenerationStatus.SETTLING:
                    outcome = await self.payments.outcome(record.payment_key)
                    if outcome is not None and outcome.settled:
                        async with self.ledger.claim_generation(record.id, [GenerationStatus.SETTLING],
                                                                skip_locked=True) as claim:
                            if claim is not None:
                                await self.store.publish([_staged(image) for image in claim.record.images])
                                await claim.update(GenerationStatus.COMPLETED,
                                                   receipt=_receipt_record(outcome.receipt),
                                                   charged_amount=outcome.receipt.amount)
                                _delivered(claim.record.model, outcome.receipt, claim.record.provider_cost_micros)
                # Otherwise its payment is reserved or settling (kept alive by a live request) or
                # pending (the chain will tell): not abandoned.

    async def _abandon(self, record: GenerationRecord, reason: str) -> None:
        async with self.ledger.claim_generation(record.id, [record.status], skip_locked=True) as claim:
            if claim is None:
                return  # finished or being finished elsewhere meanwhile
            await self.store.discard([_staged(image) for image in claim.record.images])
            status = (GenerationStatus.SETTLEMENT_FAILED if claim.record.status is GenerationStatus.SETTLING
                      else GenerationStatus.FAILED)
            await claim.update(status, error=reason)
        log.warning("generation %s abandoned: %s", record.id, reason)

    async def _sweep_staged(self, cutoff: datetime) -> None:
        """Staged images nobody will publish or discard any more (their request died): published when
        their generation is completed (a publish cut short), discarded when it will never be."""
        for entry in await self.store.staged_before(cutoff):
            record = None if entry.generation_id is None else await self.ledger.generation(entry.generation_id)
            if record is not None and record.status in (GenerationStatus.RUNNING, GenerationStatus.SETTLING,
                                                         GenerationStatus.SETTLEMENT_PENDING):
                continue  # still being finished: by its request, or by the reconciliation above
            if (record is not None and record.status is GenerationStatus.COMPLETED
                    and any(image["uuid"] == entry.image.uuid for image in record.images)):
                await self.store.publish([entry.image])
            else:
                await self.store.discard([entry.image])
                log.info("discarded orphaned staged image %s (generation %s)", entry.image.uuid,
                         entry.generation_id)

    async def check_availability(self) -> None:
        """Ask every catalog model's availability once: backends that probe (a model hub) start here,
        all at once (each probe has its own short timeout)."""
        await asyncio.gather(*(self.engine.availability(spec) for spec in self.catalog.values()))

    async def estimate(self, body: dict[str, Any]) -> dict[str, Any]:
        request = parse_image_request(body, self.catalog, require_prompt=False)
        spec = self.catalog[request.model]
        self.engine.check_request(spec, request)
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
            availability = await self.engine.availability(spec)
            price = pricing.quote(spec, spec.default_width, spec.default_height, 1, spec.steps.default)
            entries.append(
                {
                    "id": spec.id,
                    "name": spec.name,
                    "description": spec.description,
                    "backend": spec.backend,
                    "default": spec.id == self.catalog.default_model,
                    "benchmarkOnly": spec.benchmark_only,
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
        await self.engine.aclose()
        await self.store.aclose()
        await self.ledger.aclose()

    async def _require_available(self, spec: ModelSpec) -> None:
        availability = await self.engine.availability(spec)
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

    def _stored(self, image: dict[str, Any], base_url: str) -> StoredImage:
        output_format = OutputFormat(image["format"])
        # A store behind a CDN gives its own URL; otherwise the API's /images route serves it.
        url = (self.store.public_url(image["uuid"], output_format)
               or f"{base_url.rstrip('/')}/images/{image['uuid']}.{output_format.extension}")
        return StoredImage(
            uuid=image["uuid"],
            url=url,
            seed=image["seed"],
            width=image["width"],
            height=image["height"],
            media_type=output_format.media_type,
        )


def _delivered(model: str, receipt: PaymentReceipt | None, provider_cost: int | None) -> None:
    """A generation reached the client's hands (completed): revenue and provider cost for the books."""
    metrics.generation_finished(model, "completed")
    if receipt is not None:
        logs.annotate(transaction=receipt.transaction, charged=receipt.amount, network=receipt.network)
        metrics.revenue(model, receipt.network, receipt.asset, receipt.amount, provider_cost)


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
