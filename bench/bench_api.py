"""Core API costs, measured side by side in one run.

1. Requests/s of the 400 path (a body that fails validation) and of POST /v1/images/estimate,
   against a hello-world POST route of the same app (same server process, same load generator).
2. The overhead of POST /v1/images/generate over calling the same pipeline directly with the
   same arguments, at 512x512 on the tiny FLUX pipeline: the ratio of median latencies.

Run: .venv/bin/python -m bench.bench_api
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench._load import interleaved_throughput, machine, server, summary
from imagegate.backends.base import GenerationJob
from imagegate.backends.diffusers import DiffusersBackend
from imagegate.catalog import build_catalog
from imagegate.config import load_settings
from imagegate.tiny_pipelines import build_tiny_flux
from imagegate.validation import parse_image_request

RUNS = 15
INVALID = {"prompt": "a cat", "width": 100}
ESTIMATE = {"model": "flux-schnell", "width": 1024, "height": 1024, "numberResults": 1}
GENERATE = {"prompt": "a small red circle on a blue background", "width": 512, "height": 512, "seed": 3}


async def http_latencies(url: str) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
        for index in range(RUNS + 2):
            started = time.perf_counter()
            response = await client.post(f"{url}/v1/images/generate", json=GENERATE)
            assert response.status_code == 200, response.text
            if index >= 2:
                latencies.append((time.perf_counter() - started) * 1000)
    return latencies


async def direct_latencies(tiny: Path) -> list[float]:
    settings = load_settings(diffusers={"cpu_threads": 1, "allow_downloads": False},
                             catalog={"default_model": "flux-schnell"},
                             models={"flux-schnell": {"source": str(tiny), "requires_cuda": False, "dtype": "float32",
                                                      "memory_gb": 0.05}})
    catalog = build_catalog(settings)
    spec = catalog["flux-schnell"]
    request = parse_image_request(GENERATE, catalog, require_prompt=True)
    backend = DiffusersBackend(settings)
    latencies = []
    try:
        torch.set_num_threads(1)
        for index in range(RUNS + 2):
            pipeline, calls = await backend.pipeline_calls(GenerationJob.from_request(spec, request, (3,)))
            started = time.perf_counter()
            for kwargs in calls:
                pipeline(**kwargs)
            if index >= 2:
                latencies.append((time.perf_counter() - started) * 1000)
    finally:
        await backend.aclose()
    return latencies


async def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="imagegate-bench-"))
    tiny = build_tiny_flux(root / "tiny-flux")
    env = {"BENCH_ROOT": str(root / "data"), "BENCH_TINY_FLUX": str(tiny), "BENCH_THREADS": "1"}
    with server("bench._apps:imagegate_app", env) as url:
        async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
            assert (await client.post(f"{url}/v1/images/generate", json=INVALID)).status_code == 400
            assert (await client.post(f"{url}/v1/images/estimate", json=ESTIMATE)).status_code == 200
        rates = await interleaved_throughput({
            "hello-world POST": ("POST", f"{url}/bench/hello", {"prompt": "x"}),
            "400 path": ("POST", f"{url}/v1/images/generate", INVALID),
            "estimate": ("POST", f"{url}/v1/images/estimate", ESTIMATE),
        })
        served = await http_latencies(url)
    direct = await direct_latencies(tiny)

    print(f"machine: {machine()}; server: 1 uvicorn worker; load: 16 connections from one Python process")
    hello = rates["hello-world POST"]
    for name, rate in rates.items():
        print(f"{name + ':':18s} {rate:.0f} req/s (ratio to hello-world {rate / hello:.2f})")
    print(f"generate 512x512 over HTTP: {summary(served)}")
    print(f"same pipeline, direct call:  {summary(direct)}")
    ratio = statistics.median(served) / statistics.median(direct)
    print(f"overhead ratio (median HTTP / median direct): {ratio:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
