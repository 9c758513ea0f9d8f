"""fal's FLUX schnell endpoint, synchronous (``/run/<endpoint>``, standing for https://fal.run) and
queued (``/queue/<endpoint>``, standing for https://queue.fal.run).

Documented shapes (https://fal.ai/docs/model-api-reference/image-generation-api/flux-schnell,
https://docs.fal.ai/documentation/model-apis/inference/queue): the schnell input fields and ranges;
the result ``{images: [{url, width, height, content_type}], seed, timings, has_nsfw_concepts,
prompt}`` (a flagged image is served black, its has_nsfw_concepts entry true); queue submit ->
``{request_id, status_url, response_url, cancel_url}``, status ``IN_QUEUE`` (queue_position) ->
``IN_PROGRESS`` -> ``COMPLETED``, then the result at response_url; ``PUT cancel_url``. Errors are
``{"detail": ...}``, FastAPI-style lists for validation (422). Auth: ``Authorization: Key <key>``.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .base import (
    FakeProvider,
    Invalid,
    batch_seed,
    only_fields,
    png_bytes,
    require_bool,
    require_choice,
    require_int,
    require_number,
    require_str,
)

PRESETS = {
    "square_hd": (1024, 1024), "square": (512, 512), "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024), "landscape_4_3": (1024, 768), "landscape_16_9": (1024, 576),
}  # fmt: skip
INPUT_FIELDS = {
    "prompt", "image_size", "num_inference_steps", "seed", "guidance_scale", "sync_mode", "num_images",
    "enable_safety_checker", "output_format", "acceleration",
}  # fmt: skip


@dataclass
class _Job:
    endpoint: str
    payload: dict[str, Any]
    polls: int = 0
    canceled: bool = False


class FakeFal(FakeProvider):
    auth_scheme = "Key"

    def reset(self) -> None:
        super().reset()
        self.jobs: dict[str, _Job] = {}
        # Status checks answered IN_QUEUE / IN_PROGRESS before COMPLETED.
        self.polls_before_done = 2
        self.never_completes = False
        # Name a status_url on another host (the backend must not send it the key).
        self.foreign_status_url = False

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/queue/{app:path}/requests/{rid}/status", self.api(self._status), methods=["GET"]),
            Route("/queue/{app:path}/requests/{rid}/cancel", self.api(self._cancel), methods=["PUT"]),
            Route("/queue/{app:path}/requests/{rid}", self.api(self._result), methods=["GET"]),
            Route("/queue/{endpoint:path}", self.api(self._submit), methods=["POST"]),
            Route("/run/{endpoint:path}", self.api(self._run), methods=["POST"]),
        ]

    def error_body(self, status: int, message: str, code: str | None) -> Any:
        return {"detail": message}

    def unauthorized(self, presented: str) -> Response:
        detail = "Cannot access application 'fal-ai/flux'. Authentication is required to access this application."
        return JSONResponse({"detail": detail}, status_code=401)

    # --- sync ----------------------------------------------------------------------------------

    async def _run(self, request: Request, body: Any) -> Response:
        return self._generate(request, request.path_params["endpoint"], body)

    # --- queue ---------------------------------------------------------------------------------

    async def _submit(self, request: Request, body: Any) -> Response:
        endpoint = request.path_params["endpoint"]
        rid = str(uuid.uuid4())
        self.jobs[rid] = _Job(endpoint, body)
        # Status and result live under the app id (owner/app), without the endpoint's sub-path.
        app = "/".join(endpoint.split("/")[:2])
        base = f"{str(request.base_url).rstrip('/')}/queue/{app}/requests/{rid}"
        status_base = "http://203.0.113.9:9" if self.foreign_status_url else str(request.base_url).rstrip("/")
        return JSONResponse({
            "request_id": rid,
            "status": "IN_QUEUE",
            "queue_position": 1,
            "status_url": f"{status_base}/queue/{app}/requests/{rid}/status",
            "response_url": base,
            "cancel_url": f"{base}/cancel",
        })  # fmt: skip

    async def _status(self, request: Request, body: Any) -> Response:
        job = self.jobs.get(request.path_params["rid"])
        if job is None:
            return JSONResponse({"detail": "Request not found"}, status_code=404)
        job.polls += 1
        if job.canceled:
            return JSONResponse({"status": "COMPLETED", "error": "Request was cancelled"})
        if self._stalled(job) or job.polls <= self.polls_before_done:
            if job.polls == 1:
                return JSONResponse({"status": "IN_QUEUE", "queue_position": 0})
            return JSONResponse({"status": "IN_PROGRESS", "logs": []})
        return JSONResponse({"status": "COMPLETED", "metrics": {"inference_time": 0.42}})

    def _stalled(self, job: _Job) -> bool:
        return self.never_completes or (isinstance(job.payload, dict) and job.payload.get("seed") in self.stalled_seeds)

    async def _cancel(self, request: Request, body: Any) -> Response:
        job = self.jobs.get(request.path_params["rid"])
        if job is None:
            return JSONResponse({"detail": "Request not found"}, status_code=404)
        job.canceled = True
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)

    async def _result(self, request: Request, body: Any) -> Response:
        job = self.jobs.get(request.path_params["rid"])
        if job is None:
            return JSONResponse({"detail": "Request not found"}, status_code=404)
        if self._stalled(job) or job.polls <= self.polls_before_done:
            return JSONResponse({"detail": "Request is still in progress"}, status_code=400)
        # The queue accepts any JSON; the endpoint's validation error surfaces with the result.
        return self._generate(request, job.endpoint, job.payload)

    # --- the model -----------------------------------------------------------------------------

    def _generate(self, request: Request, endpoint: str, payload: Any) -> Response:
        if endpoint != "fal-ai/flux/schnell":
            return JSONResponse({"detail": f"Application '{endpoint}' not found"}, status_code=404)
        try:
            if not isinstance(payload, dict):
                raise Invalid("body", "Input should be a valid dictionary")
            width, height, count, seed = self._validate(payload)
        except Invalid as exc:
            detail = [{"loc": ["body", exc.parameter], "msg": exc.message, "type": "value_error"}]
            return JSONResponse({"detail": detail}, status_code=422)
        fmt = payload.get("output_format", "jpeg")
        checked = payload.get("enable_safety_checker", True)
        images, flags = [], []
        # Only the request's seed is reported; the batch's other images come from seeds fal keeps to itself.
        for image_seed in (batch_seed(seed, index) for index in range(count)):
            flagged = checked and image_seed in self.nsfw_seeds
            # A flagged image is replaced by a black one.
            data = png_bytes(width, height, None, fmt) if flagged else self.image_bytes(width, height, image_seed, fmt)
            url = self.host_bytes(request, data, fmt)
            images.append({"url": url, "width": width, "height": height, "content_type": f"image/{fmt}"})
            flags.append(flagged)
        return JSONResponse({
            "images": images, "seed": seed, "timings": {"inference": 0.42},
            "has_nsfw_concepts": flags, "prompt": payload["prompt"],
        })  # fmt: skip

    def _validate(self, payload: dict[str, Any]) -> tuple[int, int, int, int]:
        only_fields(payload, INPUT_FIELDS)
        require_str(payload, "prompt")
        size = payload.get("image_size", "landscape_4_3")
        if isinstance(size, str):
            if size not in PRESETS:
                raise Invalid("image_size", f"image_size must be one of {', '.join(PRESETS)} or an object")
            width, height = PRESETS[size]
        elif isinstance(size, dict) and set(size) == {"width", "height"}:
            width = require_int(size, "width", 1, 14142)
            height = require_int(size, "height", 1, 14142)
        else:
            raise Invalid("image_size", "image_size must be a preset or {width, height}")
        require_int(payload, "num_inference_steps", 1, 12, default=4)
        seed = require_int(payload, "seed", 0, 2**63 - 1, default=random.randint(0, 2**32))
        require_number(payload, "guidance_scale", 1, 20)
        count = require_int(payload, "num_images", 1, 4, default=1)
        require_bool(payload, "enable_safety_checker")
        require_bool(payload, "sync_mode")
        require_choice(payload, "output_format", ("jpeg", "png"))
        require_choice(payload, "acceleration", ("none", "regular", "high"))
        return width, height, count, seed
