"""A paying client process for the gate benchmark: ``python -m bench._payers`` (driven by bench_gate).

It reads a job (JSON, one line on stdin), then for each of its payers asks the server for the 402
challenge and has the x402 SDK's Python client (``x402HTTPClient`` with an ``EthAccountSigner``)
create that payer's payments: one fresh signed authorization per request. It prints ``ready``,
waits for ``go`` on stdin, and sends the paid requests: each payer one after another, the payers
concurrently. Signing happens before ``go`` so that the timed window measures the servers, not
the clients' signing (the same for both servers). It prints one JSON line with every request's
latency and status.

aiohttp sends the requests: a fifth of httpx's CPU per request, which matters when clients, servers
and the chain share two cores.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any

import aiohttp
from eth_account import Account
from x402 import x402Client
from x402.http.x402_http_client import x402HTTPClient
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client


async def payment_headers(session: aiohttp.ClientSession, url: str, body: bytes, key: str,
                          count: int) -> list[dict[str, str]]:
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(key)))
    client.set_spend_controls(False)  # the dev chain's test USDC; amounts are tiny
    http = x402HTTPClient(client)
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
        challenge_body = await response.read()
        challenge_headers = dict(response.headers)
        if response.status != 402:
            raise RuntimeError(f"{url} answered {response.status} without payment: {challenge_body[:300]!r}")
    headers = []
    for _ in range(count):
        paid, _payload = await http.handle_402_response(challenge_headers, challenge_body, url)
        headers.append(paid)
    return headers


async def pay(session: aiohttp.ClientSession, url: str, body: bytes, headers: list[dict[str, str]],
              think_s: float) -> list[tuple[float, float, int, str]]:
    """(end, latency ms, status, Server-Timing) per request, one after another, each after a pause of
    up to ``think_s`` (random, not timed)."""
    results = []
    for paid in headers:
        if think_s:
            await asyncio.sleep(random.uniform(0, think_s))
        started = time.perf_counter()
        async with session.post(url, data=body, headers={**paid, "content-type": "application/json"}) as response:
            await response.read()
            results.append((time.time(), (time.perf_counter() - started) * 1000, response.status,
                            response.headers.get("server-timing", "")))
    return results


async def main() -> None:
    job: dict[str, Any] = json.loads(sys.stdin.readline())
    url, body, count = job["url"], json.dumps(job["body"]).encode(), int(job["count"])
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=job.get("timeout_s", 600))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        signed = [await payment_headers(session, url, body, key, count) for key in job["keys"]]
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        started, cpu = time.time(), time.process_time()
        per_payer = await asyncio.gather(*(pay(session, url, body, headers, float(job.get("think_s", 0)))
                                           for headers in signed))
        finished, cpu = time.time(), time.process_time() - cpu
    requests = [request for payer in per_payer for request in payer]
    print(json.dumps({"started": started, "finished": finished, "cpu_s": cpu,
                      "latencies_ms": [r[1] for r in requests], "statuses": [r[2] for r in requests],
                      "ends": [r[0] for r in requests], "timings": [r[3] for r in requests]}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
