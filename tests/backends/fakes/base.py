"""What every fake provider does: record requests, check the key, play scripted failures (with
Retry-After), stall on demand, and host the images it "generates" so backends download them over HTTP.

Each fake validates the documented request shape of its provider and, stricter than the real
thing, rejects unknown fields: a backend that sends a field the provider does not document fails.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tests.support.server import live_server

Handler = Callable[[Request, Any], Awaitable[Response]]
F = TypeVar("F", bound="FakeProvider")


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Scripted:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


class Invalid(Exception):
    """A documented-rule violation found by a fake's validator: (parameter, message)."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.message = message


def batch_seed(seed: int, index: int) -> int:
    """The seed a provider that reports one seed per request uses, internally, for image ``index`` of a
    batch: the request's own for the first, derived ones (never ``seed + index``) for the others, as a
    real batch draws them from one generator. So a backend that batches cannot claim per-image seeds."""
    return seed if index == 0 else (seed * 2_654_435_761 + index * 40_503) % 2**32


def color_of(seed: int) -> tuple[int, int, int]:
    """The flat colour of a fake image, so tests can tell which seed made it."""
    return (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)


def png_bytes(width: int, height: int, seed: int | None, fmt: str = "png") -> bytes:
    """A flat image of ``color_of(seed)``; black for ``None`` (what a safety checker substitutes)."""
    buffer = io.BytesIO()
    color = color_of(seed) if seed is not None else (0, 0, 0)
    Image.new("RGB", (width, height), color).save(buffer, format={"jpg": "jpeg"}.get(fmt, fmt).upper())
    return buffer.getvalue()


class FakeProvider:
    auth_scheme = "Bearer"

    def __init__(self, key: str) -> None:
        self.key = key
        self.url = ""  # set once served
        self.reset()

    def reset(self) -> None:
        self.requests: list[Recorded] = []
        self.downloads: list[Recorded] = []
        self.failures: deque[Scripted] = deque()
        self.delay_s = 0.0
        # Serve images of this size whatever was asked (a provider rounding to its own rule).
        self.size_override: tuple[int, int] | None = None
        # Serve bytes that are no image at all.
        self.corrupt_images = False
        # Answer image downloads as an expired signed URL would.
        self.expired_images = False
        # Images made with these seeds are flagged by the provider's safety checker, where it has one.
        self.nsfw_seeds: set[int] = set()
        # Jobs (fal queue, Replicate predictions) whose request carries one of these seeds never finish.
        self.stalled_seeds: set[int] = set()
        self.files: dict[str, tuple[bytes, str]] = {}

    # --- to be provided per provider -------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        raise NotImplementedError

    def error_body(self, status: int, message: str, code: str | None) -> Any:
        raise NotImplementedError

    def unauthorized(self, presented: str) -> Response:
        return JSONResponse(self.error_body(401, "Invalid API key", "invalid_api_key"), status_code=401)

    # --- scripting -------------------------------------------------------------------------

    def fail_next(
        self, status: int, message: str, *, times: int = 1, code: str | None = None, retry_after: int | None = None
    ) -> None:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        for _ in range(times):
            self.failures.append(Scripted(status, self.error_body(status, message, code), headers))

    @property
    def api_calls(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.requests]

    # --- serving ---------------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(routes=[*self.routes(), Route("/files/{name}", self._file, methods=["GET"])])

    def api(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a provider endpoint: record, delay, authenticate, then scripted failures, then serve."""

        async def endpoint(request: Request) -> Response:
            raw = await request.body()
            body = json.loads(raw) if raw else None
            self.requests.append(Recorded(request.method, request.url.path, dict(request.headers), body))
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            presented = request.headers.get("authorization", "")
            if presented != f"{self.auth_scheme} {self.key}":
                return self.unauthorized(presented.partition(" ")[2])
            if self.failures:
                failure = self.failures.popleft()
                return JSONResponse(failure.body, status_code=failure.status, headers=failure.headers)
            return await handler(request, body)

        return endpoint

    def host_image(self, request: Request, width: int, height: int, seed: int, fmt: str = "png") -> str:
        """Generate an image, keep it, and return its absolute URL on this server."""
        return self.host_bytes(request, self.image_bytes(width, height, seed, fmt), fmt)

    def host_bytes(self, request: Request, data: bytes, fmt: str = "png") -> str:
        name = f"{uuid.uuid4().hex}.{fmt}"
        self.files[name] = (data, f"image/{fmt}")
        return f"{str(request.base_url).rstrip('/')}/files/{name}"

    def image_bytes(self, width: int, height: int, seed: int, fmt: str = "png") -> bytes:
        if self.corrupt_images:
            return b"<html>not an image</html>"
        width, height = self.size_override or (width, height)
        return png_bytes(width, height, seed, fmt)

    def image_b64(self, width: int, height: int, seed: int, fmt: str = "png") -> str:
        return base64.b64encode(self.image_bytes(width, height, seed, fmt)).decode()

    async def _file(self, request: Request) -> Response:
        self.downloads.append(Recorded("GET", request.url.path, dict(request.headers), None))
        if self.expired_images:
            return Response("<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>", 403)
        found = self.files.get(request.path_params["name"])
        if found is None:
            return Response(status_code=404)
        return Response(found[0], media_type=found[1])


@contextmanager
def served(fake: F) -> Iterator[F]:
    """Serve ``fake`` on 127.0.0.1 (a free port) until the block ends, with ``fake.url`` set."""
    with live_server(fake.app()) as url:
        fake.url = url
        try:
            yield fake
        finally:
            fake.url = ""


# --- small validators shared by the fakes -----------------------------------------------------


def require_int(body: dict[str, Any], name: str, low: int, high: int, *, default: int | None = None) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise Invalid(name, f"{name} must be an integer")
    if not low <= value <= high:
        raise Invalid(name, f"{name} must be between {low} and {high}")
    return value


def require_number(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise Invalid(name, f"{name} must be a number")
    if not low <= value <= high:
        raise Invalid(name, f"{name} must be between {low} and {high}")


def require_str(body: dict[str, Any], name: str, low: int = 1, high: int = 100_000, *, required: bool = True) -> None:
    value = body.get(name)
    if value is None and not required:
        return
    if not isinstance(value, str) or not low <= len(value) <= high:
        raise Invalid(name, f"{name} must be a string of {low} to {high} characters")


def require_choice(body: dict[str, Any], name: str, choices: tuple[Any, ...], *, required: bool = False) -> None:
    if name not in body and not required:
        return
    if body.get(name) not in choices:
        raise Invalid(name, f"{name} must be one of {', '.join(map(str, choices))}")


def require_bool(body: dict[str, Any], name: str) -> None:
    if name in body and not isinstance(body[name], bool):
        raise Invalid(name, f"{name} must be a boolean")


def only_fields(body: dict[str, Any], allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise Invalid(name, f"unknown parameter {name}")
