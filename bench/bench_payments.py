"""Payment overhead: imagegate's x402 steps vs the x402 SDK's FastAPI middleware, same facilitator, same run.

Both servers use the builtin (x402 SDK) facilitator against one dev chain. Each paid request carries
a fresh, correctly signed v2 payment. imagegate's overhead is its total latency minus the generate and
store steps it reports in Server-Timing; the SDK route's handler does nothing, so its total latency is
its overhead. Also: 402-challenge requests/s against a hello-world route of the same app.

Run: .venv/bin/python -m bench.bench_payments
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from tests.support.payments import Terms, sign, v2_header

from bench._load import interleaved_throughput, machine, server, summary
from imagegate import devchain
from imagegate.tiny_pipelines import build_tiny_flux

REQUESTS = 40
BODY = {"prompt": "a small red circle", "width": 128, "height": 128, "seed": 1}


def server_ms(response: httpx.Response, *steps: str) -> float:
    timings = dict(item.strip().split(";dur=") for item in response.headers["server-timing"].split(","))
    return sum(float(timings[step]) for step in steps)


async def paid_latencies(url: str, amount: int, *, imagegate: bool,
                         steps: dict[str, list[float]] | None = None) -> list[float]:
    overheads = []
    steps = {} if steps is None else steps
    async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
        for index in range(REQUESTS + 3):
            terms = Terms(amount)
            headers = v2_header(terms, sign(terms))
            body = {**BODY, "seed": index} if imagegate else {}
            started = time.perf_counter()
            response = await client.post(url, json=body, headers=headers)
            elapsed = (time.perf_counter() - started) * 1000
            assert response.status_code == 200, response.text
            if index < 3:
                continue  # warm-up
            if imagegate:
                for step in ("validate", "payment", "generate", "store", "settle", "publish"):
                    steps.setdefault(step, []).append(server_ms(response, step))
            # Storage (staging and publishing the PNG) is not payment work; the SDK route stores nothing.
            overheads.append(elapsed - server_ms(response, "generate", "store", "publish") if imagegate else elapsed)
    return overheads


async def main() -> None:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="imagegate-bench-"))
    tiny = build_tiny_flux(root / "tiny-flux")
    async with devchain.DevChain(payer_balance=10_000 * 10**6) as chain:
        env = {"BENCH_ROOT": str(root / "imagegate"), "BENCH_TINY_FLUX": str(tiny), "BENCH_RPC_URL": chain.rpc_url,
               "BENCH_PAYMENTS": "1"}
        (root / "imagegate").mkdir()
        with server("bench._apps:imagegate_app", env) as imagegate_url:
            async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
                estimate = (await client.post(f"{imagegate_url}/v1/images/estimate", json=BODY)).json()
            amount = int(estimate["estimatedCost"]["amount"])
            async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
                assert (await client.post(f"{imagegate_url}/v1/images/generate", json=BODY)).status_code == 402
            rates = await interleaved_throughput({
                "challenge": ("POST", f"{imagegate_url}/v1/images/generate", BODY),
                "hello": ("POST", f"{imagegate_url}/bench/hello", BODY),
            })
            steps: dict[str, list[float]] = {}
            ours = await paid_latencies(f"{imagegate_url}/v1/images/generate", amount, imagegate=True, steps=steps)
        with server("bench._apps:sdk_middleware_app", {**env, "BENCH_PRICE": str(amount)}) as sdk_url:
            theirs = await paid_latencies(f"{sdk_url}/paid", amount, imagegate=False)

    print(f"machine: {machine()}")
    print(f"402 challenge: {rates['challenge']:.0f} req/s; hello-world: {rates['hello']:.0f} req/s; "
          f"ratio {rates['challenge'] / rates['hello']:.2f}")
    print(f"imagegate payment steps (verify + reserve + settle + headers, generation excluded): {summary(ours)}")
    print(f"x402 SDK FastAPI middleware, fixed price, same facilitator: {summary(theirs)}")
    print("imagegate server-side steps, median ms: "
          + ", ".join(f"{step} {statistics.median(values):.1f}" for step, values in steps.items()))
    raw = {"challenge_rps": rates["challenge"], "hello_rps": rates["hello"], "imagegate_ms": ours, "sdk_ms": theirs}
    await asyncio.to_thread((root / "results.json").write_text, json.dumps(raw))
    print(f"raw numbers: {root / 'results.json'}")


if __name__ == "__main__":
    asyncio.run(main())
