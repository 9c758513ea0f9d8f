"""HTTP routes. Errors become HTTP responses in one place: ``_error_response``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from imagegate import __version__, schemas
from imagegate.backends import Backends
from imagegate.catalog import build_catalog
from imagegate.config import Settings
from imagegate.errors import (
    EstimateFailed,
    ImagegateError,
    InternalError,
    InvalidParameter,
    MethodNotAllowed,
    NotFound,
)
from imagegate.ledger import SqlLedger
from imagegate.payments import build_gate
from imagegate.payments.base import PaymentContext
from imagegate.service import ImageService
from imagegate.storage import LocalImageStore
from imagegate.validation import parse_json_body

log = logging.getLogger(__name__)

PAYMENT_HEADERS_EXPOSED = ["X-PAYMENT-RESPONSE", "PAYMENT-RESPONSE", "PAYMENT-REQUIRED", "Server-Timing"]
# Both x402 fetch wrappers send an Access-Control-Expose-Headers *request* header, so preflights ask for it.
PAYMENT_HEADERS_ALLOWED = ["Content-Type", "X-PAYMENT", "PAYMENT-SIGNATURE", "Access-Control-Expose-Headers"]
IMMUTABLE_CACHE = "public, max-age=31536000, immutable"
GENERATE_DESCRIPTION = "Generate images from a text prompt. Paid per request with x402 (USDC)."

ServiceFactory = Callable[[], Awaitable[ImageService]]


def _error_response(error: ImagegateError) -> JSONResponse:
    headers = dict(error.headers)
    if error.status in (402, 503):
        headers.setdefault("Cache-Control", "no-store")
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _error_responses(*errors: type[ImagegateError]) -> dict[int | str, dict[str, Any]]:
    return {error.status: {"model": schemas.ErrorBody, "description": error.code} for error in errors}


async def _reconcile_forever(service: ImageService, interval_s: float, stale_after_s: float) -> None:
    """Settlements whose outcome was unknown get resolved even if their client never comes back."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await service.reconcile_pending(stale_after_s)
        except Exception:
            # Logged in full and retried next round: one bad round must not end reconciliation for good.
            log.exception("reconciliation round failed")


def create_app(service_factory: ServiceFactory, *, cors_origins: list[str], max_body_bytes: int,
               public_base_url: str | None, reconcile_interval_s: float = 15.0,
               stale_after_s: float = 900.0) -> FastAPI:
    """The ASGI app; ``service_factory`` builds the service at startup (and it is closed at shutdown)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await service_factory()
        app.state.service = service
        reconciler = asyncio.create_task(_reconcile_forever(service, reconcile_interval_s, stale_after_s))
        try:
            yield
        finally:
            reconciler.cancel()
            await asyncio.gather(reconciler, return_exceptions=True)
            await service.aclose()

    app = FastAPI(
        title="imagegate",
        version=__version__,
        description="Pay-per-request text-to-image API (x402, USDC on Base).",
        lifespan=lifespan,
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=cors_origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=PAYMENT_HEADERS_ALLOWED,
        expose_headers=PAYMENT_HEADERS_EXPOSED,
        max_age=600,
    )

    def service_of(request: Request) -> ImageService:
        service: ImageService = request.app.state.service
        return service

    def base_url_of(request: Request) -> str:
        return public_base_url or str(request.base_url).rstrip("/")

    async def read_json(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise InvalidParameter(f"The request body is {len(raw)} bytes; the limit is {max_body_bytes}.")
        return parse_json_body(raw)

    @app.exception_handler(ImagegateError)
    async def on_imagegate_error(request: Request, error: ImagegateError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 405:
            return _error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}."))
        if error.status_code == 404:
            return _error_response(NotFound(f"No route {request.method} {request.url.path}; see GET /."))
        return JSONResponse({"error": "HTTP_ERROR", "message": str(error.detail)}, status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        # Routes read raw bodies, so only path parameters reach here; never the framework's 422.
        return _error_response(InvalidParameter(f"Invalid request: {error.errors()[0]['msg']}."))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        # The one place a bug meets the client: logged whole, answered without internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        if request.url.path == "/v1/images/estimate":
            return _error_response(EstimateFailed("Server error during estimation."))
        return _error_response(InternalError("Server error during generation."))

    @app.get("/", summary="Route manifest")
    async def manifest(request: Request) -> dict[str, Any]:
        service = service_of(request)
        return {
            "name": "imagegate",
            "version": __version__,
            "description": "Pay-per-request text-to-image API. Pay with x402 (USDC); no accounts, no API keys.",
            "defaultModel": service.catalog.default_model,
            "payments": service.payments.describe(),
            "routes": [
                {"method": "POST", "path": "/v1/images/generate", "paid": service.payments.enabled,
                 "description": GENERATE_DESCRIPTION},
                {"method": "POST", "path": "/v1/images/estimate", "paid": False,
                 "description": "Price of a generation, exactly as the 402 will demand it."},
                {"method": "GET", "path": "/v1/images/models", "paid": False,
                 "description": "Models, their parameters, prices and availability."},
                {"method": "GET", "path": "/images/{uuid}.{ext}", "paid": False,
                 "description": "A generated image (permanent, immutable)."},
                {"method": "GET", "path": "/healthz", "paid": False, "description": "Liveness."},
                {"method": "GET", "path": "/openapi.json", "paid": False, "description": "OpenAPI document."},
            ],
        }

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/images/models", summary="Model catalog")
    async def models(request: Request) -> dict[str, Any]:
        return await service_of(request).models()

    @app.post(
        "/v1/images/estimate",
        summary="Price a generation",
        response_model=schemas.EstimateResponse,
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": schemas.EstimateBody.model_json_schema()}}}},
        responses=_error_responses(InvalidParameter, EstimateFailed),
    )
    async def estimate(request: Request) -> JSONResponse:
        return JSONResponse(await service_of(request).estimate(await read_json(request)))

    @app.post(
        "/v1/images/generate",
        summary="Generate images (x402-paid)",
        description=GENERATE_DESCRIPTION,
        response_model=schemas.GenerateResponse,
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": schemas.GenerateBody.model_json_schema()}}}},
        responses={
            **_error_responses(InvalidParameter, InternalError),
            402: {"description": "PAYMENT_REQUIRED: x402 challenge (v1 body + v2 PAYMENT-REQUIRED header)"},
            503: {"model": schemas.ErrorBody, "description": "MODEL_UNAVAILABLE, MODEL_BUSY, PAYMENT_UNAVAILABLE"},
        },
    )
    async def generate(request: Request) -> JSONResponse:
        body = await read_json(request)
        context = PaymentContext(
            headers=request.headers,
            resource_url=f"{base_url_of(request)}{request.url.path}",
            description=GENERATE_DESCRIPTION,
            input_schema=schemas.input_schema(),
            output_schema=schemas.output_schema(),
        )
        outcome = await service_of(request).generate(body, context, base_url_of(request))
        headers = dict(outcome.receipt.headers) if outcome.receipt else {}
        headers["Cache-Control"] = "no-store"
        if outcome.timings:
            headers["Server-Timing"] = outcome.server_timing()
        return JSONResponse(outcome.body(), headers=headers)

    @app.get("/images/{name}", summary="A generated image", response_class=FileResponse)
    async def image(request: Request, name: str) -> Response:
        image_uuid, _, extension = name.partition(".")
        image_file = await service_of(request).store.open(image_uuid)
        if image_file is None or (extension and not image_file.path.name.endswith(f".{extension}")):
            raise NotFound(f"No image {name!r}.")
        headers = {"ETag": image_file.etag, "Cache-Control": IMMUTABLE_CACHE}
        if request.headers.get("if-none-match") == image_file.etag:
            return Response(status_code=304, headers=headers)
        return FileResponse(image_file.path, media_type=image_file.media_type, headers=headers)

    return app


def app_from_settings(settings: Settings) -> FastAPI:
    """The production wiring: every component built from one ``Settings``."""

    async def build() -> ImageService:
        catalog = build_catalog(settings)
        ledger = SqlLedger(settings.ledger.url or f"sqlite+aiosqlite:///{settings.data_dir / 'ledger.sqlite3'}")
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        await ledger.start()
        gate, terms = await build_gate(settings, ledger)
        return ImageService(
            catalog=catalog,
            backends=Backends(settings),
            store=LocalImageStore(settings.storage.directory, quality=settings.storage.quality),
            ledger=ledger,
            payments=gate,
            output_format=settings.storage.format,
            terms=terms,
        )

    return create_app(
        build,
        cors_origins=settings.server.cors_allow_origins,
        max_body_bytes=settings.server.max_body_bytes,
        public_base_url=settings.server.public_base_url,
        reconcile_interval_s=settings.payments.reconcile_interval_s,
        stale_after_s=settings.payments.stale_after_s,
    )
