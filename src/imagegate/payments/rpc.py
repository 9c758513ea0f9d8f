"""An async Ethereum JSON-RPC client: one connection pool per node, errors told apart by what they imply.

The x402 SDK's facilitator signer is web3.py's synchronous provider, which blocks whatever thread
calls it; settling many payments at once needs many requests in flight on one event loop, so the
payment path speaks JSON-RPC itself (a few dozen lines; web3's async provider adds a middleware
stack per call that costs more than the call). It uses aiohttp rather than the project's usual
httpx: measured against anvil, an httpx request costs ~1 ms of CPU and an aiohttp one ~0.2 ms,
and a paid request makes two (aiohttp is already installed with web3, which the x402 SDK uses).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import aiohttp

# Settlements wait on the node (eth_sendRawTransactionSync holds the request until the block), so
# many requests are in flight at once: one per payment being settled.
MAX_CONNECTIONS = 256


class RpcUnreachable(Exception):
    """The request did not get an answer (connection refused, timeout, bad HTTP status).

    For a broadcast this means the node may or may not have the transaction.
    """


class RpcError(Exception):
    """The node answered with a JSON-RPC error (a revert, a refused transaction, an unknown method)."""

    def __init__(self, method: str, code: int, message: str, data: Any = None):
        super().__init__(f"{method}: {message} (code {code})")
        self.method = method
        self.code = code
        self.message = message
        self.data = data

    @property
    def method_not_found(self) -> bool:
        text = self.message.lower()
        return self.code == -32601 or "method not found" in text or "not supported" in text \
            or "does not exist" in text or "unknown method" in text


class JsonRpc:
    def __init__(self, url: str, *, timeout_s: float = 10.0):
        self.url = url
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)

    def _http(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the event loop it was created on.
        if self._session is None or self._session.closed:
            # trust_env=False: the node is reached directly, never through a proxy from the environment.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s), trust_env=False,
                json_serialize=_compact_json)
        return self._session

    async def _post(self, payload: Any, timeout_s: float | None) -> Any:
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s is not None else None
        try:
            async with self._http().post(self.url, json=payload, timeout=timeout) as response:
                if response.status >= 400:
                    raise RpcUnreachable(f"RPC {self.url} answered HTTP {response.status}")
                return json.loads(await response.read())
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise RpcUnreachable(f"RPC {self.url} failed: {exc!r}") from exc

    async def call(self, method: str, *params: Any, timeout_s: float | None = None) -> Any:
        body = await self._post({"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": list(params)},
                                timeout_s)
        error = body.get("error") if isinstance(body, dict) else None
        if error is not None:
            raise RpcError(method, int(error.get("code", 0)), str(error.get("message", "")), error.get("data"))
        return body.get("result") if isinstance(body, dict) else None

    async def batch(self, calls: list[tuple[str, list[Any]]]) -> list[Any | RpcError]:
        """Several calls in one HTTP request; each result, or the RpcError it got, in order."""
        if not calls:
            return []
        answers = await self._post([{"jsonrpc": "2.0", "id": index, "method": method, "params": params}
                                    for index, (method, params) in enumerate(calls)], None)
        if not isinstance(answers, list):
            raise RpcUnreachable(f"RPC {self.url} answered a batch with {type(answers).__name__}")
        by_id = {answer.get("id"): answer for answer in answers if isinstance(answer, dict)}
        results: list[Any | RpcError] = []
        for index, (method, _) in enumerate(calls):
            answer = by_id.get(index)
            if answer is None:
                results.append(RpcError(method, 0, "no answer in the batch"))
            elif answer.get("error") is not None:
                error = answer["error"]
                results.append(RpcError(method, int(error.get("code", 0)), str(error.get("message", "")),
                                        error.get("data")))
            else:
                results.append(answer.get("result"))
        return results

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
