"""One soak client process: several payers, each paying for its generations one after another with the
x402 SDK, and resending the very same payment whenever the server fails to answer it.

    python -m tests.support.soak_payer --url URL --keys KEYFILE --requests N --out RESULTS.jsonl

A payer's request ends when it has its images (200, and every image URL answers), or when the server
refuses its payment for good (402: then it moved no money, which the harness checks). Everything in
between (connection refused or cut while the server restarts, 503 with Retry-After, 202 pending) is
answered by resending the same payment. One JSON line per request goes to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.payer import SdkPayer
from tests.support.serve import SIMULATED

GENERATE = "/v1/images/generate"
# A payment's authorization lasts max_timeout_seconds (300 s); a request still unanswered after this
# long is reported as given up.
GIVE_UP_S = 270.0
RETRY_CAP_S = 2.0
# Each server answer the payer cannot use as it is, and what the payer does about it.
RESEND_ON = {503, 202, 500}


async def pay_once(http: httpx.AsyncClient, payer: SdkPayer, body: dict[str, Any]) -> dict[str, Any]:
    started = time.time()
    result: dict[str, Any] = {"payer": payer.address, "started": started, "attempts": 0, "interruptions": 0,
                              "answers": []}
    deadline = time.monotonic() + GIVE_UP_S
    headers: dict[str, str] | None = None
    while time.monotonic() < deadline:
        result["attempts"] += 1
        try:
            if headers is None:
                challenge = await http.post(GENERATE, json=body)
                if challenge.status_code == 503:
                    await asyncio.sleep(_retry_after(challenge))
                    continue
                headers = await payer.payment_headers(challenge)
                result["amount"] = int(_accepted_amount(challenge))
                result["header"] = headers
                continue
            response = await http.post(GENERATE, json=body, headers=headers)
        except httpx.TransportError as exc:
            # The server died (or is restarting): the same payment goes again once it is back.
            result["interruptions"] += 1
            result["answers"].append(type(exc).__name__)
            await asyncio.sleep(0.2 + random.random() * 0.3)
            continue
        result["answers"].append(f"{response.status_code} {_code(response)}")
        if response.status_code == 200:
            payload = response.json()
            if not await _images_reachable(http, payload["images"]):
                result["answers"].append("images not reachable yet")
                await asyncio.sleep(0.5)
                continue
            result.update(status=200, finished=time.time(), images=[i["url"] for i in payload["images"]],
                          charged=int(payload["cost"]["amount"]), transaction=payload["cost"].get("transaction"),
                          generation=payload.get("id"))
            return result
        if response.status_code in RESEND_ON:
            await asyncio.sleep(min(_retry_after(response), RETRY_CAP_S))
            continue
        result.update(status=response.status_code, finished=time.time(), error=response.text[:500])
        return result
    result.update(status=0, finished=time.time(), error="gave up: no answer before the payment would expire")
    return result


async def _images_reachable(http: httpx.AsyncClient, images: list[dict[str, Any]]) -> bool:
    for image in images:
        try:
            got = await http.get(image["url"])
        except httpx.TransportError:
            return False
        if got.status_code != 200 or not got.content:
            return False
    return True


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.1, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def _code(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", ""))
    except ValueError:
        return ""


def _accepted_amount(challenge: httpx.Response) -> str:
    accepts = challenge.json()["accepts"]
    return str(accepts[0]["maxAmountRequired"])


async def run_payer(url: str, key: str, requests: int, out: Path, seed: int) -> None:
    rng = random.Random(seed)
    payer = SdkPayer(key, max_atomic=10**9)
    async with httpx.AsyncClient(base_url=url, timeout=120, trust_env=False) as http:
        for index in range(requests):
            body = {"prompt": f"soak {seed} {index}", "model": SIMULATED, "width": 128, "height": 128,
                    "numberResults": rng.choice((1, 2)), "seed": rng.randrange(2**31)}
            result = await pay_once(http, payer, body)
            result["request"] = body
            with out.open("a") as handle:
                handle.write(json.dumps(result) + "\n")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--keys", type=Path, required=True, help="one private key per line: one payer each")
    parser.add_argument("--requests", type=int, required=True, help="paid requests per payer")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    keys = [line.strip() for line in args.keys.read_text().splitlines() if line.strip()]
    await asyncio.gather(*(run_payer(args.url, key, args.requests, args.out, args.seed * 1000 + index)
                           for index, key in enumerate(keys)))


if __name__ == "__main__":
    asyncio.run(main())
