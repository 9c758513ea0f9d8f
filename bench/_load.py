"""Shared bench tooling: servers in subprocesses on 127.0.0.1, a bounded async load generator."""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from tests.support.server import free_port, wait_answering


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


@contextmanager
def server(factory: str, env: dict[str, str], *, timeout_s: float = 180) -> Iterator[str]:
    """``uvicorn --factory`` in a subprocess (its own cores, as in production); yields the base URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", factory, "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"

    def stderr() -> str:
        # Only once it has exited: reading a live process's pipe would wait for its end.
        return process.stderr.read().decode() if process.stderr and process.poll() is not None else ""

    try:
        wait_answering(f"{url}/healthz", process, timeout_s=timeout_s, exited=stderr)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


@dataclass(frozen=True)
class Throughput:
    requests: int
    seconds: float
    statuses: dict[int, int]

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


async def throughput(url: str, method: str, *, json: Any = None, headers: dict[str, str] | None = None,
                     concurrency: int = 16, duration_s: float = 5.0, warmup_s: float = 1.0) -> Throughput:
    """Requests/s with ``concurrency`` connections for ``duration_s`` (bounded in count and time)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30, trust_env=False) as client:
        statuses: dict[int, int] = {}
        count = 0

        async def worker(stop_at: float, record: bool) -> None:
            nonlocal count
            while time.perf_counter() < stop_at:
                response = await client.request(method, url, json=json, headers=headers)
                if record:
                    count += 1
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        await asyncio.gather(*(worker(time.perf_counter() + warmup_s, False) for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + duration_s, True) for _ in range(concurrency)))
        return Throughput(count, time.perf_counter() - start, statuses)


async def interleaved_throughput(targets: dict[str, tuple[str, str, Any]], *, rounds: int = 5,
                                 duration_s: float = 1.5) -> dict[str, float]:
    """Median requests/s per target over ``rounds`` short rounds taken in turn.

    Interleaving keeps ratios honest on a shared machine: background load hits every target alike.
    """
    samples: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, (method, url, body) in targets.items():
            result = await throughput(url, method, json=body, duration_s=duration_s, warmup_s=0.3)
            samples[name].append(result.per_second)
    return {name: statistics.median(values) for name, values in samples.items()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> str:
    return (f"p50 {percentile(values, 50):.1f} ms, p95 {percentile(values, 95):.1f} ms, "
            f"mean {statistics.fmean(values):.1f} ms (n={len(values)})")
