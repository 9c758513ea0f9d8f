"""fal: FLUX endpoints such as ``fal-ai/flux/schnell``, through the queue (default) or synchronously.

Sync: ``POST https://fal.run/<endpoint>`` answers with the result. Queue: ``POST
https://queue.fal.run/<endpoint>`` answers ``{request_id, status_url, response_url, cancel_url}``;
``GET status_url`` goes ``IN_QUEUE`` (with ``queue_position``) -> ``IN_PROGRESS`` -> ``COMPLETED``,
then ``GET response_url`` is the result: ``{images: [{url, width, height, content_type}], seed,
has_nsfw_concepts, ...}``.
Auth is ``Authorization: Key <FAL_KEY>``. Reference: https://docs.fal.ai/documentation/model-apis/inference/queue
and https://fal.ai/docs/model-api-reference/image-generation-api/flux-schnell.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import httpx
from pydantic import BaseModel, Field

from imagegate.backends.base import GenerationJob, GenerationResult, RenderedImage, StepCallback
from imagegate.backends.provider import (
    ApiKey,
    Limits,
    PollingSettings,
    ProviderBackend,
    ProviderHttp,
    ProviderOptions,
    Sleep,
    check_limits,
    gather_all,
    gave_up_waiting,
    load_provider_settings,
    safety_flagged,
)
from imagegate.catalog import ModelSpec
from imagegate.config import Settings
from imagegate.types import ImageRequest


class FalSettings(PollingSettings):
    base_url: str = "https://fal.run"
    queue_base_url: str = "https://queue.fal.run"
    api_key_env: str = "FAL_KEY"
    # queue survives waits longer than one HTTP request; sync is one blocking call.
    mode: Literal["queue", "sync"] = "queue"


class FalOptions(ProviderOptions):
    # png by default: imagegate re-encodes when it stores, so jpeg upstream would lose twice.
    output_format: Literal["jpeg", "png"] = "png"
    enable_safety_checker: bool = True
    acceleration: Literal["none", "regular", "high"] | None = None
    # The endpoint's step limit, for endpoints missing from DOCUMENTED below.
    max_steps: int | None = Field(default=None, ge=1)


ANY_SEED = (0, 2**63 - 1)
# Negative prompts: fal's FLUX endpoints have none. No size rule: image_size takes {width, height}.
DOCUMENTED = {
    "fal-ai/flux/schnell": Limits(
        max_images=4, steps=(1, 12), guidance=(1.0, 20.0), negative_prompt_chars=None, seed=ANY_SEED
    ),
}
OTHER_FLUX = Limits(max_images=4, steps=(1, 50), guidance=(1.0, 20.0), negative_prompt_chars=None, seed=ANY_SEED)


def limits_for(source: str, options: FalOptions) -> Limits:
    limits = DOCUMENTED.get(source, OTHER_FLUX)
    if options.max_steps is not None:
        return Limits(
            limits.max_images, (1, options.max_steps), limits.guidance, None, limits.seed, limits.max_prompt_chars
        )
    return limits


class _Image(BaseModel):
    url: str


class _Result(BaseModel):
    images: list[_Image]
    seed: int | None = None
    # One flag per image when the safety checker ran (enable_safety_checker).
    has_nsfw_concepts: list[bool] = []


class _Submitted(BaseModel):
    request_id: str
    status_url: str
    response_url: str
    cancel_url: str | None = None


class _Status(BaseModel):
    status: str


def error_message(body: object) -> str | None:
    """``{"detail": "text"}`` or FastAPI-style ``{"detail": [{"loc", "msg", "type"}]}``."""
    if isinstance(body, str):
        return body or None
    if not isinstance(body, dict):
        return None
    detail = body.get("detail")
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(part) for part in item.get("loc", []) if part != "body")
                parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
        return "; ".join(parts) or None
    return str(detail) if detail else None


class FalBackend(ProviderBackend):
    name = "fal"
    options_model = FalOptions
    settings: FalSettings

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        config = load_provider_settings(settings, self.name, FalSettings)
        http = ProviderHttp(
            self.name,
            config,
            auth_scheme="Key",
            message_of=error_message,
            trusted_urls=[config.queue_base_url],
            transport=transport,
            sleep=sleep,
        )
        super().__init__(config, http)

    def check_request(self, spec: ModelSpec, request: ImageRequest) -> None:
        options = FalOptions.of(spec)
        check_limits(f"fal endpoint {spec.source}", spec, request, limits_for(spec.source, options))

    async def generate(self, job: GenerationJob, on_step: StepCallback | None = None) -> GenerationResult:
        options = FalOptions.of(job.spec)
        key = self.api_key()
        # fal reports one seed per request, and the other images of a batch come from seeds it derives
        # without reporting them: so one request per image, concurrently, each seeded with its own.
        images = await gather_all([self._one(job, options, seed, key) for seed in job.seeds])
        # fal reports no cost.
        return GenerationResult(images=images)

    async def _one(self, job: GenerationJob, options: FalOptions, seed: int, key: ApiKey) -> RenderedImage:
        # 1. Our fields -> fal's input (image_size as an object: exactly the requested size).
        payload: dict[str, object] = {
            "prompt": job.prompt,
            "image_size": {"width": job.width, "height": job.height},
            "num_inference_steps": job.steps,
            "num_images": 1,
            "seed": seed,
            "output_format": options.output_format,
            "enable_safety_checker": options.enable_safety_checker,
        }
        if job.guidance is not None:
            payload["guidance_scale"] = job.guidance
        if options.acceleration is not None:
            payload["acceleration"] = options.acceleration

        # 2. Run it: one blocking call, or submit -> poll status -> fetch the result.
        endpoint = job.spec.source.strip("/")
        if self.settings.mode == "sync":
            body = await self.http.call(
                "POST", f"{self.settings.base_url.rstrip('/')}/{endpoint}", key, json_body=payload
            )
        else:
            body = await self._queued(f"{self.settings.queue_base_url.rstrip('/')}/{endpoint}", payload, key)
        result = self.http.parse(_Result, body, key)
        if len(result.images) != 1:
            raise self.http.unusable(f"{len(result.images)} image(s) for 1 requested", key)
        # fal answers a flagged image with a black one and has_nsfw_concepts: [true].
        if any(result.has_nsfw_concepts):
            raise safety_flagged(self.name, [seed])

        # 3. Fetch the image and check it decodes at the requested size; the seed is fal's report.
        image = await self.http.image(result.images[0].url, job.width, job.height, key)
        return RenderedImage(image, result.seed if result.seed is not None else seed)

    async def _queued(self, submit_url: str, payload: dict[str, object], key: ApiKey) -> object:
        submitted = self.http.parse(_Submitted, await self.http.call("POST", submit_url, key, json_body=payload), key)
        try:
            for _ in range(self.settings.max_polls):
                status = self.http.parse(_Status, await self.http.call("GET", submitted.status_url, key), key)
                if status.status == "COMPLETED":
                    return await self.http.call("GET", submitted.response_url, key)
                if status.status not in ("IN_QUEUE", "IN_PROGRESS"):
                    raise self.http.unusable(f"an unknown queue status {status.status[:40]!r}", key)
                await self.http.sleep(self.settings.poll_interval_s)
        except asyncio.CancelledError:
            # Another image of the generation failed (or the client left): nobody will collect this one.
            await self._cancel(submitted, key)
            raise
        await self._cancel(submitted, key)
        raise gave_up_waiting(self.name, self.settings)

    async def _cancel(self, submitted: _Submitted, key: ApiKey) -> None:
        # Stop paying for a result nobody will collect.
        if submitted.cancel_url:
            await self.http.best_effort("PUT", submitted.cancel_url, key)
