"""Together AI's ``POST /v1/images/generations``.

Documented shapes (https://docs.together.ai/reference/post-images-generations): request fields
``model, prompt, width, height, n, steps, seed, negative_prompt, guidance_scale, response_format
(base64|url), output_format (jpeg|png), disable_safety_checker, image_url, image_loras``; reply
``{id, model, object: "list", data: [{index, b64_json | url, type}]}``; errors ``{"error":
{message, type, param, code}}``.
"""

from __future__ import annotations

import random
import uuid
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
    require_number,
    require_str,
)

FIELDS = {
    "model", "prompt", "width", "height", "n", "steps", "seed", "negative_prompt", "guidance_scale",
    "response_format", "output_format", "disable_safety_checker", "image_url", "image_loras",
}  # fmt: skip
MODELS = (
    "black-forest-labs/FLUX.1-schnell",
    "black-forest-labs/FLUX.1-schnell-Free",
    "stabilityai/stable-diffusion-xl-base-1.0",
)


class FakeTogether(FakeProvider):
    def routes(self) -> list[BaseRoute]:
        return [Route("/v1/images/generations", self.api(self._generate), methods=["POST"])]

    def error_body(self, status: int, message: str, code: str | None, param: str | None = None) -> Any:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}

    def unauthorized(self, presented: str) -> Response:
        message = "Invalid API key provided. You can find your API key at https://api.together.xyz/settings/api-keys."
        return JSONResponse(self.error_body(401, message, "invalid_api_key"), status_code=401)

    async def _generate(self, request: Request, body: Any) -> Response:
        try:
            if not isinstance(body, dict):
                raise Invalid("body", "the body must be a JSON object")
            only_fields(body, FIELDS)
            require_choice(body, "model", MODELS, required=True)
            require_str(body, "prompt")
            width = require_int(body, "width", 64, 2048, default=1024)
            height = require_int(body, "height", 64, 2048, default=1024)
            if width % 8 or height % 8:
                raise Invalid("width", "width and height must be multiples of 8")
            count = require_int(body, "n", 1, 4, default=1)
            require_int(body, "steps", 1, 50, default=20)
            seed = require_int(body, "seed", 0, 2**63 - 1, default=random.randint(0, 2**32))
            require_str(body, "negative_prompt", required=False)
            require_number(body, "guidance_scale", 0, 100)
            require_choice(body, "response_format", ("base64", "url"))
            require_choice(body, "output_format", ("jpeg", "png"))
            require_bool(body, "disable_safety_checker")
        except Invalid as exc:
            return JSONResponse(self.error_body(400, exc.message, "invalid_parameter", exc.parameter), 400)
        fmt = body.get("output_format", "jpeg")
        data = []
        for index in range(count):
            # The batch's other images come from seeds Together derives and does not report.
            image_seed = batch_seed(seed, index)
            if body.get("response_format", "url") == "base64":
                item = {"index": index, "b64_json": self.image_b64(width, height, image_seed, fmt), "type": "b64_json"}
            else:
                item = {"index": index, "url": self.host_image(request, width, height, image_seed, fmt), "type": "url"}
            data.append(item)
        # Out of order on purpose: the backend must sort by index.
        data.reverse()
        return JSONResponse({"id": uuid.uuid4().hex, "model": body["model"], "object": "list", "data": data})
