"""Runware: one ``imageInference`` task through the REST task API.

``POST https://api.runware.ai/v1`` with a JSON array of tasks and ``Authorization: Bearer <key>``;
delivery is synchronous, the reply's ``data`` holds one entry per image with its URL, seed, its
``NSFWContent`` flag when Runware's content check ran, and, with ``includeCost``, its price in USD.
Errors come as ``{"errors": [{code, message, parameter, ...}]}`` with HTTP 400/401/402 (insufficient
balance)/403; 429, 503 and 504 are transient queue pressure.
Reference: https://runware.ai/docs/en/image-inference/api-reference, .../platform/errors.
"""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Literal

import httpx
from pydantic import BaseModel, Field

from imagegate.backends.base import GenerationJob, GenerationResult, RenderedImage, StepCallback
from imagegate.backends.provider import (
    Limits,
    ProviderBackend,
    ProviderHttp,
    ProviderOptions,
    ProviderSettings,
    Sleep,
    check_limits,
    gather_all,
    load_provider_settings,
    negative_prompt,
    safety_flagged,
    usd_to_micros,
)
from imagegate.catalog import ModelSpec
from imagegate.config import Settings
from imagegate.types import ImageRequest


class RunwareSettings(ProviderSettings):
    base_url: str = "https://api.runware.ai/v1"
    api_key_env: str = "RUNWARE_API_KEY"


class RunwareOptions(ProviderOptions):
    # PNG by default: imagegate re-encodes when it stores, so a lossy upstream format would lose twice.
    output_format: Literal["PNG", "JPG", "WEBP"] = "PNG"
    output_type: Literal["URL", "base64Data", "dataURI"] = "URL"
    output_quality: int | None = Field(default=None, ge=20, le=99)
    scheduler: str | None = None


SEEDS = (1, 2**63 - 1)
# Documented ranges. width/height (128-2048, multiples of 64) are exactly our own rule, so every size
# a client may ask for is produced as asked; prompts (2-3000 characters) likewise.
LIMITS = Limits(
    max_images=20,
    steps=(1, 100),
    guidance=(0.0, 50.0),
    negative_prompt_chars=(2, 3000),
    seed=SEEDS,
    max_prompt_chars=3000,
)


class _Image(BaseModel):
    taskType: str
    taskUUID: str
    imageURL: str | None = None
    imageBase64Data: str | None = None
    imageDataURI: str | None = None
    seed: int | None = None
    # Present when Runware's content check ran: true when it flagged the generated image.
    NSFWContent: bool | None = None
    cost: Decimal | None = None

    @property
    def ref(self) -> str | None:
        return self.imageURL or self.imageDataURI or self.imageBase64Data


class _Reply(BaseModel):
    data: list[_Image] = []


def error_message(body: object) -> str | None:
    """``{"errors": [{"code", "message", "parameter", ...}]}`` as one line."""
    if not isinstance(body, dict) or not isinstance(body.get("errors"), list):
        return body if isinstance(body, str) and body else None
    parts = []
    for error in body["errors"]:
        if isinstance(error, dict):
            text = str(error.get("message") or error.get("code") or "error")
            parts.append(f"{text} (parameter: {error['parameter']})" if error.get("parameter") else text)
    return "; ".join(parts) or None


class RunwareBackend(ProviderBackend):
    name = "runware"
    options_model = RunwareOptions

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        config = load_provider_settings(settings, self.name, RunwareSettings)
        http = ProviderHttp(self.name, config, message_of=error_message, transport=transport, sleep=sleep)
        super().__init__(config, http)

    def check_request(self, spec: ModelSpec, request: ImageRequest) -> None:
        RunwareOptions.of(spec)
        check_limits(f"Runware model {spec.source}", spec, request, LIMITS)

    async def generate(self, job: GenerationJob, on_step: StepCallback | None = None) -> GenerationResult:
        options = RunwareOptions.of(job.spec)
        key = self.api_key()

        # 1. Our fields -> one imageInference task (field names as Runware spells them).
        task_uuid = str(uuid.uuid4())
        task: dict[str, object] = {
            "taskType": "imageInference",
            "taskUUID": task_uuid,
            "positivePrompt": job.prompt,
            "model": job.spec.source,
            "width": job.width,
            "height": job.height,
            "numberResults": len(job.seeds),
            "steps": job.steps,
            "outputType": options.output_type,
            "outputFormat": options.output_format,
            "includeCost": True,
        }
        if negative := negative_prompt(job.negative_prompt):
            task["negativePrompt"] = negative
        if job.guidance is not None:
            task["CFGScale"] = job.guidance
        # Runware seeds start at 1; a drawn seed of 0 is left to Runware, which reports the one it used.
        if SEEDS[0] <= job.seeds[0] <= SEEDS[1]:
            task["seed"] = job.seeds[0]
        if options.output_quality is not None:
            task["outputQuality"] = options.output_quality
        if options.scheduler is not None:
            task["scheduler"] = options.scheduler

        # 2. Run it; the reply carries every image of our task.
        body = await self.http.call("POST", self.settings.base_url, key, json_body=[task])
        results = [
            image
            for image in self.http.parse(_Reply, body, key).data
            if image.taskUUID == task_uuid and image.taskType == "imageInference"
        ]
        refs = [image.ref for image in results]
        if len(results) != len(job.seeds) or any(ref is None for ref in refs):
            raise self.http.unusable(f"{len(results)} usable image(s) for {len(job.seeds)} requested", key)
        # A flagged image is never returned (nor charged), and neither is the rest of its batch.
        if flagged := [image.seed for image in results if image.NSFWContent]:
            raise safety_flagged(self.name, flagged)

        # 3. Fetch each image and check it decodes at the requested size.
        images = await gather_all([self.http.image(ref, job.width, job.height, key) for ref in refs if ref is not None])

        # 4. Seeds and cost as Runware reports them (cost only when every image has one).
        costs = [image.cost for image in results if image.cost is not None]
        cost = usd_to_micros(sum(costs, Decimal(0))) if len(costs) == len(results) else None
        return GenerationResult(
            images=[RenderedImage(image, result.seed) for image, result in zip(images, results, strict=True)],
            provider_cost_micros=cost,
        )
