"""Replicate's predictions API serving ``black-forest-labs/flux-schnell``.

Documented shapes (https://replicate.com/black-forest-labs/flux-schnell input schema, the
prediction object of https://replicate.com/docs/topics/webhooks/receive-webhook): ``POST
/v1/models/<owner>/<name>/predictions`` or ``POST /v1/predictions`` (``version``) with ``{"input":
{...}}`` -> 201 and a prediction ``{id, status, input, output, error, logs, metrics, urls}``; ``GET
/v1/predictions/<id>`` moves ``starting`` -> ``processing`` -> ``succeeded`` (output: image URLs) or
``failed`` (error); ``POST .../cancel``. Errors are problem details ``{title, detail, status}``.
"""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .base import (
    FakeProvider,
    Invalid,
    batch_seed,
    only_fields,
    require_bool,
    require_choice,
    require_int,
    require_str,
)

ASPECT_RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")
INPUT_FIELDS = {
    "prompt", "aspect_ratio", "num_outputs", "num_inference_steps", "seed", "output_format",
    "output_quality", "disable_safety_checker", "go_fast", "megapixels",
}  # fmt: skip
MODEL = "black-forest-labs/flux-schnell"
NSFW_ERROR = "All generated images contained NSFW content. Try running it again with a different prompt."
VERSION = "c846a69991daf4c0e5d016514849d14ee5b2e6846ce6b9d6f21369e564cfe51e"


@dataclass
class _Prediction:
    id: str
    input: dict[str, Any]
    polls: int = 0
    status: str = "starting"
    output: list[str] | None = None
    error: str | None = None
    logs: list[str] = field(default_factory=list)


def size_of(aspect_ratio: str, megapixels: str) -> tuple[int, int]:
    """Pixels for an aspect ratio at ~1 or 0.25 MP, in multiples of 64 (square: 1024 / 512)."""
    w, h = (int(part) for part in aspect_ratio.split(":"))
    area = (1024 * 1024) * (1 if megapixels == "1" else 0.25)
    width = math.sqrt(area * w / h)
    return round(width / 64) * 64, round(area / width / 64) * 64


class FakeReplicate(FakeProvider):
    def reset(self) -> None:
        super().reset()
        self.predictions: dict[str, _Prediction] = {}
        self.polls_before_done = 2
        self.never_completes = False
        # Make the next prediction fail with this error (e.g. the safety checker's).
        self.prediction_error: str | None = None

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/models/{owner}/{name}/predictions", self.api(self._create_for_model), methods=["POST"]),
            Route("/v1/predictions", self.api(self._create_for_version), methods=["POST"]),
            Route("/v1/predictions/{pid}", self.api(self._get), methods=["GET"]),
            Route("/v1/predictions/{pid}/cancel", self.api(self._cancel), methods=["POST"]),
        ]

    def error_body(self, status: int, message: str, code: str | None) -> Any:
        return {"title": code or "Error", "detail": message, "status": status}

    def unauthorized(self, presented: str) -> Response:
        body = {"title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401}
        return JSONResponse(body, status_code=401)

    async def _create_for_model(self, request: Request, body: Any) -> Response:
        model = f"{request.path_params['owner']}/{request.path_params['name']}"
        if model != MODEL:
            return JSONResponse(self.error_body(404, "The requested resource could not be found.", "Not found"), 404)
        return self._create(request, body, {"input"})

    async def _create_for_version(self, request: Request, body: Any) -> Response:
        if not isinstance(body, dict) or body.get("version") != VERSION:
            return JSONResponse(self.error_body(422, "Invalid version or not permitted", "Invalid version"), 422)
        return self._create(request, body, {"version", "input"})

    def _create(self, request: Request, body: Any, allowed: set[str]) -> Response:
        try:
            if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
                raise Invalid("input", "input is required")
            only_fields(body, allowed)
            self._validate(body["input"])
        except Invalid as exc:
            problem = {
                "title": "Input validation failed",
                "detail": f"- input.{exc.parameter}: {exc.message}\n",
                "status": 422,
                "invalid_fields": [{"type": "invalid", "field": f"input.{exc.parameter}", "description": exc.message}],
            }
            return JSONResponse(problem, status_code=422)
        prediction = _Prediction(id=uuid.uuid4().hex[:26], input=body["input"])
        self.predictions[prediction.id] = prediction
        return JSONResponse(self._view(request, prediction), status_code=201)

    async def _get(self, request: Request, body: Any) -> Response:
        prediction = self.predictions.get(request.path_params["pid"])
        if prediction is None:
            return JSONResponse(self.error_body(404, "Prediction not found", "Not found"), 404)
        stalled = self.never_completes or prediction.input.get("seed") in self.stalled_seeds
        if prediction.status in ("starting", "processing") and not stalled:
            prediction.polls += 1
            if prediction.polls >= self.polls_before_done:
                self._finish(request, prediction)
            else:
                prediction.status = "processing"
        return JSONResponse(self._view(request, prediction))

    async def _cancel(self, request: Request, body: Any) -> Response:
        prediction = self.predictions.get(request.path_params["pid"])
        if prediction is None:
            return JSONResponse(self.error_body(404, "Prediction not found", "Not found"), 404)
        prediction.status = "canceled"
        return JSONResponse(self._view(request, prediction))

    def _finish(self, request: Request, prediction: _Prediction) -> None:
        if self.prediction_error is not None:
            prediction.status, prediction.error = "failed", self.prediction_error
            return
        data = prediction.input
        width, height = size_of(data.get("aspect_ratio", "1:1"), data.get("megapixels", "1"))
        fmt = {"jpg": "jpeg"}.get(data.get("output_format", "webp"), data.get("output_format", "webp"))
        seed = data.get("seed", random.randint(0, 2**32))
        prediction.logs.append(f"Using seed: {seed}")
        # The batch's other outputs come from seeds the model derives and does not report.
        seeds = [batch_seed(seed, index) for index in range(data.get("num_outputs", 1))]
        # As the FLUX models do: flagged outputs are dropped; a prediction left with none fails.
        if not data.get("disable_safety_checker", False):
            seeds = [image_seed for image_seed in seeds if image_seed not in self.nsfw_seeds]
            if not seeds:
                prediction.status = "failed"
                prediction.error = NSFW_ERROR
                return
        prediction.output = [self.host_image(request, width, height, image_seed, fmt) for image_seed in seeds]
        prediction.status = "succeeded"

    def _view(self, request: Request, prediction: _Prediction) -> dict[str, Any]:
        get = f"{str(request.base_url).rstrip('/')}/v1/predictions/{prediction.id}"
        return {
            "id": prediction.id,
            "model": MODEL,
            "version": VERSION,
            "input": prediction.input,
            "logs": "\n".join(prediction.logs),
            "output": prediction.output,
            "error": prediction.error,
            "status": prediction.status,
            "created_at": "2025-01-01T00:00:00.000Z",
            "metrics": {"predict_time": 0.5} if prediction.status == "succeeded" else {},
            "urls": {"get": get, "cancel": f"{get}/cancel"},
        }

    def _validate(self, data: dict[str, Any]) -> None:
        only_fields(data, INPUT_FIELDS)
        require_str(data, "prompt")
        require_choice(data, "aspect_ratio", ASPECT_RATIOS)
        require_int(data, "num_outputs", 1, 4, default=1)
        require_int(data, "num_inference_steps", 1, 4, default=4)
        if "seed" in data:
            require_int(data, "seed", -(2**63), 2**63 - 1)
        require_choice(data, "output_format", ("webp", "jpg", "png"))
        require_int(data, "output_quality", 0, 100, default=80)
        require_bool(data, "disable_safety_checker")
        require_bool(data, "go_fast")
        require_choice(data, "megapixels", ("1", "0.25"))
