"""``imagegate facilitator``: the builtin facilitator served over the standard x402 facilitator API.

POST /verify and POST /settle take ``{"x402Version", "paymentPayload", "paymentRequirements"}`` and
always answer 200 with ``isValid``/``success`` false for payments they refuse; GET /supported lists
what it settles. 503 means it could not reach its chain (nothing was done).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from x402.schemas import PaymentPayload, PaymentRequirements
from x402.schemas.v1 import PaymentPayloadV1, PaymentRequirementsV1

from imagegate.payments.facilitators import (
    AnyPayload,
    AnyRequirements,
    BuiltinFacilitator,
    FacilitatorUnreachable,
    SettlementOutcomeUnknown,
)


def _parse(body: Any) -> tuple[AnyPayload, AnyRequirements]:
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    version = body.get("x402Version")
    if version == 1:
        return (PaymentPayloadV1.model_validate(body["paymentPayload"]),
                PaymentRequirementsV1.model_validate(body["paymentRequirements"]))
    if version == 2:
        return (PaymentPayload.model_validate(body["paymentPayload"]),
                PaymentRequirements.model_validate(body["paymentRequirements"]))
    raise ValueError(f"unsupported x402Version {version!r}")


def create_facilitator_app(facilitator: BuiltinFacilitator, *, bearer_token: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await facilitator.aclose()

    app = FastAPI(title="imagegate facilitator", lifespan=lifespan)

    def authorized(request: Request) -> bool:
        if bearer_token is None:
            return True
        return hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {bearer_token}")

    async def parsed(request: Request) -> tuple[AnyPayload, AnyRequirements] | JSONResponse:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        try:
            return _parse(await request.json())
        except (ValueError, KeyError, ValidationError) as exc:
            return JSONResponse({"error": "invalid_request", "message": str(exc)}, status_code=400)

    @app.post("/verify")
    async def verify(request: Request) -> JSONResponse:
        parsed_body = await parsed(request)
        if isinstance(parsed_body, JSONResponse):
            return parsed_body
        try:
            verdict = await facilitator.verify(*parsed_body)
        except FacilitatorUnreachable as exc:
            return JSONResponse({"error": "chain_unreachable", "message": str(exc)}, status_code=503)
        return JSONResponse(verdict.model_dump(by_alias=True, exclude_none=True))

    @app.post("/settle")
    async def settle(request: Request) -> JSONResponse:
        parsed_body = await parsed(request)
        if isinstance(parsed_body, JSONResponse):
            return parsed_body
        try:
            outcome = await facilitator.settle(*parsed_body)
        except FacilitatorUnreachable as exc:
            # Nothing was broadcast (the chain could not be reached first).
            return JSONResponse({"error": "chain_unreachable", "message": str(exc)}, status_code=503)
        except SettlementOutcomeUnknown as exc:
            # 504: the caller must treat the transfer as possibly done and reconcile, never retry blindly.
            return JSONResponse({"error": "settlement_outcome_unknown", "message": str(exc)}, status_code=504)
        return JSONResponse(outcome.model_dump(by_alias=True, exclude_none=True))

    @app.get("/supported")
    async def supported(request: Request) -> JSONResponse:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        result = await facilitator.supported()
        return JSONResponse(result.model_dump(by_alias=True, exclude_none=True))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
