"""What the operations layers cost per request: request ids + metrics + access lines (``RequestObserver``),
the rate limiter and the trusted-proxy rewrite, measured with wrk on a hello route and on the 402 path.

`.venv/bin/python -m bench.bench_ops` starts four servers of the same app side by side (one uvicorn
worker each, the dev chain for the 402) and interleaves wrk rounds over them:

- bare: none of the operations layers (the flow's own metric calls stay: they are not middleware);
- bare+uvicorn-log: the same with uvicorn's own access log, what ``imagegate serve`` wrote before;
- ops: observer, limiter (every client limited, at a rate never reached: the bucket arithmetic runs)
  and proxy headers, access lines off;
- ops+text / ops+json: the same with one access line per request, text or JSON, written to a file.

Needs ``wrk`` (Debian package; ``scripts/setup --tests`` installs it).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from tests.support.server import free_port

from bench._load import machine
from imagegate import devchain, logs
from imagegate.app import app_from_settings
from imagegate.config import load_settings

VARIANTS = ("bare", "bare+uvicorn-log", "ops", "ops+text", "ops+json")
ROUNDS = 5
SECONDS = 3
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CONNECTIONS = 16
CHALLENGE_BODY = '{"prompt": "a red fox in the snow", "width": 512, "height": 512}'


def bench_app() -> FastAPI:
    """The app of one bench server (uvicorn --factory), shaped by BENCH_VARIANT."""
    variant = os.environ["BENCH_VARIANT"]
    root = Path(os.environ["BENCH_ROOT"]) / variant
    key_file = root / "facilitator.key"
    root.mkdir(parents=True, exist_ok=True)
    key_file.write_text(devchain.FACILITATOR_ACCOUNT.private_key)
    unlimited = {"rate": 1e9, "burst": 1_000_000_000}
    settings = load_settings(
        data_dir=root,
        storage={"directory": str(root / "images")},
        diffusers={"cpu_threads": 1, "allow_downloads": False},
        catalog={"default_model": "imagegate-tiny"},
        payments={"mode": "network",
                  "options": [{"network": "base-sepolia", "pay_to": devchain.PAY_TO_ACCOUNT.address}],
                  "facilitator": {"kind": "builtin", "rpc_url": os.environ["BENCH_RPC_URL"],
                                  "private_key_file": str(key_file)}},
        logging={"format": "json" if variant == "ops+json" else "text",
                 "access_log": variant in ("ops+text", "ops+json")},
        limits={"exempt_clients": [], **{name: unlimited for name in
                                         ("challenge", "estimate", "models", "images", "manifest")}},
    )
    if variant != "bare+uvicorn-log":
        logs.configure(settings.logging.format, "info")
    app = app_from_settings(settings)
    if variant.startswith("bare"):
        app._outer_layers = lambda inner: inner  # type: ignore[attr-defined]
        app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ != "RateLimiter"]

    @app.get("/bench/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    return app


@dataclass
class Server:
    variant: str
    url: str
    process: subprocess.Popen[bytes]


def start(variant: str, root: Path, rpc_url: str, stack: ExitStack) -> Server:
    port = free_port()
    log = (root / f"{variant}.log").open("wb")
    stack.callback(log.close)
    access_log = "--access-log" if variant == "bare+uvicorn-log" else "--no-access-log"
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.bench_ops:bench_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port), access_log, "--no-proxy-headers", "--log-level", "info"],
        env={**os.environ, "BENCH_VARIANT": variant, "BENCH_ROOT": str(root), "BENCH_RPC_URL": rpc_url,
             "HF_HUB_OFFLINE": "1"},
        stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])

    def stop() -> None:
        process.terminate()
        process.wait(timeout=30)

    stack.callback(stop)
    return Server(variant, f"http://127.0.0.1:{port}", process)


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            # The first 402 loads the catalog's availability: warm it before measuring.
            response = httpx.post(f"{server.url}/v1/images/generate", content=CHALLENGE_BODY, timeout=60,
                                  headers={"Content-Type": "application/json"})
        except httpx.TransportError:
            time.sleep(0.3)
            continue
        if response.status_code != 402:
            raise RuntimeError(f"{server.variant}: the 402 path answered {response.status_code}: {response.text}")
        return
    raise TimeoutError(f"{server.variant} did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the server process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Cell:
    requests_per_s: float
    cpu_us_per_request: float


def wrk(server: Server, path: str, script: Path | None) -> Cell:
    """One wrk run; throughput is bounded by the shared cores, CPU time per request is the server's cost."""
    command = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{SECONDS}s", f"{server.url}{path}"]
    if script is not None:
        command[1:1] = ["-s", str(script)]
    cpu_before = cpu_seconds(server.process.pid)
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(server.process.pid) - cpu_before
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    count = re.search(r"(\d+) requests in", output)
    assert rate is not None and count is not None, output
    if script is None:
        assert errors is None, output  # the hello route must answer 200 every time
    return Cell(float(rate.group(1)), cpu / int(count.group(1)) * 1e6)


async def main() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk (scripts/setup --tests does it)")
    results: dict[tuple[str, str], list[Cell]] = {}
    with tempfile.TemporaryDirectory(prefix="imagegate-bench-ops-") as temp, ExitStack() as stack:
        root = Path(temp)
        script = root / "challenge.lua"
        script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                          f"wrk.body = '{CHALLENGE_BODY}'\n")
        async with devchain.DevChain() as chain:
            servers = [start(variant, root, chain.rpc_url, stack) for variant in VARIANTS]
            for server in servers:
                wait_ready(server)
            load_before = os.getloadavg()
            for _ in range(ROUNDS):
                for server in servers:
                    results.setdefault((server.variant, "hello"), []).append(wrk(server, "/bench/hello", None))
                    results.setdefault((server.variant, "402"), []).append(
                        wrk(server, "/v1/images/generate", script))
            load_after = os.getloadavg()
            log_sizes = {variant: (root / f"{variant}.log").stat().st_size for variant in VARIANTS}
    report(results, load_before, load_after, log_sizes)


def report(results: dict[tuple[str, str], list[Cell]], load_before: Any, load_after: Any,
           log_sizes: dict[str, int]) -> None:
    rate = {key: statistics.median(cell.requests_per_s for cell in cells) for key, cells in results.items()}
    cost = {key: statistics.median(cell.cpu_us_per_request for cell in cells) for key, cells in results.items()}
    print(f"# bench_ops — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}; wrk -t1 -c{CONNECTIONS}, "
          f"{ROUNDS} interleaved rounds of {SECONDS} s per cell (medians)")
    print("| stack | hello req/s | hello CPU µs/req | 402 req/s | 402 CPU µs/req | added CPU µs/req (hello, 402) "
          "| 402 / hello req/s | log bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in VARIANTS:
        hello, challenge = (variant, "hello"), (variant, "402")
        added = (cost[hello] - cost[("bare", "hello")], cost[challenge] - cost[("bare", "402")])
        print(f"| {variant} | {rate[hello]:,.0f} | {cost[hello]:,.0f} | {rate[challenge]:,.0f} "
              f"| {cost[challenge]:,.0f} | {added[0]:+,.0f}, {added[1]:+,.0f} | {rate[challenge] / rate[hello]:.2f} "
              f"| {log_sizes[variant]:,} |")
    for key, cells in sorted(results.items()):
        print(f"  {key[0]:9} {key[1]:5} " + " ".join(f"{c.requests_per_s:,.0f}/{c.cpu_us_per_request:,.0f}µs"
                                                   for c in cells))


if __name__ == "__main__":
    asyncio.run(main())
