"""Together AI: ``POST /v1/images/generations`` with ``Authorization: Bearer <TOGETHER_API_KEY>``.

The request takes ``model``, ``prompt``, ``width``/``height``, ``n``, ``steps``, ``seed``,
``negative_prompt``, ``guidance_scale``, ``response_format`` (base64|url) and ``output_format``
(jpeg|png); the reply is ``{"data": [{"index", "b64_json" | "url"}]}``. Errors use the OpenAI shape
``{"error": {"message", "type", "code"}}``. Reference: https://docs.together.ai/reference/post-images-generations.
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
    ProviderBackend,
    ProviderHttp,
    ProviderOptions,
    ProviderSettings,
    Sleep,
    check_limits,
    gather_all,
    load_provider_settings,
    negative_prompt,
)
from imagegate.catalog import SPEC_MAX_GUIDANCE, SPEC_MAX_STEPS, SPEC_MIN_GUIDANCE, ModelSpec
from imagegate.config import Settings
from imagegate.types import ImageRequest


class TogetherSettings(ProviderSettings):
    base_url: str = "https://api.together.xyz/v1"
    api_key_env: str = "TOGETHER_API_KEY"


class TogetherOptions(ProviderOptions):
    # base64 saves a second round trip; url makes Together host the image until we fetch it.
    response_format: Literal["base64", "url"] = "base64"
    # png by default: imagegate re-encodes when it stores, so jpeg upstream would lose twice.
    output_format: Literal["jpeg", "png"] = "png"
    disable_safety_checker: bool | None = None
    # Together documents no step range ("maximum varies by model"): set the model's own here.
    max_steps: int | None = Field(default=None, ge=1)


def limits_for(options: TogetherOptions) -> Limits:
    # n: up to 4; width/height "multiples of 8", which every size we accept (multiples of 64) is.
    return Limits(
        max_images=4,
        steps=(1, options.max_steps or SPEC_MAX_STEPS),
        guidance=(SPEC_MIN_GUIDANCE, SPEC_MAX_GUIDANCE),
        negative_prompt_chars=(1, 3000),
        seed=(0, 2**63 - 1),
    )


class _Image(BaseModel):
    index: int = 0
    b64_json: str | None = None
    url: str | None = None


class _Reply(BaseModel):
    data: list[_Image]


def error_message(body: object) -> str | None:
    """``{"error": {"message": ...}}`` (or a bare ``{"message": ...}``)."""
    if isinstance(body, str):
        return body or None
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str) and error:
        return error
    return str(body["message"]) if body.get("message") else None


class TogetherBackend(ProviderBackend):
    name = "together"
    options_model = TogetherOptions

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        config = load_provider_settings(settings, self.name, TogetherSettings)
        http = ProviderHttp(self.name, config, message_of=error_message, transport=transport, sleep=sleep)
        super().__init__(config, http)

    def check_request(self, spec: ModelSpec, request: ImageRequest) -> None:
        options = TogetherOptions.of(spec)
        check_limits(f"Together model {spec.source}", spec, request, limits_for(options))

    async def generate(self, job: GenerationJob, on_step: StepCallback | None = None) -> GenerationResult:
        options = TogetherOptions.of(job.spec)
        key = self.api_key()
        # Together reports no seeds, and the other images of a batch (n > 1) come from seeds it derives:
        # so one request per image, concurrently, each seeded with its own. Together reports no cost.
        images = await gather_all([self._one(job, options, seed, key) for seed in job.seeds])
        return GenerationResult(images=images)

    async def _one(self, job: GenerationJob, options: TogetherOptions, seed: int, key: ApiKey) -> RenderedImage:
        # 1. Our fields -> Together's (same names as ours but snake_case; width/height exact).
        payload: dict[str, object] = {
            "model": job.spec.source,
            "prompt": job.prompt,
            "width": job.width,
            "height": job.height,
            "n": 1,
            "steps": job.steps,
            "seed": seed,
            "response_format": options.response_format,
            "output_format": options.output_format,
        }
        if negative := negative_prompt(job.negative_prompt):
            payload["negative_prompt"] = negative
        if job.guidance is not None:
            payload["guidance_scale"] = job.guidance
        if options.disable_safety_checker is not None:
            payload["disable_safety_checker"] = options.disable_safety_checker

        # 2. One call; the image comes inline (base64) or as a URL.
        url = f"{self.settings.base_url.rstrip('/')}/images/generations"
        reply = self.http.parse(_Reply, await self.http.call("POST", url, key, json_body=payload), key)
        refs = [item.b64_json or item.url for item in reply.data]
        if len(refs) != 1 or refs[0] is None:
            raise self.http.unusable(f"{len(refs)} image(s) for 1 requested", key)

        # 3. Decode or fetch it and check its size; the seed we sent reproduces it.
        return RenderedImage(await self.http.image(refs[0], job.width, job.height, key), seed)
