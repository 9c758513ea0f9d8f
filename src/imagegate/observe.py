"""The outermost HTTP layer: request ids, request metrics and access lines, as one pure ASGI middleware.

Pure ASGI (no ``BaseHTTPMiddleware``, which costs a task and a stream per request) and one layer for
the three jobs, so the hot paths (the 402 challenge, image GETs) pay one extra call and one wrapped
``send``. It wraps everything else, the framework's 500 handler included, so every answer (429 from
the limiter, 405 from routing, 500 from a bug) carries ``X-Request-ID`` and is counted.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegate import metrics
from imagegate.logs import ACCESS_LOGGER, REQUEST, RequestLog

REQUEST_ID_HEADER = b"x-request-id"
# A client's id is kept when it is short and plain (it is echoed in headers and log lines), else replaced.
_CLIENT_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:~+/=-]{1,128}$")
# Set by a layer that answers before routing (the rate limiter), so the answer is labelled by route.
ROUTE_TEMPLATE_KEY = "imagegate.route"
REQUEST_ID_KEY = "imagegate.request_id"

access_log = logging.getLogger(ACCESS_LOGGER)


def new_request_id() -> str:
    return os.urandom(12).hex()


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    if route is not None:
        path: str = getattr(route, "path", metrics.UNMATCHED_ROUTE)
        return path
    template: str = scope.get(ROUTE_TEMPLATE_KEY, metrics.UNMATCHED_ROUTE)
    return template


class RequestObserver:
    def __init__(self, app: ASGIApp, *, access_log_enabled: bool = True):
        self.app = app
        self.access_log_enabled = access_log_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                if _CLIENT_REQUEST_ID.match(value):
                    request_id = value.decode("ascii")
                break
        if request_id is None:
            request_id = new_request_id()
        scope[REQUEST_ID_KEY] = request_id
        header = (REQUEST_ID_HEADER, request_id.encode("ascii"))
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # A new list: the response object's own headers may be shared (prebuilt responses).
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        method: str = scope["method"]
        request_log = RequestLog(request_id, method, scope["path"])
        token = REQUEST.set(request_log)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = route_template(scope)
            metrics.http_request(method, route, status, elapsed)
            if self.access_log_enabled and access_log.isEnabledFor(logging.INFO):
                self._log_access(request_log, scope, route, status, elapsed)
            REQUEST.reset(token)

    @staticmethod
    def _log_access(request_log: RequestLog, scope: Scope, route: str, status: int, elapsed: float) -> None:
        client = scope.get("client")
        outcome: dict[str, Any] = {"route": route, "status": status, "duration_ms": round(elapsed * 1000, 1),
                                   "client": client[0] if client else None}
        learned = {key: value for key, value in request_log.fields.items() if key not in _IN_MESSAGE}
        request_log.fields.update(outcome)
        access_log.info("%s %s %s %.1fms", scope["method"], scope["path"], status, elapsed * 1000,
                        extra={"access": {**outcome, **learned}})


# Already in the access line's message (or its [request id] tag in the text format).
_IN_MESSAGE = frozenset({"request_id", "method", "path"})
