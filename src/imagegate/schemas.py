"""JSON shapes of the public API, for OpenAPI and for x402 discovery (``outputSchema``).

Requests are validated by ``validation`` (strict, with the spec's error codes); these models only
describe the wire format, so the documentation and the behaviour cannot drift apart silently:
``tests/unit/test_schemas.py`` checks them against each other.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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
