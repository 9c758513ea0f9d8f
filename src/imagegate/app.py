"""HTTP routes. Errors become HTTP responses in one place: ``_error_response``."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request, Response
from fastapi import Path as PathParameter
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from imagegate import __version__, devchain, logs, metrics, openai_compat, openapi, playground, schemas
from imagegate.catalog import build_catalog
from imagegate.config import LimitsSettings, Settings, load_settings
from imagegate.drain import Drain
from imagegate.errors import (
    EstimateFailed,
    Forbidden,
    GenerationTimedOut,
    ImagegateError,
    InternalError,
    InvalidParameter,
    JobNotCancellable,
    MethodNotAllowed,
    ModelBusy,
    ModelUnavailable,
    NotFound,
    PaymentUnavailable,
    ServerDraining,
    Unauthorized,
    UpstreamUnavailable,
)
from imagegate.jobs.events import job_stream, request_stream
from imagegate.jobs.http import (
    REQUEST_ID,
    Preference,
    RequestProgress,
    event_stream_response,
    last_event_id,
    parse_prefer,
    parse_webhook,
    split_webhook_fields,
)
from imagegate.jobs.runner import JobRunner, JobsOptions, build_job_runner
from imagegate.ledger import SqlLedger
from imagegate.limits import LIMITED_ROUTES, RateLimiter
from imagegate.observe import RequestObserver
from imagegate.payments import build_gate
from imagegate.payments.base import PaymentContext
from imagegate.payments.challenge_cache import ChallengeCache
from imagegate.payments.facilitators import read_private_key
from imagegate.service import ImageService
from imagegate.storage import build_store
from imagegate.types import GenerationOutcome
from imagegate.validation import parse_json_body
from imagegate.workers import build_engine

log = logging.getLogger(__name__)

PAYMENT_HEADERS_EXPOSED = ["X-PAYMENT-RESPONSE", "PAYMENT-RESPONSE", "PAYMENT-REQUIRED", "Server-Timing",
                           "X-Request-ID", "Retry-After"]
# Both x402 fetch wrappers send an Access-Control-Expose-Headers *request* header, so preflights ask for it.
PAYMENT_HEADERS_ALLOWED = ["Content-Type", "X-PAYMENT", "PAYMENT-SIGNATURE", "Access-Control-Expose-Headers",
                           "X-Request-ID"]
# Jobs (Prefer, Location) and event streams (a page names its request by X-Request-ID, EventSource resumes).
JOB_HEADERS_EXPOSED = ["Location", "Preference-Applied"]
JOB_HEADERS_ALLOWED = ["Prefer", "Last-Event-ID"]
IMMUTABLE_CACHE = "public, max-age=31536000, immutable"
GENERATE_DESCRIPTION = "Generate images from a text prompt. Paid per request with x402 (USDC)."
# With several worker processes, how often each one writes its queue depths for the scrapes.
ENGINE_METRICS_INTERVAL_S = 2.0

# The log level of worker processes started by ``imagegate serve --workers N``.
LOG_LEVEL_ENV = "IMAGEGATE_LOG_LEVEL"
GENERATE_PATH = "/v1/images/generate"

ServiceFactory = Callable[[], Awaitable[ImageService]]


def generation_context(headers: Mapping[str, str], resource_url: str) -> PaymentContext:
    """The payment context of a native generation (a recovering job verifies its payment again with it)."""
    return PaymentContext(headers=headers, resource_url=resource_url, description=GENERATE_DESCRIPTION,
                          input_schema=schemas.input_schema(), output_schema=schemas.output_schema())


def _error_response(error: ImagegateError) -> JSONResponse:
    headers = dict(error.headers)
    if error.status in (402, 503):
        headers.setdefault("Cache-Control", "no-store")
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _error_responses(*errors: type[ImagegateError]) -> dict[int | str, dict[str, Any]]:
    """Documented error answers; several codes sharing a status are listed together."""
    by_status: dict[int, list[str]] = {}
    for error in errors:
        by_status.setdefault(error.status, []).append(error.code)
    responses: dict[int | str, dict[str, Any]] = {}
    for status, codes in by_status.items():
        headers = {"Retry-After": openapi.MAYBE_RETRY_AFTER_REF} if status == 503 else None
        responses[status] = openapi.error_response(", ".join(dict.fromkeys(codes)), headers=headers)
    return responses


async def _reconcile_forever(service: ImageService, interval_s: float, stale_after_s: float) -> None:
    """Settlements whose outcome was unknown get resolved even if their client never comes back."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await service.reconcile_pending(stale_after_s)
            metrics.reconciliation_backlog(*await service.reconciliation_backlog())
        except Exception:
            # Logged in full and retried next round: one bad round must not end reconciliation for good.
            log.exception("reconciliation round failed")


async def _keep_alive_forever(service: ImageService, interval_s: float) -> None:
    """Paid work in flight stays marked alive, so reconciliation never takes it for a dead process's."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await service.keep_alive()
        except Exception:
            log.exception("keeping paid work alive failed")


async def _check_availability(service: ImageService) -> None:
    """At startup, off the startup path: backends that probe something (a model hub) begin here."""
    try:
        await service.check_availability()
    except Exception:
        log.exception("the startup availability check failed")


async def _refresh_engine_metrics_forever(service: ImageService, interval_s: float) -> None:
    """With several worker processes each one reports its own engine's queues between scrapes."""
    while True:
        metrics.refresh_engine(service.engine, service.catalog)
        await asyncio.sleep(interval_s)


class _ImagegateAPI(FastAPI):
    """FastAPI with layers outside its own error handling: the 500 answers of bugs get a request id too."""

    def __init__(self, *, outer_layers: Callable[[ASGIApp], ASGIApp], **kwargs: Any):
        self._outer_layers = outer_layers
        super().__init__(**kwargs)

    def build_middleware_stack(self) -> ASGIApp:
        return self._outer_layers(super().build_middleware_stack())


def create_app(service_factory: ServiceFactory, *, cors_origins: list[str], max_body_bytes: int,
               public_base_url: str | None, reconcile_interval_s: float = 15.0,
               stale_after_s: float = 900.0, limits: LimitsSettings | None = None,
               metrics_enabled: bool = True, metrics_token: str | None = None,
               access_log: bool = True, playground_dir: Path | None = None,
               jobs: JobsOptions | None = None) -> FastAPI:
    """The ASGI app; ``service_factory`` builds the service at startup (and it is closed at shutdown).

    ``limits``: per-client rate limits and trusted proxies (None: neither). ``metrics_token``: the
    bearer token ``GET /metrics`` requires (None: open). ``playground_dir``: the built web page.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await service_factory()
        app.state.service = service
        try:
            job_runner = build_job_runner(service, jobs or JobsOptions(), generation_context)
            await job_runner.start()
        except BaseException:
            await service.aclose()
            raise
        app.state.jobs = job_runner
        # The drain guard, for whoever stops the server (``imagegate serve`` on SIGTERM) and /healthz.
        app.state.drain = service.drain
        metrics.started()
        background = [
            asyncio.create_task(_reconcile_forever(service, reconcile_interval_s, stale_after_s)),
            asyncio.create_task(_keep_alive_forever(service, stale_after_s / 4)),
            asyncio.create_task(_check_availability(service)),
        ]
        if metrics.multiprocess_dir() is not None:
            background.append(asyncio.create_task(_refresh_engine_metrics_forever(service, ENGINE_METRICS_INTERVAL_S)))
        try:
            yield
        finally:
            # Jobs first: cutting their renders gives payments back through the ledger, still open here.
            await job_runner.aclose()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await service.aclose()
            metrics.stopped()

    def outer_layers(inner: ASGIApp) -> ASGIApp:
        observed = RequestObserver(inner, access_log_enabled=access_log)
        if limits is None:
            return observed
        # The client address every layer sees: X-Forwarded-For only from a trusted proxy.
        return ProxyHeadersMiddleware(observed, trusted_hosts=limits.trusted_proxies)  # type: ignore[arg-type,return-value]

    app = _ImagegateAPI(
        title="imagegate",
        version=__version__,
        description="Pay-per-request text-to-image API (x402, USDC on Base).",
        lifespan=lifespan,
        outer_layers=outer_layers,
    )
    # Unpaid requests to the paid route get their 402 from memory (see payments.challenge_cache). Added
    # before CORS, and before any rate limit or metrics middleware, so that those still wrap it.
    app.add_middleware(
        ChallengeCache,
        path=GENERATE_PATH,
        source=lambda: getattr(app.state, "service", None),
        render=_error_response,
        context=lambda scope: generation_context({}, f"{base_url_of(Request(scope))}{GENERATE_PATH}"),
        max_body_bytes=max_body_bytes,
    )
    if limits is not None and limits.enabled:
        app.add_middleware(RateLimiter, settings=limits)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=cors_origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=PAYMENT_HEADERS_ALLOWED + JOB_HEADERS_ALLOWED,
        expose_headers=PAYMENT_HEADERS_EXPOSED + JOB_HEADERS_EXPOSED,
        max_age=600,
    )

    # The web page for people: GET / for browsers, its static files and its config route (mounted
    # last, so the API's own routes are matched first).
    page = playground.Playground(playground_dir or playground.DIST_DIR, public_base_url=public_base_url)

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
            # The router's Allow header (RFC 9110) lists what the path does take.
            return _error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}.",
                                                    headers=dict(error.headers or {})))
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
        if request.url.path == openai_compat.PATH:
            return openai_compat.error_response(InternalError("Server error during generation."))
        return _error_response(InternalError("Server error during generation."))

    @app.get("/", summary="Route manifest", response_model=None)
    async def manifest(request: Request, response: Response) -> Response | dict[str, Any]:
        if playground.prefers_html(request.headers.get("accept")):
            return page.page(request)
        response.headers["Vary"] = "Accept"
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
                {"method": "POST", "path": openai_compat.PATH, "paid": service.payments.enabled,
                 "description": openai_compat.DESCRIPTION},
                {"method": "GET", "path": "/v1/jobs/{id}", "paid": False,
                 "description": "An async job (POST /v1/images/generate with Prefer: respond-async)."},
                {"method": "POST", "path": "/v1/jobs/{id}/cancel", "paid": False,
                 "description": "Cancel a job before its images are rendered; its payment is given back."},
                {"method": "GET", "path": "/v1/jobs/{id}/events", "paid": False,
                 "description": "A job's progress as Server-Sent Events (Last-Event-ID resumes)."},
                {"method": "GET", "path": "/v1/requests/{requestId}/events", "paid": False,
                 "description": "Progress of a synchronous request sent with X-Request-ID, as Server-Sent Events."},
                {"method": "GET", "path": "/images/{uuid}.{ext}", "paid": False,
                 "description": "A generated image (permanent, immutable)."},
                {"method": "GET", "path": "/healthz", "paid": False, "description": "Liveness."},
                {"method": "GET", "path": "/", "paid": False,
                 "description": "This manifest; a browser (Accept: text/html) gets the playground page."},
                {"method": "GET", "path": "/openapi.json", "paid": False, "description": "OpenAPI document."},
            ],
        }

    @app.get("/healthz", summary="Liveness", responses=_error_responses(ServerDraining))
    async def healthz(request: Request) -> JSONResponse:
        drain = service_of(request).drain
        if drain.draining:
            # Load balancers take a draining server out of rotation on this answer.
            raise ServerDraining("Shutting down: no new paid work; paid work in flight is finishing.",
                                 retry_after=drain.retry_after(),
                                 details={"status": "draining", "paidWorkInFlight": drain.in_flight})
        return JSONResponse({"status": "ok"})

    @app.get("/v1/images/models", summary="Model catalog")
    async def models(request: Request) -> dict[str, Any]:
        return await service_of(request).models()

    @app.post(
        "/v1/images/estimate",
        summary="Price a generation",
        response_model=schemas.EstimateResponse,
        # The body's schema is the served catalog's (``openapi.complete``).
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {}}}}},
        responses=_error_responses(InvalidParameter, EstimateFailed, ModelUnavailable),
    )
    async def estimate(request: Request) -> JSONResponse:
        return JSONResponse(await service_of(request).estimate(await read_json(request)))

    @app.post(
        GENERATE_PATH,
        summary="Generate images (x402-paid)",
        description=GENERATE_DESCRIPTION,
        response_model=schemas.GenerateResponse,
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
            "parameters": [
                {"name": "PAYMENT-SIGNATURE", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "x402 v2 payment (base64 JSON), sent by x402 clients after the 402."},
                {"name": "X-PAYMENT", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "x402 v1 payment (base64 JSON)."},
            ],
        },
        responses={
            202: openapi.error_response("SETTLEMENT_PENDING: paid, not yet confirmed on chain; resend the same "
                                        "payment for the images (never sign a new one)"),
            **_error_responses(InvalidParameter, InternalError, ModelUnavailable, ModelBusy, PaymentUnavailable,
                               UpstreamUnavailable, GenerationTimedOut, ServerDraining),
            402: {"description": "PAYMENT_REQUIRED (the x402 challenge: v1 body and v2 PAYMENT-REQUIRED header) "
                                 "or SETTLEMENT_FAILED",
                  "content": {"application/json": {"schema": openapi.PAYMENT_REQUIRED_REF}},
                  "headers": {"PAYMENT-REQUIRED": {"description": "x402 v2 challenge (base64 JSON)",
                                                   "schema": {"type": "string"}}}},
        },
    )
    async def generate(request: Request) -> JSONResponse:
        body = await read_json(request)
        context = generation_context(request.headers, f"{base_url_of(request)}{request.url.path}")
        preference = parse_prefer(request.headers.getlist("prefer"), jobs_of(request).options.max_prefer_wait_s)
        if preference.asynchronous:
            return await submit_job(request, body, context, preference)
        if split_webhook_fields(body)[1]:
            raise InvalidParameter("webhookUrl, webhookEvents and webhookSecret belong to async jobs: send the "
                                   "request with Prefer: respond-async.", field="webhookUrl")
        outcome = await generate_reporting(request, body, context)
        headers = dict(outcome.receipt.headers) if outcome.receipt else {}
        headers["Cache-Control"] = "no-store"
        if outcome.timings:
            headers["Server-Timing"] = outcome.server_timing()
        return JSONResponse(outcome.body(), headers=headers)

    # --- async jobs, event streams, the OpenAI-compatible route --------------------------------------

    def jobs_of(request: Request) -> JobRunner:
        runner: JobRunner = request.app.state.jobs
        return runner

    async def generate_reporting(request: Request, body: dict[str, Any], context: PaymentContext) -> GenerationOutcome:
        """The synchronous flow, its progress recorded when the client named the request (X-Request-ID)."""
        progress = RequestProgress.of(jobs_of(request).hub, request.headers)
        try:
            outcome = await service_of(request).generate(body, context, base_url_of(request), progress=progress.sink)
        except ImagegateError as error:
            await progress.failed(error)
            raise
        await progress.succeeded(outcome.generation_id)
        return outcome

    async def submit_job(request: Request, body: dict[str, Any], context: PaymentContext,
                         preference: Preference) -> JSONResponse:
        runner = jobs_of(request)
        body, webhook_fields = split_webhook_fields(body)
        webhook = await parse_webhook(webhook_fields, runner.options.webhooks,
                                      runner.webhooks.secret if runner.webhooks else None)
        submitted = await runner.submit(body, context, base_url_of(request), webhook)
        job = submitted.job
        if preference.wait_for_s > 0 and not job.status.terminal:
            job = await runner.wait_for(job.id, preference.wait_for_s)
        headers = {"Location": f"/v1/jobs/{job.id}", "Cache-Control": "no-store"}
        if preference.applied():
            headers["Preference-Applied"] = preference.applied()
        if job.status.terminal:
            headers.update(await runner.receipt_headers(job))
        view = await runner.view(job, cancel_token=submitted.cancel_token)
        return JSONResponse(view, status_code=200 if job.status.terminal else 202, headers=headers)

    @app.get("/v1/jobs/{job_id}", summary="An async job", responses=_error_responses(NotFound))
    async def job_status(request: Request, job_id: str) -> JSONResponse:
        runner = jobs_of(request)
        job = await runner.job(job_id)
        return JSONResponse(await runner.view(job), headers={"Cache-Control": "no-store"})

    @app.post("/v1/jobs/{job_id}/cancel", summary="Cancel an async job",
              responses=_error_responses(InvalidParameter, Forbidden, NotFound, JobNotCancellable))
    async def job_cancel(request: Request, job_id: str) -> JSONResponse:
        runner = jobs_of(request)
        body = await read_json(request) if (await request.body()).strip() else {}
        token, signature = body.get("cancelToken"), body.get("signature")
        if not isinstance(token, str | None) or not isinstance(signature, str | None):
            raise InvalidParameter("cancelToken and signature must be strings.")
        job = await runner.cancel(job_id, token=token, signature=signature)
        return JSONResponse(await runner.view(job), status_code=200 if job.status.terminal else 202,
                            headers={"Cache-Control": "no-store"})

    @app.get("/v1/jobs/{job_id}/events", summary="An async job's events (Server-Sent Events)",
             response_class=Response, responses=_error_responses(InvalidParameter, NotFound))
    async def job_events(request: Request, job_id: str) -> Response:
        runner = jobs_of(request)
        job = await runner.job(job_id)
        after = last_event_id(request.headers, request.query_params)
        events = runner.hub.follow(job_stream(job.id), after, is_over=lambda: runner.is_finished(job.id))
        return event_stream_response(events, ping_s=runner.options.sse_ping_s)

    @app.get("/v1/requests/{request_id}/events", summary="A synchronous request's events (Server-Sent Events)",
             response_class=Response, responses=_error_responses(InvalidParameter))
    async def request_events(
        request: Request,
        request_id: Annotated[str, PathParameter(pattern=REQUEST_ID.pattern, description=(
            "The X-Request-ID the request was (or will be) sent with: 16 to 128 characters of A-Z, a-z, 0-9, "
            "'.', '_', ':' or '-' (a random UUID is best)."))],
    ) -> Response:
        runner = jobs_of(request)
        after = last_event_id(request.headers, request.query_params)
        events = runner.hub.follow(request_stream(request_id), after,
                                   idle_timeout_s=runner.options.request_stream_wait_s)
        return event_stream_response(events, ping_s=runner.options.sse_ping_s)

    @app.post(
        openai_compat.PATH,
        summary="Generate images, OpenAI Images API shape (x402-paid)",
        description=openai_compat.DESCRIPTION,
        responses={
            400: openapi.error_response("invalid_request_error: a field OpenAI's API or this server refuses",
                                        openai=True),
            402: {**openapi.error_response("payment_required: the x402 challenge (v1 fields in the body, v2 "
                                           "PAYMENT-REQUIRED header) with an OpenAI error", openai=True),
                  "headers": {"PAYMENT-REQUIRED": {"description": "x402 v2 challenge (base64 JSON)",
                                                   "schema": {"type": "string"}}}},
            500: openapi.error_response("server_error", openai=True),
            503: openapi.error_response("server_error: model busy or unavailable, payments unavailable, "
                                        "settlement pending (x-should-retry: false; resend the same payment)",
                                        headers={"Retry-After": openapi.MAYBE_RETRY_AFTER_REF}, openai=True),
        },
    )
    async def openai_generations(request: Request) -> JSONResponse:
        try:
            native, options = openai_compat.to_native(await read_json(request))
            context = PaymentContext(
                headers=request.headers, resource_url=f"{base_url_of(request)}{request.url.path}",
                description=openai_compat.DESCRIPTION, input_schema=openai_compat.input_schema(),
                output_schema=openai_compat.output_schema())
            outcome = await generate_reporting(request, native, context)
            body = await openai_compat.images_response(outcome, options, service_of(request).store)
        except ImagegateError as error:
            return openai_compat.error_response(error)
        headers = dict(outcome.receipt.headers) if outcome.receipt else {}
        headers["Cache-Control"] = "no-store"
        return JSONResponse(body, headers=headers)

    @app.get(
        "/images/{name}",
        summary="A generated image",
        response_class=FileResponse,
        openapi_extra={"parameters": [
            {"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"},
             "description": "The ETag of a copy you hold: 304 when it is this image."}]},
        responses={
            200: {"description": "The image (immutable).", "content": {
                media_type: {"schema": {"type": "string", "format": "binary"}}
                for media_type in ("image/png", "image/webp", "image/jpeg")}},
            304: {"description": "Not modified: If-None-Match named this image's ETag."},
            **_error_responses(NotFound),
        },
    )
    async def image(request: Request, name: str) -> Response:
        image_uuid, _, extension = name.partition(".")
        store = service_of(request).store
        image_file = await store.open(image_uuid)
        if image_file is None or (extension and extension != image_file.extension):
            raise NotFound(f"No image {name!r}.")
        if image_file.redirect_url is not None:
            # Served by the store's CDN; API links (older ones, or typed by hand) lead there.
            return RedirectResponse(image_file.redirect_url, status_code=301,
                                    headers={"Cache-Control": IMMUTABLE_CACHE})
        headers = {"ETag": image_file.etag, "Cache-Control": IMMUTABLE_CACHE}
        if request.headers.get("if-none-match") == image_file.etag:
            return Response(status_code=304, headers=headers)
        if image_file.path is not None:
            return FileResponse(image_file.path, media_type=image_file.media_type, headers=headers)
        # A bucket without a CDN: any API process streams it.
        return StreamingResponse(store.read(image_uuid, image_file.extension), media_type=image_file.media_type,
                                 headers={**headers, "Content-Length": str(image_file.size_bytes)})

    if metrics_enabled:
        expected_authorization = f"Bearer {metrics_token}".encode() if metrics_token else None
        multiprocess = metrics.multiprocess_dir() is not None

        @app.get(
            "/metrics",
            summary="Prometheus metrics",
            response_class=Response,
            responses={200: {"description": "Prometheus text exposition format.",
                             "content": {"text/plain": {"schema": {"type": "string"}}}},
                       **(_error_responses(Unauthorized) if metrics_token else {})},
        )
        async def metrics_endpoint(request: Request) -> Response:
            if expected_authorization is not None and not hmac.compare_digest(
                    request.headers.get("authorization", "").encode(), expected_authorization):
                raise Unauthorized("GET /metrics needs 'Authorization: Bearer <token>' ([metrics] token).")
            service = service_of(request)
            metrics.refresh_engine(service.engine, service.catalog)
            # Multiprocess mode reads one file per worker process: off the event loop.
            body = await asyncio.to_thread(metrics.render) if multiprocess else metrics.render()
            return Response(body, media_type=metrics.CONTENT_TYPE)

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            generated = get_openapi(title=app.title, version=app.version, description=app.description,
                                    routes=app.routes)
            app.openapi_schema = openapi.complete(
                generated, catalog=app.state.service.catalog,
                limited=LIMITED_ROUTES if limits is not None and limits.enabled else ())
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]

    # The page's routes come after the API's own, so API requests match first.
    app.include_router(page.router)
    return app


def app_from_settings(settings: Settings) -> FastAPI:
    """The production wiring: every component built from one ``Settings``."""

    async def build() -> ImageService:
        catalog = build_catalog(settings)
        _register_log_secrets(settings)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        ledger = SqlLedger.from_settings(settings.ledger, settings.data_dir)
        await ledger.start()
        store = build_store(settings.storage)
        await store.start()
        gate, terms = await build_gate(settings, ledger)
        return ImageService(
            catalog=catalog,
            engine=build_engine(settings),
            store=store,
            ledger=ledger,
            payments=gate,
            output_format=settings.storage.format,
            terms=terms,
            render_timeout_s=settings.workers.render_timeout_s,
            drain=Drain(settings.server.drain_timeout_s),
        )

    return create_app(
        build,
        cors_origins=settings.server.cors_allow_origins,
        max_body_bytes=settings.server.max_body_bytes,
        public_base_url=settings.server.public_base_url,
        reconcile_interval_s=settings.payments.reconcile_interval_s,
        stale_after_s=settings.payments.stale_after_s,
        limits=settings.limits,
        metrics_enabled=settings.metrics.enabled,
        metrics_token=metrics_token(settings),
        access_log=settings.logging.access_log,
        jobs=JobsOptions.from_settings(settings),
    )


def metrics_token(settings: Settings) -> str | None:
    """The bearer token of ``GET /metrics``, from ``[metrics] token_file`` or its env var."""
    return read_private_key(settings.metrics.token_env, settings.metrics.token_file)


def _register_log_secrets(settings: Settings) -> None:
    facilitator = settings.payments.facilitator
    logs.register_secret(read_private_key(facilitator.private_key_env, facilitator.private_key_file))
    logs.register_secret(metrics_token(settings))
    if settings.payments.mode == "devchain":
        logs.register_secret(devchain.FACILITATOR_ACCOUNT.private_key)
    # Provider keys kept in files (those in env vars are covered by their names).
    base = settings.config_file.parent if settings.config_file else Path.cwd()
    for table in settings.providers.values():
        if isinstance(table.get("api_key_file"), str):
            with contextlib.suppress(OSError):
                logs.register_secret((base / Path(table["api_key_file"]).expanduser()).read_text().strip())
    logs.register_environment_secrets()


def app_from_environment() -> FastAPI:
    """The app of one worker process of ``imagegate serve --workers N`` (uvicorn imports it by name):
    settings from ``$IMAGEGATE_CONFIG`` and the environment, logging as the CLI set it up."""
    settings = load_settings()
    logs.configure(settings.logging.format, os.environ.get(LOG_LEVEL_ENV, "info"))
    return app_from_settings(settings)
