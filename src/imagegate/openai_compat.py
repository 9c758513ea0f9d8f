"""``POST /v1/images/generations`` in the OpenAI Images API's shapes, over the same flow and payment.

A request is mapped field by field onto a native generation body (``to_native``): what has a
meaning here is mapped, what has none is accepted only at its neutral value and otherwise refused
with an OpenAI-shaped 400 naming the field; unknown fields are refused as OpenAI does. The answer
is ``{"created", "data": [{"url"} | {"b64_json"}], ...}``; every error is
``{"error": {"message", "type", "param", "code"}}`` — the 402 too, beside the x402 v1 fields
(``x402Version``, ``accepts``) and with the v2 ``PAYMENT-REQUIRED`` header, so x402 clients pay it.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

from fastapi.responses import JSONResponse

from imagegate.catalog import Catalog
from imagegate.errors import ImagegateError, InvalidParameter, PaymentRequired, SettlementPending
from imagegate.storage import ImageStore
from imagegate.types import GenerationOutcome, OutputFormat
from imagegate.validation import (
    MAX_PROMPT,
    MAX_RESULTS,
    MAX_SEED,
    MAX_SIDE,
    MIN_PROMPT,
    MIN_RESULTS,
    MIN_SIDE,
    SIDE_MULTIPLE,
)

# Python's str.isspace and the regex class \S agree, so "more than whitespace" is exactly this pattern.
NOT_BLANK = r"\S"

PATH = "/v1/images/generations"
DESCRIPTION = "Generate images from a text prompt (OpenAI Images API shape). Paid per request with x402 (USDC)."
RESPONSE_FORMATS = ("url", "b64_json")
SIZE = re.compile(r"^([0-9]{2,5})x([0-9]{2,5})$")
# Native fields whose errors name an OpenAI parameter.
PARAM_OF_FIELD = {"numberResults": "n", "width": "size", "height": "size", "outputFormat": "output_format",
                  "prompt": "prompt", "model": "model", "seed": "seed"}
# OpenAI fields accepted only at these values (they have no other meaning here).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    # Quality here is the model and its steps; "auto"/"standard" mean the model's defaults.
    "quality": ("auto", "standard"),
    # Images are always opaque.
    "background": ("auto", "opaque"),
    # This server does not moderate prompts; both levels are accepted and mean the same.
    "moderation": ("auto", "low"),
    # Lossy formats use the server's quality setting.
    "output_compression": (100,),
    "stream": (False,),
    "partial_images": (0,),
}
REFUSED = {
    "style": "style is a dall-e-3 setting with no equivalent here; describe the style in the prompt.",
    "quality": "quality must be 'auto' or 'standard': image quality here is set by the model and its steps.",
    "background": "background must be 'auto' or 'opaque': transparent backgrounds are not supported.",
    "moderation": "moderation must be 'auto' or 'low'.",
    "output_compression": "output_compression is not supported: jpeg and webp use the server's quality.",
    "stream": "stream is not supported: follow GET /v1/requests/{X-Request-ID}/events, or submit to "
              "/v1/images/generate with Prefer: respond-async and follow the job's events.",
    "partial_images": "partial_images is not supported (no streaming).",
}
ACCEPTED = frozenset({"prompt", "model", "n", "size", "response_format", "output_format", "user", "seed",
                      *NEUTRAL_VALUES, *REFUSED})


class OpenAIParameterError(InvalidParameter):
    """A 400 about an OpenAI parameter (named as OpenAI names it)."""

    def __init__(self, message: str, *, param: str, code: str = "invalid_value"):
        super().__init__(message, field=param)
        self.openai_code = code


@dataclass(frozen=True)
class OpenAIOptions:
    response_format: str


def to_native(body: dict[str, Any]) -> tuple[dict[str, Any], OpenAIOptions]:
    """The native generation body and the response options, or ``OpenAIParameterError``."""
    for name in body:
        if name not in ACCEPTED:
            raise OpenAIParameterError(f"Unrecognized request argument supplied: {name}", param=name,
                                       code="unknown_parameter")
    for name, neutral in NEUTRAL_VALUES.items():
        value = body.get(name)
        if value is not None and (value not in neutral or isinstance(value, bool) != isinstance(neutral[0], bool)):
            raise OpenAIParameterError(REFUSED[name], param=name, code="unsupported_value")
    if "style" in body:
        raise OpenAIParameterError(REFUSED["style"], param="style", code="unsupported_value")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise OpenAIParameterError("user must be a string.", param="user")

    native: dict[str, Any] = {}
    for openai_name, native_name in (("prompt", "prompt"), ("model", "model"), ("n", "numberResults"),
                                     ("output_format", "outputFormat"), ("seed", "seed")):
        if body.get(openai_name) is not None:
            native[native_name] = body[openai_name]
    size = body.get("size")
    if size is not None and size != "auto":
        match = SIZE.match(size) if isinstance(size, str) else None
        if match is None:
            raise OpenAIParameterError(f"size must be 'auto' or 'WIDTHxHEIGHT' (e.g. '1024x1024'), not {size!r}.",
                                       param="size")
        native["width"], native["height"] = int(match[1]), int(match[2])
    response_format = body.get("response_format")
    if response_format is None:
        response_format = "url"
    if not isinstance(response_format, str) or response_format not in RESPONSE_FORMATS:
        raise OpenAIParameterError(f"response_format must be 'url' or 'b64_json', not {response_format!r}.",
                                   param="response_format")
    return native, OpenAIOptions(response_format=response_format)


async def images_response(outcome: GenerationOutcome, options: OpenAIOptions, store: ImageStore) -> dict[str, Any]:
    data: list[dict[str, Any]] = []
    for image in outcome.images:
        if options.response_format == "b64_json":
            extension = OutputFormat(image.media_type.removeprefix("image/")).extension
            # Local files or a bucket alike: the store reads what it published.
            content = b"".join([chunk async for chunk in store.read(image.uuid, extension)])
            data.append({"b64_json": base64.b64encode(content).decode()})
        else:
            data.append({"url": image.url})
    first = outcome.images[0] if outcome.images else None
    response: dict[str, Any] = {"created": int(time.time()), "data": data}
    if first is not None:
        response["size"] = f"{first.width}x{first.height}"
        response["output_format"] = first.media_type.removeprefix("image/")
    return response


def _error_type(error: ImagegateError) -> str:
    if error.status == 402:
        return "payment_required"
    if error.status == 429:
        return "rate_limit_error"
    if error.status >= 500 or isinstance(error, SettlementPending):
        return "server_error"
    if error.status == 403:
        return "permission_error"
    if error.status == 404:
        return "not_found_error"
    return "invalid_request_error"


def error_object(error: ImagegateError) -> dict[str, Any]:
    field = error.details.get("field") if isinstance(error.details, dict) else None
    param = PARAM_OF_FIELD.get(field, field) if isinstance(field, str) else None
    if isinstance(error, OpenAIParameterError):
        code = error.openai_code
    elif isinstance(error, PaymentRequired):
        code = error.reason
    else:
        code = error.code.lower()
    return {"message": error.message, "type": _error_type(error), "param": param, "code": code}


def error_body(error: ImagegateError) -> dict[str, Any]:
    """``{"error": {message, type, param, code}}``, OpenAI's error format."""
    return {"error": error_object(error)}


def error_response(error: ImagegateError) -> JSONResponse:
    headers = dict(error.headers)
    headers.setdefault("Cache-Control", "no-store")
    status = error.status
    body: dict[str, Any] = error_body(error)
    if isinstance(error, PaymentRequired):
        # x402 v1 clients read x402Version and accepts from the body; v2 clients the header.
        body = {**error.challenge_body, **body}
    elif isinstance(error, SettlementPending):
        # A 2xx would read as an empty success to OpenAI clients, and their automatic retry would pay
        # again: the payment is already broadcast. Resending the same payment header gets the images.
        status = 503
        headers["x-should-retry"] = "false"
        body["error"]["message"] += f" Details: {error.details}"
    return JSONResponse(body, status_code=status, headers=headers)


def request_body_schema(catalog: Catalog) -> dict[str, Any]:
    """The request body as ``to_native`` and the validator accept it, for the catalog being served."""
    sides = "|".join(str(side) for side in range(MIN_SIDE, MAX_SIDE + 1, SIDE_MULTIPLE))
    neutral = {name: {"enum": [*values, None]} for name, values in NEUTRAL_VALUES.items()}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["prompt"],
        "properties": {
            "prompt": {"type": "string", "minLength": MIN_PROMPT, "maxLength": MAX_PROMPT, "pattern": NOT_BLANK},
            "model": {"enum": [*catalog, None], "description": "an imagegate model id (GET /v1/images/models)"},
            "n": {"type": ["integer", "null"], "minimum": MIN_RESULTS, "maximum": MAX_RESULTS},
            "size": {"type": ["string", "null"], "pattern": f"^(auto|({sides})x({sides}))$",
                     "description": "'auto' (the model's default) or WIDTHxHEIGHT, sides 128-2048 divisible by 64"},
            "response_format": {"enum": [*RESPONSE_FORMATS, None]},
            "output_format": {"enum": ["png", "jpeg", "webp", None]},
            "user": {"type": ["string", "null"], "description": "accepted and ignored"},
            "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_SEED,
                     "description": "imagegate extension: image i uses seed + i"},
            **neutral,
        },
    }


@cache
def input_schema() -> dict[str, Any]:
    """The request fields advertised in the 402 challenge for discovery."""
    return {
        "bodyType": "json",
        "bodyFields": {
            "prompt": {"type": "string", "minLength": 2, "maxLength": 3000},
            "model": {"type": "string", "description": "imagegate model id (GET /v1/images/models)"},
            "n": {"type": "integer", "minimum": 1, "maximum": 4},
            "size": {"type": "string", "description": "'auto' or WIDTHxHEIGHT, sides 128-2048 divisible by 64"},
            "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS)},
            "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
            "seed": {"type": "integer", "description": "imagegate extension: image i uses seed + i"},
        },
        "required": ["prompt"],
    }


@cache
def output_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "created": {"type": "integer"},
            "data": {"type": "array", "items": {"type": "object", "properties": {
                "url": {"type": "string"}, "b64_json": {"type": "string"}}}},
            "size": {"type": "string"},
            "output_format": {"type": "string"},
        },
        "required": ["created", "data"],
    }
