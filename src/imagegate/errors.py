"""The one error hierarchy of imagegate.

Every error a client can see is an ``ImagegateError``; ``app`` turns it into
``{"error": CODE, "message": TEXT, "details": {...}}`` with its HTTP status.

    ImagegateError
    ├── InvalidRequest (400)
    │   ├── InvalidParameter        INVALID_PARAMETER
    │   ├── InvalidDimensions       INVALID_DIMENSIONS
    │   └── InvalidModel            INVALID_MODEL
    ├── Unauthorized (401)          UNAUTHORIZED

    ├── Forbidden (403)             FORBIDDEN
    ├── NotFound (404)              NOT_FOUND
    ├── MethodNotAllowed (405)      METHOD_NOT_ALLOWED
    ├── Conflict (409)              CONFLICT
    │   └── JobNotCancellable       JOB_NOT_CANCELLABLE
    ├── JobExpired (410)            JOB_EXPIRED
    ├── PaymentRequired (402)       PAYMENT_REQUIRED
    ├── RateLimited (429)           RATE_LIMITED
    ├── ServiceUnavailable (503)
    │   ├── ModelUnavailable        MODEL_UNAVAILABLE
    │   ├── ModelBusy               MODEL_BUSY
    │   ├── PaymentUnavailable      PAYMENT_UNAVAILABLE
    │   ├── UpstreamUnavailable     UPSTREAM_UNAVAILABLE
    │   ├── GenerationTimedOut      GENERATION_TIMEOUT
    │   └── ServerDraining          SERVER_DRAINING
    ├── SettlementFailed (402)      SETTLEMENT_FAILED
    ├── SettlementPending (202)     SETTLEMENT_PENDING
    ├── GenerationFailed (500)      INTERNAL_ERROR
    ├── EstimateFailed (500)        ESTIMATE_ERROR
    └── InternalError (500)         INTERNAL_ERROR
"""

from __future__ import annotations

from typing import Any, ClassVar


class ImagegateError(Exception):
    code: ClassVar[str] = "INTERNAL_ERROR"
    status: ClassVar[int] = 500

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class InvalidRequest(ImagegateError):
    status = 400
    code = "INVALID_PARAMETER"

    def __init__(self, message: str, *, field: str | None = None, details: dict[str, Any] | None = None):
        merged = dict(details or {})
        if field is not None:
            merged.setdefault("field", field)
        super().__init__(message, details=merged)
        self.field = field


class InvalidParameter(InvalidRequest):
    code = "INVALID_PARAMETER"


class InvalidDimensions(InvalidRequest):
    code = "INVALID_DIMENSIONS"


class InvalidModel(InvalidRequest):
    code = "INVALID_MODEL"


class Unauthorized(ImagegateError):
    """A route behind a bearer token (``GET /metrics`` when ``[metrics]`` has one) without the right token."""

    status = 401
    code = "UNAUTHORIZED"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})

class Forbidden(ImagegateError):
    status = 403
    code = "FORBIDDEN"


class NotFound(ImagegateError):
    status = 404
    code = "NOT_FOUND"


class MethodNotAllowed(ImagegateError):
    status = 405
    code = "METHOD_NOT_ALLOWED"


class Conflict(ImagegateError):
    status = 409
    code = "CONFLICT"


class JobNotCancellable(Conflict):
    """The job's images are rendered (it is settling or finished): cancelling would lose paid work."""

    code = "JOB_NOT_CANCELLABLE"


class JobExpired(ImagegateError):
    """A job that could not finish within its time (its wait limit or its payment's validity): stopped,
    nothing charged. The error body of an expired job."""

    status = 410
    code = "JOB_EXPIRED"


class PaymentRequired(ImagegateError):
    """402: the body and headers are the x402 challenge, built by ``payments``."""

    status = 402
    code = "PAYMENT_REQUIRED"

    def __init__(
        self,
        message: str,
        *,
        challenge_body: dict[str, Any],
        headers: dict[str, str],
        reason: str,
    ) -> None:
        super().__init__(message, details={"reason": reason}, headers=headers)
        self.challenge_body = challenge_body
        self.reason = reason

    def body(self) -> dict[str, Any]:
        # x402 v1 clients read x402Version/accepts from the body; error/message are ours.
        return {**self.challenge_body, "error": self.code, "message": self.message, "reason": self.reason,
                "details": self.details}


class RateLimited(ImagegateError):
    """Too many unpaid requests of one kind from one client (``[limits]``); Retry-After says when to retry."""

    status = 429
    code = "RATE_LIMITED"

    def __init__(self, message: str, *, retry_after: int, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class SettlementFailed(ImagegateError):
    """Settlement was refused on chain: the images are withheld and nothing moved."""

    status = 402
    code = "SETTLEMENT_FAILED"


class SettlementPending(ImagegateError):
    """Settlement was broadcast but its outcome is not known yet; the client must not pay again."""

    status = 202
    code = "SETTLEMENT_PENDING"


class ServiceUnavailable(ImagegateError):
    status = 503
    code = "SERVICE_UNAVAILABLE"

    def __init__(
        self,
        message: str,
        *,
        retry_after: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        super().__init__(message, details=details, headers=headers)
        self.retry_after = retry_after


class ModelUnavailable(ServiceUnavailable):
    code = "MODEL_UNAVAILABLE"


class ModelBusy(ServiceUnavailable):
    code = "MODEL_BUSY"


class PaymentUnavailable(ServiceUnavailable):
    code = "PAYMENT_UNAVAILABLE"


class UpstreamUnavailable(ServiceUnavailable):
    code = "UPSTREAM_UNAVAILABLE"


class GenerationTimedOut(ServiceUnavailable):
    """The render ran past its deadline and was cancelled; nothing was charged."""

    code = "GENERATION_TIMEOUT"


class ServerDraining(ServiceUnavailable):
    """The server is shutting down: no new paid work, or paid work cut at the end of the grace period
    (its payment released, so the same payment works again)."""

    code = "SERVER_DRAINING"


class GenerationFailed(ImagegateError):
    status = 500
    code = "INTERNAL_ERROR"


class EstimateFailed(ImagegateError):
    status = 500
    code = "ESTIMATE_ERROR"


class InternalError(ImagegateError):
    status = 500
    code = "INTERNAL_ERROR"
