"""OpenAI Images: ``POST /v1/images/generations`` with ``Authorization: Bearer <OPENAI_API_KEY>``.

The API takes ``model``, ``prompt``, ``n`` and one of a few fixed ``size`` strings per model family;
it has no negative prompt, steps, guidance or seed. GPT image models always answer base64 (and take
``output_format``/``quality``/``moderation``); dall-e models take ``response_format`` (we ask for
``b64_json``: their URLs expire after 60 minutes) and ``quality``/``style`` (dall-e-3). Errors are
``{"error": {"message", "type", "param", "code"}}``; a 429 or 400 whose code is
``insufficient_quota`` / ``billing_hard_limit_reached`` is the account, not a rate limit.
Reference: the OpenAI images create-image request schema (see docs/providers.md).
"""

from __future__ import annotations

import asyncio
from typing import Literal

import httpx
from pydantic import BaseModel, Field

from imagegate.backends.base import GenerationJob, GenerationResult, RenderedImage, StepCallback
from imagegate.backends.provider import (
    Fault,
    Limits,
    ProviderBackend,
    ProviderHttp,
    ProviderOptions,
    ProviderSettings,
    Sleep,
    check_limits,
    fault_for_status,
    gather_all,
    load_provider_settings,
)
from imagegate.catalog import ModelSpec
from imagegate.config import Settings
from imagegate.errors import InvalidParameter, ModelUnavailable
from imagegate.types import ImageRequest

Family = Literal["gpt-image", "dall-e-3", "dall-e-2"]


class OpenAISettings(ProviderSettings):
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    # GPT image generations take tens of seconds.
    timeout_s: float = Field(default=180.0, gt=0)


class OpenAIOptions(ProviderOptions):
    # Inferred from the source (gpt-image-*, dall-e-3, dall-e-2) unless set.
    family: Family | None = None
    # gpt-image: auto|high|medium|low; dall-e-3: hd|standard.
    quality: str | None = None
    style: Literal["vivid", "natural"] | None = None
    output_format: Literal["png", "jpeg", "webp"] = "png"
    moderation: Literal["low", "auto"] | None = None


SIZES: dict[Family, tuple[str, ...]] = {
    "gpt-image": ("1024x1024", "1536x1024", "1024x1536"),
    "dall-e-3": ("1024x1024", "1792x1024", "1024x1792"),
    "dall-e-2": ("256x256", "512x512", "1024x1024"),
}
QUALITIES: dict[Family, tuple[str, ...]] = {
    "gpt-image": ("auto", "high", "medium", "low"),
    "dall-e-3": ("hd", "standard"),
    "dall-e-2": (),
}
# No steps, guidance, negative prompt or seed on any family.
LIMITS: dict[Family, Limits] = {
    "gpt-image": Limits(10, None, None, None, None, max_prompt_chars=32000),
    "dall-e-3": Limits(1, None, None, None, None, max_prompt_chars=4000),
    "dall-e-2": Limits(10, None, None, None, None, max_prompt_chars=1000),
}
ACCOUNT_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "billing_not_active"})


def model_config(spec: ModelSpec) -> tuple[Family, OpenAIOptions]:
    """The model's family and options, or ``ModelUnavailable`` when they do not fit together."""
    options = OpenAIOptions.of(spec)
    family = options.family or _family(spec.source)
    if family is None:
        raise ModelUnavailable(
            f"catalog entry {spec.id!r}: cannot tell the OpenAI model family of {spec.source!r}; set options.family"
        )
    if options.quality is not None and options.quality not in QUALITIES[family]:
        raise ModelUnavailable(f"catalog entry {spec.id!r}: {family} takes no quality {options.quality!r}")
    if options.style is not None and family != "dall-e-3":
        raise ModelUnavailable(f"catalog entry {spec.id!r}: only dall-e-3 takes a style")
    if options.moderation is not None and family != "gpt-image":
        raise ModelUnavailable(f"catalog entry {spec.id!r}: only GPT image models take moderation")
    return family, options


def _family(source: str) -> Family | None:
    if source.startswith("gpt-image"):
        return "gpt-image"
    if source == "dall-e-3":
        return "dall-e-3"
    if source == "dall-e-2":
        return "dall-e-2"
    return None


class _Image(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class _Reply(BaseModel):
    data: list[_Image]


def _error(body: object) -> dict[str, object]:
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def error_message(body: object) -> str | None:
    if isinstance(body, str):
        return body or None
    message = _error(body).get("message")
    return str(message) if message else None


def error_fault(status: int, body: object) -> Fault:
    # OpenAI answers an exhausted quota with 429 and a hard billing limit with 400: neither is
    # retryable nor the client's fault.
    if _error(body).get("code") in ACCOUNT_CODES:
        return Fault.ACCOUNT
    return fault_for_status(status, body)


class OpenAIBackend(ProviderBackend):
    name = "openai"
    options_model = OpenAIOptions

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        config = load_provider_settings(settings, self.name, OpenAISettings)
        http = ProviderHttp(
            self.name, config, message_of=error_message, fault_of=error_fault, transport=transport, sleep=sleep
        )
        super().__init__(config, http)

    def configured(self, spec: ModelSpec) -> object:
        return model_config(spec)

    def check_request(self, spec: ModelSpec, request: ImageRequest) -> None:
        family, _ = model_config(spec)
        where = f"OpenAI model {spec.source}"
        check_limits(where, spec, request, LIMITS[family])
        if f"{request.width}x{request.height}" not in SIZES[family]:
            raise InvalidParameter(f"{where} produces only these sizes: {', '.join(SIZES[family])}", field="width")

    async def generate(self, job: GenerationJob, on_step: StepCallback | None = None) -> GenerationResult:
        family, options = model_config(job.spec)
        key = self.api_key()

        # 1. Our fields -> OpenAI's: prompt, n and the size string; the rest is per family.
        payload: dict[str, object] = {
            "model": job.spec.source,
            "prompt": job.prompt,
            "n": len(job.seeds),
            "size": f"{job.width}x{job.height}",
        }
        if family == "gpt-image":
            payload["output_format"] = options.output_format
            if options.moderation is not None:
                payload["moderation"] = options.moderation
        else:
            payload["response_format"] = "b64_json"
            if options.style is not None:
                payload["style"] = options.style
        if options.quality is not None:
            payload["quality"] = options.quality

        # 2. One call; images come back as base64 (or a URL, should a proxy in between prefer them).
        url = f"{self.settings.base_url.rstrip('/')}/images/generations"
        reply = self.http.parse(_Reply, await self.http.call("POST", url, key, json_body=payload), key)
        refs = [item.b64_json or item.url for item in reply.data]
        if len(refs) != len(job.seeds) or any(ref is None for ref in refs):
            raise self.http.unusable(f"{len(refs)} usable image(s) for {len(job.seeds)} requested", key)

        # 3. Decode each image and check its size.
        images = await gather_all([self.http.image(ref, job.width, job.height, key) for ref in refs if ref])

        # 4. OpenAI takes no seed and reports no cost (only token usage).
        return GenerationResult(images=[RenderedImage(image, None) for image in images])
