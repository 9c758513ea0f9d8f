"""Replicate: a prediction on a FLUX-style model such as ``black-forest-labs/flux-schnell``.

``POST /v1/models/<owner>/<name>/predictions`` (or ``POST /v1/predictions`` with ``version`` when the
source pins one as ``owner/name:version``) with ``{"input": {...}}`` creates a prediction; ``GET
/v1/predictions/<id>`` is polled until its status is ``succeeded`` (``output``: a list of image
URLs), ``failed`` (``error``) or ``canceled``. Outputs are deleted after an hour, so we fetch them
at once. Auth is ``Authorization: Bearer <REPLICATE_API_TOKEN>``.

The FLUX input has no width/height: the size follows ``aspect_ratio`` and ``megapixels``, so only
sizes listed in the model's ``options.sizes`` are accepted (anything else could not come back at
the requested size). Reference: https://replicate.com/black-forest-labs/flux-schnell (input schema),
https://replicate.com/docs/topics/webhooks/receive-webhook (prediction object).
"""

from __future__ import annotations

import asyncio
import re
from typing import Literal
from urllib.parse import quote

import httpx
from pydantic import BaseModel, Field, field_validator

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
from imagegate.errors import InvalidParameter, UpstreamUnavailable
from imagegate.types import ImageRequest

AspectRatio = Literal["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]


class ReplicateSettings(PollingSettings):
    base_url: str = "https://api.replicate.com/v1"
    api_key_env: str = "REPLICATE_API_TOKEN"


class ReplicateSize(BaseModel):
    aspect_ratio: AspectRatio
    megapixels: Literal["1", "0.25"]


class ReplicateOptions(ProviderOptions):
    # "WIDTHxHEIGHT" -> the input that yields exactly that size. Square 1 MP and 0.25 MP are the only
    # ones we rely on by default; add others once checked (a wrong entry fails as a size mismatch).
    sizes: dict[str, ReplicateSize] = Field(
        default_factory=lambda: {
            "1024x1024": ReplicateSize(aspect_ratio="1:1", megapixels="1"),
            "512x512": ReplicateSize(aspect_ratio="1:1", megapixels="0.25"),
        }
    )
    # fp8 "go fast" mode: faster, but its outputs are not deterministic even with a seed.
    go_fast: bool = False
    # png by default: imagegate re-encodes when it stores, so a lossy upstream format would lose twice.
    output_format: Literal["webp", "jpg", "png"] = "png"
    output_quality: int | None = Field(default=None, ge=0, le=100)
    disable_safety_checker: bool = False
    # The model's step limit, for models missing from DOCUMENTED below.
    max_steps: int | None = Field(default=None, ge=1)

    @field_validator("sizes")
    @classmethod
    def _size_keys(cls, sizes: dict[str, ReplicateSize]) -> dict[str, ReplicateSize]:
        for name in sizes:
            if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", name):
                raise ValueError(f"size {name!r} is not WIDTHxHEIGHT")
        return sizes


ANY_SEED = (0, 2**63 - 1)
# No guidance or negative prompt in the FLUX schnell input schema; 1-4 outputs, 1-4 steps.
DOCUMENTED = {
    "black-forest-labs/flux-schnell": Limits(
        max_images=4, steps=(1, 4), guidance=None, negative_prompt_chars=None, seed=ANY_SEED
    ),
}
OTHER_FLUX = Limits(max_images=4, steps=(1, 50), guidance=None, negative_prompt_chars=None, seed=ANY_SEED)


def limits_for(source: str, options: ReplicateOptions) -> Limits:
    limits = DOCUMENTED.get(source.partition(":")[0], OTHER_FLUX)
    steps = (1, options.max_steps) if options.max_steps is not None else limits.steps
    # go_fast cannot honour a seed: refuse the seed rather than return an unreproducible image.
    seed = None if options.go_fast else limits.seed
    return Limits(limits.max_images, steps, None, None, seed, limits.max_prompt_chars)


class _Prediction(BaseModel):
    id: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    status: str
    output: list[str] | str | None = None
    error: str | None = None


def error_message(body: object) -> str | None:
    """Problem details: ``{"title", "detail", "status"}``."""
    if isinstance(body, str):
        return body or None
    if not isinstance(body, dict):
        return None
    detail, title = body.get("detail"), body.get("title")
    return str(detail or title) if (detail or title) else None


class ReplicateBackend(ProviderBackend):
    name = "replicate"
    options_model = ReplicateOptions
    settings: ReplicateSettings

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        config = load_provider_settings(settings, self.name, ReplicateSettings)
        http = ProviderHttp(self.name, config, message_of=error_message, transport=transport, sleep=sleep)
        super().__init__(config, http)

    def check_request(self, spec: ModelSpec, request: ImageRequest) -> None:
        options = ReplicateOptions.of(spec)
        where = f"Replicate model {spec.source}"
        if options.go_fast and request.seed is not None:
            raise InvalidParameter(
                f"{where} runs with go_fast, whose outputs are not deterministic even with a seed; leave seed out",
                field="seed",
            )
        check_limits(where, spec, request, limits_for(spec.source, options))
        if f"{request.width}x{request.height}" not in options.sizes:
            raise InvalidParameter(f"{where} produces only these sizes: {', '.join(options.sizes)}", field="width")

    async def generate(self, job: GenerationJob, on_step: StepCallback | None = None) -> GenerationResult:
        options = ReplicateOptions.of(job.spec)
        key = self.api_key()
        # Replicate reports no seeds, and the other outputs of a batch come from seeds the model derives:
        # so one prediction per image, concurrently, each seeded with its own. Replicate reports no cost.
        size = options.sizes[f"{job.width}x{job.height}"]
        images = await gather_all([self._one(job, options, size, seed, key) for seed in job.seeds])
        return GenerationResult(images=images)

    async def _one(
        self, job: GenerationJob, options: ReplicateOptions, size: ReplicateSize, seed: int, key: ApiKey
    ) -> RenderedImage:
        # 1. Our fields -> the FLUX input (the size through its aspect ratio and megapixels).
        model_input: dict[str, object] = {
            "prompt": job.prompt,
            "aspect_ratio": size.aspect_ratio,
            "megapixels": size.megapixels,
            "num_outputs": 1,
            "num_inference_steps": job.steps,
            "seed": seed,
            "output_format": options.output_format,
            "go_fast": options.go_fast,
            "disable_safety_checker": options.disable_safety_checker,
        }
        if options.output_quality is not None:
            model_input["output_quality"] = options.output_quality

        # 2. Create the prediction, then poll it until it ends.
        prediction = await self._create(job.spec.source, model_input, key)
        try:
            for _ in range(self.settings.max_polls):
                if prediction.status not in ("starting", "processing"):
                    break
                await self.http.sleep(self.settings.poll_interval_s)
                reply = await self.http.call("GET", self._url(prediction.id), key)
                prediction = self.http.parse(_Prediction, reply, key)
            else:
                await self._cancel(prediction, key)
                raise gave_up_waiting(self.name, self.settings)
        except asyncio.CancelledError:
            # Another image of the generation failed (or the client left): nobody will collect this one.
            await self._cancel(prediction, key)
            raise
        if prediction.status != "succeeded":
            reason = key.redact(prediction.error or "no reason given")
            # The FLUX models drop flagged outputs and fail a prediction left with none ("NSFW content
            # detected. Try running it again, or try a different prompt.").
            if prediction.status == "failed" and "nsfw" in reason.lower():
                raise safety_flagged(self.name, [seed])
            raise UpstreamUnavailable(
                f"the upstream image provider could not complete the generation ({prediction.status}: {reason[:300]})",
                retry_after=self.settings.retry_after_s,
            )
        urls = [prediction.output] if isinstance(prediction.output, str) else list(prediction.output or [])
        if len(urls) != 1:
            raise self.http.unusable(f"{len(urls)} image(s) for 1 requested", key)

        # 3. Fetch the image at once (Replicate deletes outputs within the hour) and check its size. The
        #    seed we sent reproduces it, go_fast excepted.
        image = await self.http.image(urls[0], job.width, job.height, key)
        return RenderedImage(image, None if options.go_fast else seed)

    async def _cancel(self, prediction: _Prediction, key: ApiKey) -> None:
        # Stop paying for a prediction nobody will collect.
        await self.http.best_effort("POST", f"{self._url(prediction.id)}/cancel", key)

    async def _create(self, source: str, model_input: dict[str, object], key: ApiKey) -> _Prediction:
        base = self.settings.base_url.rstrip("/")
        model, _, version = source.partition(":")
        if version:
            url, body = f"{base}/predictions", {"version": version, "input": model_input}
        else:
            owner, _, name = model.partition("/")
            url, body = (
                f"{base}/models/{quote(owner, safe='')}/{quote(name, safe='')}/predictions",
                {"input": model_input},
            )
        return self.http.parse(_Prediction, await self.http.call("POST", url, key, json_body=body), key)

    def _url(self, prediction_id: str) -> str:
        return f"{self.settings.base_url.rstrip('/')}/predictions/{prediction_id}"
