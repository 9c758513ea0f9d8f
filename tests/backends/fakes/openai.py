"""OpenAI Images' ``POST /v1/images/generations``.

Documented shapes (the create-image request schema): ``model, prompt, n, size, quality,
response_format`` (dall-e only), ``style`` (dall-e-3), ``output_format, output_compression,
background, moderation`` (GPT image); fixed sizes per family; n 1-10 (dall-e-3: 1); prompt limits
1000/4000/32000. Reply ``{created, data: [{b64_json | url, revised_prompt}], usage}``; errors
``{"error": {message, type, param, code}}``, with 429 ``insufficient_quota`` for an exhausted quota.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .base import FakeProvider, Invalid, require_choice, require_int, require_str

SIZES = {
    "gpt-image": ("1024x1024", "1536x1024", "1024x1536", "auto"),
    "dall-e-3": ("1024x1024", "1792x1024", "1024x1792"),
    "dall-e-2": ("256x256", "512x512", "1024x1024"),
}
COMMON = {"model", "prompt", "n", "size", "quality", "user"}
EXTRA = {
    "gpt-image": {"output_format", "output_compression", "background", "moderation", "partial_images", "stream"},
    "dall-e-3": {"response_format", "style"},
    "dall-e-2": {"response_format"},
}
PROMPT_LIMIT = {"gpt-image": 32000, "dall-e-3": 4000, "dall-e-2": 1000}


def family_of(model: str) -> str | None:
    if model.startswith("gpt-image"):
        return "gpt-image"
    return model if model in ("dall-e-3", "dall-e-2") else None


class FakeOpenAI(FakeProvider):
    def routes(self) -> list[BaseRoute]:
        return [Route("/v1/images/generations", self.api(self._generate), methods=["POST"])]

    def error_body(self, status: int, message: str, code: str | None, param: str | None = None) -> Any:
        kind = {429: "insufficient_quota" if code == "insufficient_quota" else "requests"}.get(
            status, "invalid_request_error"
        )
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}

    def unauthorized(self, presented: str) -> Response:
        # OpenAI quotes the key it was given: the backend must redact it before logging.
        message = f"Incorrect API key provided: {presented}. You can find your API key at https://platform.openai.com."
        return JSONResponse(self.error_body(401, message, "invalid_api_key"), status_code=401)

    async def _generate(self, request: Request, body: Any) -> Response:
        try:
            if not isinstance(body, dict):
                raise Invalid("body", "the body must be a JSON object")
            family = family_of(str(body.get("model", "dall-e-2")))
            if family is None:
                raise Invalid(
                    "model", f"The model `{body.get('model')}` does not exist or you do not have access to it."
                )
            for name in body:
                if name not in COMMON | EXTRA[family]:
                    raise Invalid(name, f"Unknown parameter: '{name}'.")
            require_str(body, "prompt", 1, PROMPT_LIMIT[family])
            count = require_int(body, "n", 1, 1 if family == "dall-e-3" else 10, default=1)
            require_choice(body, "size", SIZES[family])
            require_choice(body, "response_format", ("url", "b64_json"))
            require_choice(body, "output_format", ("png", "jpeg", "webp"))
            require_choice(body, "moderation", ("low", "auto"))
            require_choice(body, "style", ("vivid", "natural"))
        except Invalid as exc:
            return JSONResponse(self.error_body(400, exc.message, None, exc.parameter), status_code=400)
        size = body.get("size", "1024x1024")
        width, height = (int(side) for side in ("1024x1024" if size == "auto" else size).split("x"))
        fmt = body.get("output_format", "png")
        data = []
        for index in range(count):
            if family != "gpt-image" and body.get("response_format", "url") == "url":
                data.append({"url": self.host_image(request, width, height, index, fmt)})
            else:
                data.append({"b64_json": self.image_b64(width, height, index, fmt)})
        reply: dict[str, Any] = {"created": int(time.time()), "data": data}
        if family == "gpt-image":
            reply["usage"] = {
                "total_tokens": 4200,
                "input_tokens": 50,
                "output_tokens": 4160,
                "input_tokens_details": {"text_tokens": 50, "image_tokens": 0},
            }
        return JSONResponse(reply)
