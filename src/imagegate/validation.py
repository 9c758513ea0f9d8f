"""Request bodies -> ``ImageRequest``, with the spec's codes for every rule.

Written by hand rather than with a pydantic model because each rule must map to one of the
spec's error codes (INVALID_DIMENSIONS, INVALID_MODEL, INVALID_PARAMETER) with a precise message,
and JSON types must be strict (``"512"`` and ``true`` are not numbers).
"""

from __future__ import annotations

import json
import math
from typing import Any

from imagegate.catalog import (
    SPEC_MAX_GUIDANCE,
    SPEC_MAX_STEPS,
    SPEC_MIN_GUIDANCE,
    SPEC_MIN_STEPS,
    Catalog,
    ModelSpec,
)
from imagegate.errors import InvalidDimensions, InvalidModel, InvalidParameter, InvalidRequest
from imagegate.types import ImageRequest, OutputFormat

MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 128, 2048, 64
MIN_PROMPT, MAX_PROMPT = 2, 3000
MAX_NEGATIVE_PROMPT = 3000
MIN_RESULTS, MAX_RESULTS = 1, 4
# JavaScript clients parse JSON numbers as doubles: larger seeds would not round-trip.
MAX_SEED = 2**53 - 1 - MAX_RESULTS

GENERATE_FIELDS = frozenset(
    {"prompt", "model", "width", "height", "numberResults", "negativePrompt", "steps", "guidance", "seed",
     "outputFormat"}
)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, whatever the Content-Type said (x402 clients may drop it on retry)."""
    if not raw.strip():
        raise InvalidParameter("The request body is empty; send a JSON object such as {\"prompt\": \"a red fox\"}.")
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidParameter(f"The request body is not valid JSON: {exc}.") from exc
    if not isinstance(value, dict):
        raise InvalidParameter(f"The request body must be a JSON object, not {_json_type(value)}.")
    return value


def _reject_constant(name: str) -> float:
    raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)


def parse_image_request(body: dict[str, Any], catalog: Catalog, *, require_prompt: bool) -> ImageRequest:
    """Validate in a fixed order so that the first problem found is the one reported."""
    unknown = sorted(set(body) - GENERATE_FIELDS)
    if unknown:
        raise InvalidParameter(
            f"Unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"accepted fields are {', '.join(sorted(GENERATE_FIELDS))}.",
            field=unknown[0],
        )

    prompt = _optional_string(body, "prompt", MIN_PROMPT, MAX_PROMPT)
    if prompt is None and require_prompt:
        raise InvalidParameter("prompt is required (a string of 2 to 3000 characters).", field="prompt")
    if prompt is not None and not prompt.strip():
        raise InvalidParameter("prompt must contain more than whitespace.", field="prompt")

    spec = _model(body, catalog)
    width = _dimension(body, "width", spec.default_width)
    height = _dimension(body, "height", spec.default_height)
    number_results = _integer(body, "numberResults", MIN_RESULTS, MAX_RESULTS, default=1)
    negative_prompt = _optional_string(body, "negativePrompt", 0, MAX_NEGATIVE_PROMPT)
    if negative_prompt is not None and not spec.supports_negative_prompt:
        raise InvalidParameter(f"Model {spec.id!r} does not support negativePrompt.", field="negativePrompt")
    steps_sent = body.get("steps") is not None
    steps = _steps(body, spec)
    guidance = _guidance(body, spec)
    seed = _optional_integer(body, "seed", 0, MAX_SEED)
    output_format = _output_format(body)

    return ImageRequest(
        model=spec.id,
        prompt=prompt,
        width=width,
        height=height,
        number_results=number_results,
        steps=steps,
        steps_sent=steps_sent,
        negative_prompt=negative_prompt or None,
        guidance=guidance,
        seed=seed,
        output_format=output_format,
    )


def _json_type(value: Any) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "an array"
        case _:
            return "an object"


def _optional_string(body: dict[str, Any], name: str, min_len: int, max_len: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidParameter(f"{name} must be a string, not {_json_type(value)}.", field=name)
    if not min_len <= len(value) <= max_len:
        raise InvalidParameter(
            f"{name} must be {min_len} to {max_len} characters long; it has {len(value)}.", field=name
        )
    return value


def _as_integer(name: str, value: Any, error: type[InvalidRequest] = InvalidParameter) -> int:
    # JSON has one number type: 512.0 is the integer 512, 512.5 is not an integer.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise error(f"{name} must be an integer, not {_json_type(value)}.", field=name)
    if isinstance(value, float):
        if not value.is_integer():
            raise error(f"{name} must be an integer, got {value}.", field=name)
        return int(value)
    return value


def _optional_integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    number = _as_integer(name, value)
    if not low <= number <= high:
        raise InvalidParameter(f"{name} must be between {low} and {high}, got {number}.", field=name)
    return number


def _integer(body: dict[str, Any], name: str, low: int, high: int, *, default: int) -> int:
    number = _optional_integer(body, name, low, high)
    return default if number is None else number


def _model(body: dict[str, Any], catalog: Catalog) -> ModelSpec:
    model_id = body.get("model")
    if model_id is None:
        return catalog[catalog.default_model]
    if not isinstance(model_id, str):
        raise InvalidModel(f"model must be a string model id, not {_json_type(model_id)}.", field="model")
    if model_id not in catalog:
        raise InvalidModel(
            f"Unknown model {model_id!r}. Available models: {', '.join(catalog)} (GET /v1/images/models).",
            field="model",
        )
    return catalog[model_id]


def _dimension(body: dict[str, Any], name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    number = _as_integer(name, value, InvalidDimensions)
    if not MIN_SIDE <= number <= MAX_SIDE or number % SIDE_MULTIPLE:
        raise InvalidDimensions(
            f"{name} must be between {MIN_SIDE} and {MAX_SIDE} and divisible by {SIDE_MULTIPLE}; got {number}.",
            field=name,
        )
    return number


def _steps(body: dict[str, Any], spec: ModelSpec) -> int:
    value = body.get("steps")
    if value is None:
        return spec.steps.default
    number = _as_integer("steps", value)
    if not SPEC_MIN_STEPS <= number <= SPEC_MAX_STEPS:
        raise InvalidParameter(f"steps must be between {SPEC_MIN_STEPS} and {SPEC_MAX_STEPS}, got {number}.",
                               field="steps")
    if not spec.steps.supported:
        raise InvalidParameter(
            f"Model {spec.id!r} does not support steps (its supportsSteps is false); omit the field.",
            field="steps",
        )
    if not spec.steps.min <= number <= spec.steps.max:
        raise InvalidParameter(
            f"Model {spec.id!r} accepts steps from {spec.steps.min} to {spec.steps.max}, got {number}.",
            field="steps",
        )
    return number


def _guidance(body: dict[str, Any], spec: ModelSpec) -> float | None:
    value = body.get("guidance")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidParameter(f"guidance must be a number, not {_json_type(value)}.", field="guidance")
    if not SPEC_MIN_GUIDANCE <= value <= SPEC_MAX_GUIDANCE:
        raise InvalidParameter(
            f"guidance must be between {SPEC_MIN_GUIDANCE:g} and {SPEC_MAX_GUIDANCE:g}, got {value}.",
            field="guidance",
        )
    if not spec.supports_guidance:
        raise InvalidParameter(f"Model {spec.id!r} does not support guidance; omit the field.", field="guidance")
    return float(value)


def _output_format(body: dict[str, Any]) -> OutputFormat | None:
    value = body.get("outputFormat")
    if value is None:
        return None
    allowed = ", ".join(repr(f.value) for f in OutputFormat)
    if not isinstance(value, str):
        raise InvalidParameter(f"outputFormat must be one of {allowed}.", field="outputFormat")
    normalized = "jpeg" if value.lower() == "jpg" else value.lower()
    try:
        return OutputFormat(normalized)
    except ValueError as exc:
        raise InvalidParameter(f"outputFormat must be one of {allowed}, got {value!r}.",
                               field="outputFormat") from exc
