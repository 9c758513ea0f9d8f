"""A JSON-RPC front for a dev chain that refuses long ``eth_getLogs`` ranges, as public endpoints do
(Base's public RPC answers "block range too large" past a few thousand blocks; this one's limit is
``max_range``). It records every range it was asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.server import live_server


@dataclass
class RangeLimitedRpc:
    url: str
    max_range: int
    # (fromBlock, toBlock) of every eth_getLogs, resolved to numbers, refused ones included.
    log_ranges: list[tuple[int, int]] = field(default_factory=list)
    refused: int = 0


@contextmanager
def range_limited_rpc(upstream: str, max_range: int) -> Iterator[RangeLimitedRpc]:
    proxy = RangeLimitedRpc(url="", max_range=max_range)

    async def block(http: httpx.AsyncClient, tag: Any, default: str) -> int:
        tag = default if tag is None else tag
        if tag in ("latest", "safe", "finalized", "pending"):
            answer = (await http.post(upstream, json={"jsonrpc": "2.0", "id": 0, "method": "eth_blockNumber",
                                                      "params": []})).json()
            return int(answer["result"], 16)
        return 0 if tag == "earliest" else int(tag, 16)

    async def forward(request: Request) -> Response:
        call = await request.json()
        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
            if isinstance(call, dict) and call.get("method") == "eth_getLogs":
                query = call["params"][0]
                start = await block(http, query.get("fromBlock"), "latest")
                end = await block(http, query.get("toBlock"), "latest")
                proxy.log_ranges.append((start, end))
                if end - start + 1 > max_range:
                    proxy.refused += 1
                    return JSONResponse({"jsonrpc": "2.0", "id": call.get("id"), "error": {
                        "code": -32600, "message": f"eth_getLogs is limited to a {max_range} block range"}})
            upstream_response = await http.post(upstream, json=call)
        return Response(upstream_response.content, status_code=upstream_response.status_code,
                        media_type="application/json")

    with live_server(Starlette(routes=[Route("/", forward, methods=["POST"])])) as url:
        proxy.url = url
        yield proxy
