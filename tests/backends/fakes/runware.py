"""Runware's REST task API: ``POST /v1`` with a JSON array of tasks, synchronous delivery.

Documented shapes (https://runware.ai/docs/en/image-inference/api-reference, .../platform/errors):
the task fields and ranges of imageInference, the reply ``{"data": [{taskType, taskUUID, imageUUID,
imageURL | imageBase64Data | imageDataURI, seed, NSFWContent, cost}]}`` and the error body
``{"errors": [{code, message, parameter, taskType, taskUUID}]}``.
"""

from __future__ import annotations

import random
import uuid
from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .base import (
    FakeProvider,
    Invalid,
    only_fields,
    require_bool,
    require_choice,
    require_int,
    require_number,
    require_str,
)

TASK_FIELDS = {
    "taskType", "taskUUID", "positivePrompt", "negativePrompt", "model", "width", "height", "steps",
    "CFGScale", "seed", "numberResults", "scheduler", "outputType", "outputFormat", "outputQuality",
    "includeCost",
}  # fmt: skip


class FakeRunware(FakeProvider):
    def reset(self) -> None:
        super().reset()
        # USD per image, reported when includeCost is true.
        self.cost = Decimal("0.0006")

    def routes(self) -> list[BaseRoute]:
        return [Route("/v1", self.api(self._tasks), methods=["POST"])]

    def error_body(
        self, status: int, message: str, code: str | None, parameter: str | None = None, task_uuid: str | None = None
    ) -> Any:
        error: dict[str, Any] = {"code": code or "error", "message": message, "taskType": "imageInference"}
        if parameter:
            error["parameter"] = parameter
        if task_uuid:
            error["taskUUID"] = task_uuid
        return {"errors": [error]}

    def unauthorized(self, presented: str) -> Response:
        body = {
            "errors": [
                {
                    "code": "invalidApiKey",
                    "message": "Invalid API key. Get one at https://my.runware.ai",
                    "taskType": "authentication",
                }
            ]
        }
        return JSONResponse(body, status_code=401)

    async def _tasks(self, request: Request, body: Any) -> Response:
        if not isinstance(body, list) or not body:
            return JSONResponse(self.error_body(400, "The body must be an array of tasks", "invalidTasks"), 400)
        data: list[dict[str, Any]] = []
        for task in body:
            try:
                data.extend(self._inference(request, task))
            except Invalid as exc:
                code = f"invalid{exc.parameter[:1].upper()}{exc.parameter[1:]}"
                return JSONResponse(
                    self.error_body(400, exc.message, code, exc.parameter, task.get("taskUUID")), status_code=400
                )
        return JSONResponse({"data": data})

    def _inference(self, request: Request, task: dict[str, Any]) -> list[dict[str, Any]]:
        only_fields(task, TASK_FIELDS)
        require_choice(task, "taskType", ("imageInference",), required=True)
        require_str(task, "taskUUID")
        if uuid.UUID(task["taskUUID"]).version != 4:
            raise Invalid("taskUUID", "taskUUID must be a UUID v4")
        require_str(task, "positivePrompt", 2, 3000)
        require_str(task, "negativePrompt", 2, 3000, required=False)
        require_str(task, "model")
        width = require_int(task, "width", 128, 2048)
        height = require_int(task, "height", 128, 2048)
        if width % 64 or height % 64:
            raise Invalid("width" if width % 64 else "height", "width and height must be divisible by 64")
        count = require_int(task, "numberResults", 1, 20, default=1)
        require_int(task, "steps", 1, 100, default=20)
        require_number(task, "CFGScale", 0, 50)
        seed = require_int(task, "seed", 1, 2**63 - 1, default=random.randint(1, 2**32))
        require_choice(task, "outputType", ("base64Data", "dataURI", "URL"))
        require_choice(task, "outputFormat", ("JPG", "PNG", "WEBP"))
        require_int(task, "outputQuality", 20, 99, default=95)
        require_bool(task, "includeCost")
        output_type = task.get("outputType", "URL")
        fmt = {"JPG": "jpeg", "PNG": "png", "WEBP": "webp"}[task.get("outputFormat", "JPG")]
        results = []
        for index in range(count):
            image_seed = seed + index
            result: dict[str, Any] = {
                "taskType": "imageInference",
                "taskUUID": task["taskUUID"],
                "imageUUID": str(uuid.uuid4()),
                "seed": image_seed,
                "NSFWContent": image_seed in self.nsfw_seeds,
            }
            if output_type == "URL":
                result["imageURL"] = self.host_image(request, width, height, image_seed, fmt)
            elif output_type == "base64Data":
                result["imageBase64Data"] = self.image_b64(width, height, image_seed, fmt)
            else:
                result["imageDataURI"] = f"data:image/{fmt};base64,{self.image_b64(width, height, image_seed, fmt)}"
            if task.get("includeCost"):
                # Written as its shortest literal ("0.0006"), as Runware sends it.
                result["cost"] = float(self.cost)
            results.append(result)
        return results
