"""A stand-in for the Hugging Face hub on loopback (``HF_ENDPOINT``): tests never reach the real one.

It answers file requests (``/<org>/<name>/resolve/<revision>/<file>``) as the hub would for a file
that exists (``serving``), or as a hub that is down (``down``: 503), or denies access (``gated``:
401), or has no such repo (``missing``: 404); ``delay_s`` holds each answer back (a hanging hub).
It serves no file content: a model cannot actually be downloaded from it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.server import live_server

Mode = Literal["serving", "down", "gated", "missing"]
STATUS = {"serving": 200, "down": 503, "gated": 401, "missing": 404}


@dataclass
class FakeHub:
    url: str = ""
    mode: Mode = "serving"
    delay_s: float = 0.0
    # (method, path) of every request, in order.
    requests: list[tuple[str, str]] = field(default_factory=list)


@contextmanager
def fake_hub(mode: Mode = "serving") -> Iterator[FakeHub]:
    hub = FakeHub(mode=mode)

    async def resolve(request: Request) -> Response:
        hub.requests.append((request.method, request.url.path))
        if hub.delay_s:
            await asyncio.sleep(hub.delay_s)
        status = STATUS[hub.mode]
        headers = {"X-Repo-Commit": "0" * 40, "ETag": '"fake"', "Content-Length": "2"} if status == 200 else {}
        return Response(b"{}" if request.method == "GET" and status == 200 else b"", status_code=status,
                        headers=headers)

    app = Starlette(routes=[Route("/{path:path}", resolve, methods=["GET", "HEAD"])])
    with live_server(app) as url:
        hub.url = url
        yield hub
