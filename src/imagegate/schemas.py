"""JSON shapes of the public API, for OpenAPI and for x402 discovery (``outputSchema``).

Requests are validated by ``validation`` (strict, with the spec's error codes); these models only
describe the wire format, so the documentation and the behaviour cannot drift apart silently:
``tests/unit/test_schemas.py`` checks them against each other.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from imagegate import validation
from imagegate.catalog import SPEC_MAX_GUIDANCE, SPEC_MAX_STEPS, SPEC_MIN_GUIDANCE, SPEC_MIN_STEPS, Catalog, ModelSpec


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateBody(_Doc):
    prompt: str = Field(min_length=2, max_length=3000, description="Text description of the image to generate")
    model: str = Field(default="flux-schnell", description="Model id, see GET /v1/images/models")
    width: int = Field(default=1024, ge=128, le=2048, multiple_of=64)
    height: int = Field(default=1024, ge=128, le=2048, multiple_of=64)
    numberResults: int = Field(default=1, ge=1, le=4)
    negativePrompt: str | None = Field(default=None, max_length=3000)
    steps: int | None = Field(default=None, ge=1, le=50, description="Model-dependent default; see supportsSteps")
    guidance: float | None = Field(default=None, ge=1, le=30, description="CFG scale")
    seed: int | None = Field(default=None, ge=0, le=2**53 - 5, description="Image i uses seed + i")
    outputFormat: Literal["png", "webp", "jpeg"] | None = Field(default=None, description="Server default: png")


class EstimateBody(GenerateBody):
    prompt: str | None = Field(default=None, min_length=2, max_length=3000)  # type: ignore[assignment]


class ImageOut(_Doc):
    url: str
    uuid: str
    seed: int | None
    width: int
    height: int


class CostOut(BaseModel):
    usd: str
    amount: str
    asset: str | None = None
    network: str | None = None
    transaction: str | None = None
    payer: str | None = None


class GenerateResponse(_Doc):
    images: list[ImageOut]
    model: str
    steps: int
    cost: CostOut
    id: str


class EstimatedCost(_Doc):
    usd: str = Field(description="Six-decimal USD string, e.g. 0.006955")
    note: str
    amount: str = Field(description="Exact amount in the asset's atomic units, as demanded by the 402")
    asset: str | None
    network: str | None
    decimals: int


class EstimateResponse(_Doc):
    model: str
    dimensions: str = Field(examples=["1024×1024"])
    number_of_images: int
    steps: int
    estimatedCost: EstimatedCost


class ErrorBody(BaseModel):
    error: str = Field(examples=["INVALID_DIMENSIONS"])
    message: str
    details: dict[str, Any] | None = None


@cache
def input_schema() -> dict[str, Any]:
    """The request body schema advertised in the 402 challenge for discovery (bazaar style)."""
    schema = GenerateBody.model_json_schema()
    return {
        "bodyType": "json",
        "bodyFields": schema["properties"],
        "required": schema.get("required", []),
    }


@cache
def output_schema() -> dict[str, Any]:
    return GenerateResponse.model_json_schema()


class PaymentRequiredBody(ErrorBody):
    """The 402 answer: the error format plus the x402 v1 challenge (v2 clients read the PAYMENT-REQUIRED
    header); also the shape of SETTLEMENT_FAILED."""

    x402Version: int | None = Field(default=None, description="1: ``accepts`` holds the v1 payment requirements")
    accepts: list[dict[str, Any]] | None = None
    reason: str | None = Field(default=None, examples=["payment_required", "invalid_exact_evm_insufficient_balance"])


class OpenAIError(BaseModel):
    message: str
    type: str = Field(examples=["invalid_request_error", "payment_required", "server_error"])
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """The errors of the OpenAI-compatible route, in OpenAI's format; its 402 also carries the x402 v1
    challenge (v2 clients read the PAYMENT-REQUIRED header)."""

    error: OpenAIError
    x402Version: int | None = None
    accepts: list[dict[str, Any]] | None = None


# Python's str.isspace and the regex class \S agree, so "more than whitespace" is exactly this pattern.
NOT_BLANK = r"\S"
# outputFormat is matched case-insensitively and "jpg" means jpeg.
OUTPUT_FORMAT_PATTERN = "^([pP][nN][gG]|[wW][eE][bB][pP]|[jJ][pP][eE]?[gG])$"


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``null`` is accepted wherever a field is optional: it means "the default"."""
    return {**schema, "type": [schema["type"], "null"]}


def request_body_schema(catalog: Catalog, *, require_prompt: bool) -> dict[str, Any]:
    """The request body as ``validation.parse_image_request`` accepts it, for the catalog being served.

    One variant per model (``oneOf``, told apart by ``model``): each carries that model's own rules
    (its steps range; null only where it takes no steps, guidance or negative prompt). A body without
    ``model`` (or with null) is the default model's.
    """
    return {"oneOf": [_model_variant(catalog, spec, require_prompt=require_prompt) for spec in catalog.values()]}


def _model_variant(catalog: Catalog, spec: ModelSpec, *, require_prompt: bool) -> dict[str, Any]:
    prompt = {"type": "string", "minLength": validation.MIN_PROMPT, "maxLength": validation.MAX_PROMPT,
              "pattern": NOT_BLANK, "description": "Text description of the image to generate"}
    side = {"type": "integer", "minimum": validation.MIN_SIDE, "maximum": validation.MAX_SIDE,
            "multipleOf": validation.SIDE_MULTIPLE}
    unsupported = {"type": "null", "description": f"{spec.id} does not take this parameter"}
    properties: dict[str, Any] = {
        "prompt": prompt if require_prompt else _nullable(prompt),
        "model": ({"enum": [spec.id, None]} if spec.id == catalog.default_model else {"const": spec.id})
        | {"description": spec.name},
        "width": _nullable({**side, "default": spec.default_width}),
        "height": _nullable({**side, "default": spec.default_height}),
        "numberResults": _nullable({"type": "integer", "minimum": validation.MIN_RESULTS,
                                    "maximum": validation.MAX_RESULTS, "default": 1}),
        "negativePrompt": _nullable({"type": "string", "maxLength": validation.MAX_NEGATIVE_PROMPT})
        if spec.supports_negative_prompt else unsupported,
        "steps": _nullable({"type": "integer", "minimum": max(spec.steps.min, SPEC_MIN_STEPS),
                            "maximum": min(spec.steps.max, SPEC_MAX_STEPS), "default": spec.steps.default})
        if spec.steps.supported else unsupported,
        "guidance": _nullable({"type": "number", "minimum": SPEC_MIN_GUIDANCE, "maximum": SPEC_MAX_GUIDANCE,
                               "description": "CFG scale"})
        if spec.supports_guidance else unsupported,
        "seed": _nullable({"type": "integer", "minimum": 0, "maximum": validation.MAX_SEED,
                           "description": "Image i uses seed + i"}),
        "outputFormat": _nullable({"type": "string", "pattern": OUTPUT_FORMAT_PATTERN,
                                   "description": "png, webp or jpeg (jpg); server default: png"}),
    }
    required = ["prompt"] if require_prompt else []
    if spec.id != catalog.default_model:
        required.append("model")
    return {"title": spec.id, "type": "object", "properties": properties, "required": required,
            "additionalProperties": False}
