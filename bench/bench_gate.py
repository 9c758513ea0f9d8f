"""The payment gate against the x402 SDK's own middleware, side by side in one run (issue 12).

Servers (each its own ``uvicorn`` process on 127.0.0.1, 1 worker, uvloop + httptools):
- hello: a plain FastAPI app with a bare hello route (the yardstick for request rates);
- imagegate: its app with the benchmark-only ``bench-simulated`` model at 0 ms (plain images, no
  GPU, no CPU to speak of: the gate measured on its own) and its embedded ``imagegate-tiny``, paid
  through its builtin facilitator;
- SDK: the x402 SDK's ``PaymentMiddlewareASGI`` on a trivial handler, with the SDK's in-process
  facilitator (``x402Facilitator`` + ``FacilitatorWeb3Signer``), the same kind of facilitator.
Both settle on the same anvil chain (own gas keys), paid by the SDK's Python client
(``x402HTTPClient`` + ``EthAccountSigner``, in ``bench._payers`` client processes).

Measured:
1. 402 challenges/s ÷ hello requests/s (wrk, 32 connections, rounds taken in turn) — goal ≥ 0.8;
2. paid latency, one payer, sequential (p50/p95 of the request carrying the payment; its 402 and
   signing happen before) — goal imagegate p50 ≤ 0.5 × the SDK's;
3. paid requests/s with 8 concurrent payers in client processes, failures counted — goal ≥ 5×;
4. the same three on imagegate-tiny 128×128, 1 step, for the record;
and, on request, ``--history N`` (p50 of 100 paid requests before and after N more on the same
chain and ledger, with a fresh chain and ledger measured alongside as a control) and
``--block-time S`` (the paid figures on a chain mining a block every S seconds, like Base).

For each figure it says what bounded it, from the CPU each process used in the window.

Run: .venv/bin/python -m bench.bench_gate [--history 5000] [--block-time 2 --block-time 0.2] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from tests.support.server import free_port

from bench._load import machine, percentile
from imagegate import devchain

SIMULATED = {"prompt": "a red circle", "model": "bench-simulated", "width": 128, "height": 128, "steps": 1}
TINY = {"prompt": "a red circle", "model": "imagegate-tiny", "width": 128, "height": 128, "steps": 1}
# Gas keys: imagegate's facilitator and the SDK's each have their own (anvil accounts 0, 4-6 and 3).
IMAGEGATE_GAS_KEYS = [devchain.FACILITATOR_ACCOUNT.private_key,
                      "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
                      "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
                      "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e"]
SDK_GAS_KEY = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6"
CLIENT_PROCESSES = 4
WRK_CONNECTIONS = 32


# --- processes and their CPU --------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its threads (children not included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, steal counted as busy (another guest had the core)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


@dataclass
class Window:
    """CPU used by each named process, and by the whole machine, between ``start`` and ``stop``."""

    pids: dict[str, list[int]]
    _cpu: dict[str, float] = field(default_factory=dict)
    _machine: tuple[float, float] = (0.0, 0.0)
    _wall: float = 0.0
    share: dict[str, float] = field(default_factory=dict)  # fraction of one core, per name
    machine_busy: float = 0.0  # fraction of all cores

    def start(self) -> None:
        self._cpu = {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in self.pids.items()}
        self._machine = machine_busy()
        self._wall = time.monotonic()

    def stop(self) -> None:
        wall = time.monotonic() - self._wall
        for name, pids in self.pids.items():
            self.share[name] = (sum(cpu_seconds(pid) for pid in pids) - self._cpu[name]) / wall
        busy, total = machine_busy()
        self.machine_busy = (busy - self._machine[0]) / max(1.0, total - self._machine[1])

    def bound(self, server: str) -> str:
        parts = ", ".join(f"{name} {share:.0%}" for name, share in self.share.items())
        cores = os.cpu_count() or 1
        if self.share.get(server, 0) >= 0.85:
            verdict = f"{server} (its event loop is one core)"
        elif self.machine_busy >= 0.9:
            others = max(0.0, self.machine_busy * cores - sum(self.share.values()))
            verdict = f"the machine's {cores} shared cores (other processes {others:.0%} of a core)"
        elif self.share.get("chain", 0) >= 0.85:
            verdict = "the chain (anvil)"
        elif any(name.startswith("client") and share >= 0.85 for name, share in self.share.items()):
            verdict = "the clients"
        else:
            verdict = "waiting, not CPU (round trips to the chain and settlement)"
        return f"{verdict}; CPU of a core: {parts}; machine {self.machine_busy:.0%} busy"


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def serve(factory: str, env: dict[str, str], *, timeout_s: float = 180) -> Iterator[Server]:
    """``uvicorn --factory`` in a subprocess on a free loopback port, stopped by its PID at the end."""
    port = free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", factory, "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{factory} exited: {log.read().decode(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=2, trust_env=False).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{factory} did not start")
            time.sleep(0.1)
        yield Server(url, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


# --- request rates (wrk) -------------------------------------------------------------------------


def wrk_rate(url: str, body: dict[str, Any] | None, seconds: float, window: Window | None = None,
             expect: int | None = None, fresh_prompts: bool = False) -> float:
    """Requests/s wrk reaches against ``url`` (POST ``body``); checks the status of a sample.

    ``fresh_prompts``: every request's prompt ends with a new number, so no two bodies are the same.
    """
    if expect is not None:
        status = httpx.post(url, json=body or {}, trust_env=False, timeout=30).status_code
        if status != expect:
            raise RuntimeError(f"{url} answered {status}, expected {expect}")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                     f"wrk.body = [[{json.dumps(body or {})}]]\n")
        if fresh_prompts:
            head, tail = json.dumps(body).split('"prompt": "', 1)
            prompt, rest = tail.split('"', 1)
            fresh_body = f'[[{head}"prompt": "{prompt} ]] .. counter .. [["{rest}]]'
            script.write("counter = 0\nrequest = function()\n  counter = counter + 1\n"
                         f"  return wrk.format(nil, nil, nil, {fresh_body})\nend\n")
    try:
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        if window is not None:
            window.start()
        process = subprocess.Popen(["wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{seconds:g}s", "--latency", "-s",
                                    script.name, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = process.communicate(timeout=seconds + 60)
        if window is not None:
            window.stop()
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            window.share["wrk"] = (children.ru_utime + children.ru_stime - children_before.ru_utime
                                   - children_before.ru_stime) / seconds
    finally:
        os.unlink(script.name)
    rate = next((float(line.split()[1]) for line in out.splitlines() if line.startswith("Requests/sec")), None)
    if rate is None:
        raise RuntimeError(f"wrk failed: {out}{err}")
    return rate


# --- paid load (client processes) ----------------------------------------------------------------


@dataclass
class PaidRun:
    latencies_ms: list[float]
    statuses: list[int]
    seconds: float
    timings: list[str]
    window: Window | None = None

    @property
    def failures(self) -> int:
        return sum(status != 200 for status in self.statuses)

    @property
    def per_second(self) -> float:
        return len(self.statuses) / self.seconds

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


async def paid(url: str, body: dict[str, Any], keys: Sequence[str], count: int, *, processes: int,
               watch: dict[str, list[int]] | None = None, think_s: float = 0.0) -> PaidRun:
    """``len(keys)`` payers, ``count`` paid requests each, in ``processes`` client processes."""
    groups = [list(keys[index::processes]) for index in range(min(processes, len(keys)))]
    clients = [await asyncio.create_subprocess_exec(sys.executable, "-m", "bench._payers", stdin=subprocess.PIPE,
                                                    stdout=subprocess.PIPE, limit=2**26) for _ in groups]
    try:
        for client, group in zip(clients, groups, strict=True):
            assert client.stdin is not None
            job = {"url": url, "body": body, "keys": group, "count": count, "think_s": think_s}
            client.stdin.write((json.dumps(job) + "\n").encode())
            await client.stdin.drain()
        for client in clients:
            assert client.stdout is not None
            line = await client.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"payer process failed before its run: {line!r}")
        window = None
        if watch is not None:
            window = Window(dict(watch))
            window.start()
        for client in clients:
            assert client.stdin is not None
            client.stdin.write(b"go\n")
            await client.stdin.drain()
        results = []
        for client in clients:
            assert client.stdout is not None
            results.append(json.loads(await client.stdout.readline()))
        if window is not None:
            window.stop()
            # The clients' own accounts of their CPU (they may have exited before the window closed).
            seconds = max(r["finished"] for r in results) - min(r["started"] for r in results)
            for index, result in enumerate(results):
                window.share[f"client{index}"] = result["cpu_s"] / max(seconds, 1e-6)
    finally:
        for client in clients:
            if client.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    client.kill()
            await client.wait()
    started = min(result["started"] for result in results)
    finished = max(result["finished"] for result in results)
    return PaidRun([lat for r in results for lat in r["latencies_ms"]], [s for r in results for s in r["statuses"]],
                   finished - started, [t for r in results for t in r["timings"]], window)


async def sequential_pair(targets: dict[str, tuple[str, dict[str, Any]]], key: str, count: int,
                          rounds: int, think_s: float = 0.0) -> dict[str, PaidRun]:
    """One payer, one request at a time; the targets take turns in ``rounds`` slices (so that the
    background load of a shared machine falls on each alike)."""
    runs: dict[str, list[PaidRun]] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, (url, body) in targets.items():
            runs[name].append(await paid(url, body, [key], max(1, count // rounds), processes=1, think_s=think_s))
    return {name: PaidRun([x for r in parts for x in r.latencies_ms], [x for r in parts for x in r.statuses],
                          sum(r.seconds for r in parts), [x for r in parts for x in r.timings])
            for name, parts in runs.items()}


def step_medians(timings: list[str]) -> str:
    steps: dict[str, list[float]] = {}
    for header in timings:
        for item in filter(None, (part.strip() for part in header.split(","))):
            name, _, duration = item.partition(";dur=")
            with contextlib.suppress(ValueError):
                steps.setdefault(name, []).append(float(duration))
    return ", ".join(f"{name} {statistics.median(values):.1f}" for name, values in steps.items())


# --- one chain, three servers --------------------------------------------------------------------


@dataclass
class Setup:
    chain: devchain.DevChain
    hello: Server | None
    gate: Server
    sdk: Server
    payer_keys: list[str]
    price: int

    def watch(self, server: Server) -> dict[str, list[int]]:
        return {"server": [server.pid], "chain": [self.chain.pid]}


@contextlib.asynccontextmanager
async def setup(root: Path, *, payers: int, block_time_s: float | None = None,
                with_hello: bool = True) -> AsyncIterator[Setup]:
    async with devchain.DevChain(payer_balance=10**12, block_time_s=block_time_s) as chain:
        keys = [Account.create().key.hex() for _ in range(payers)]
        keys = [key if key.startswith("0x") else f"0x{key}" for key in keys]
        for key in keys:
            await chain.mint(Account.from_key(key).address, 10**12)
        await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
        env = {"BENCH_ROOT": str(root / "imagegate"), "BENCH_RPC_URL": chain.rpc_url,
               "BENCH_GAS_KEYS": "\n".join(IMAGEGATE_GAS_KEYS), "BENCH_SDK_GAS_KEY": SDK_GAS_KEY}
        with serve("bench._apps:gate_app", env) as gate:
            async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
                estimate = await http.post(f"{gate.url}/v1/images/estimate", json=SIMULATED)
            price = int(estimate.json()["estimatedCost"]["amount"])
            with serve("bench._apps:sdk_middleware_app", {**env, "BENCH_PRICE": str(price)}) as sdk:
                if with_hello:
                    with serve("bench._apps:hello_app", env) as hello:
                        yield Setup(chain, hello, gate, sdk, keys, price)
                else:
                    yield Setup(chain, None, gate, sdk, keys, price)


def ratio_line(name: str, ours: float, theirs: float, goal: str, met: bool) -> str:
    return f"| {name} | {ours:.1f} | {theirs:.1f} | **{ours / theirs:.2f}** | {goal} | {'met' if met else 'NOT met'} |"


async def devchain_figures(s: Setup, args: argparse.Namespace, report: list[str], raw: dict[str, Any]) -> None:
    assert s.hello is not None
    # 1. Request rates, rounds in turn.
    rates: dict[str, list[float]] = {"hello": [], "imagegate 402": [], "SDK 402": [], "imagegate-tiny 402": [],
                                     "imagegate 402, a new body each request": []}
    windows: dict[str, Window] = {}
    targets = {"hello": (f"{s.hello.url}/hello", None, 200, s.hello, False),
               "imagegate 402": (f"{s.gate.url}/v1/images/generate", SIMULATED, 402, s.gate, False),
               "SDK 402": (f"{s.sdk.url}/paid", {}, 402, s.sdk, False),
               "imagegate-tiny 402": (f"{s.gate.url}/v1/images/generate", TINY, 402, s.gate, False),
               "imagegate 402, a new body each request": (f"{s.gate.url}/v1/images/generate", SIMULATED, 402, s.gate,
                                                          True)}
    for _ in range(args.rounds):
        for name, (url, body, status, server, fresh) in targets.items():
            window = Window({"server": [server.pid]})
            rates[name].append(await asyncio.to_thread(wrk_rate, url, body, args.wrk_seconds, window, status, fresh))
            windows[name] = window
    rate = {name: statistics.median(values) for name, values in rates.items()}
    raw["rates"] = rates
    # 2. Sequential paid latency, the two servers in turn.
    sequential = await sequential_pair({"imagegate": (f"{s.gate.url}/v1/images/generate", SIMULATED),
                                        "SDK": (f"{s.sdk.url}/paid", {})},
                                       s.payer_keys[0], args.requests, args.rounds)
    # 3. 8 payers at once.
    concurrent = {
        "imagegate": await paid(f"{s.gate.url}/v1/images/generate", SIMULATED, s.payer_keys, args.per_payer,
                                processes=CLIENT_PROCESSES, watch=s.watch(s.gate)),
        "SDK": await paid(f"{s.sdk.url}/paid", {}, s.payer_keys, args.per_payer, processes=CLIENT_PROCESSES,
                          watch=s.watch(s.sdk)),
    }
    raw["sequential"] = {k: v.latencies_ms for k, v in sequential.items()}
    raw["concurrent"] = {k: {"rps": v.per_second, "failures": v.failures} for k, v in concurrent.items()}

    challenge_ratio = rate["imagegate 402"] / rate["hello"]
    latency_ratio = sequential["imagegate"].p(50) / sequential["SDK"].p(50)
    throughput_ratio = concurrent["imagegate"].per_second / concurrent["SDK"].per_second
    failures = concurrent["imagegate"].failures + sequential["imagegate"].failures
    report += [
        "### Goal ratios (instant dev chain: anvil automine, one block per transaction)",
        "",
        "| measurement | imagegate | reference | ratio | goal | |",
        "|---|---|---|---|---|---|",
        f"| 402 challenges/s ÷ bare FastAPI hello/s (wrk, {WRK_CONNECTIONS} connections, medians of "
        f"{args.rounds} rounds) | {rate['imagegate 402']:.0f} | {rate['hello']:.0f} | **{challenge_ratio:.2f}** "
        f"| ≥ 0.8 | {'met' if challenge_ratio >= 0.8 else 'NOT met'} |",
        f"| paid p50, one payer, sequential (ms; reference: SDK middleware) | {sequential['imagegate'].p(50):.1f} "
        f"| {sequential['SDK'].p(50):.1f} | **{latency_ratio:.2f}** | ≤ 0.5 | "
        f"{'met' if latency_ratio <= 0.5 else 'NOT met'} |",
        f"| paid requests/s, {len(s.payer_keys)} payers at once (reference: SDK middleware) | "
        f"{concurrent['imagegate'].per_second:.1f} | {concurrent['SDK'].per_second:.1f} | **{throughput_ratio:.2f}** "
        f"| ≥ 5, 0 failures | {'met' if throughput_ratio >= 5 and failures == 0 else 'NOT met'} |",
        "",
        "Details:",
        f"- the SDK middleware's own 402: {rate['SDK 402']:.0f}/s ({rate['SDK 402'] / rate['hello']:.2f}× hello); "
        f"imagegate's 402 for bodies it has not seen (every request a new prompt, so none is answered from "
        f"memory): {rate['imagegate 402, a new body each request']:.0f}/s "
        f"({rate['imagegate 402, a new body each request'] / rate['hello']:.2f}× hello); "
        f"rounds: " + "; ".join(f"{n} {', '.join(f'{v:.0f}' for v in vs)}" for n, vs in rates.items()),
        f"- bounds of the rates: hello: {windows['hello'].bound('server')}; imagegate 402: "
        f"{windows['imagegate 402'].bound('server')}",
        f"- paid, sequential: imagegate p50 {sequential['imagegate'].p(50):.1f} / p95 "
        f"{sequential['imagegate'].p(95):.1f} ms, SDK p50 {sequential['SDK'].p(50):.1f} / p95 "
        f"{sequential['SDK'].p(95):.1f} ms "
        f"(n={len(sequential['imagegate'].latencies_ms)} each; failures {sequential['imagegate'].failures} / "
        f"{sequential['SDK'].failures}); imagegate's Server-Timing medians (ms): "
        f"{step_medians(sequential['imagegate'].timings)}",
        f"- {len(s.payer_keys)} payers: imagegate {concurrent['imagegate'].per_second:.1f}/s "
        f"({len(concurrent['imagegate'].statuses)} requests, {concurrent['imagegate'].failures} failures, p50 "
        f"{concurrent['imagegate'].p(50):.1f} ms); bound: {_bound(concurrent['imagegate'])}",
        f"- {len(s.payer_keys)} payers: SDK {concurrent['SDK'].per_second:.1f}/s "
        f"({len(concurrent['SDK'].statuses)} requests, {concurrent['SDK'].failures} failures, p50 "
        f"{concurrent['SDK'].p(50):.1f} ms); bound: {_bound(concurrent['SDK'])}",
        "",
    ]
    # 4. imagegate-tiny, for the record (the first request loads the model).
    await paid(f"{s.gate.url}/v1/images/generate", TINY, s.payer_keys[:1], 2, processes=1)
    tiny_sequential = await paid(f"{s.gate.url}/v1/images/generate", TINY, s.payer_keys[:1],
                                 max(10, args.requests // 4), processes=1)
    tiny_concurrent = await paid(f"{s.gate.url}/v1/images/generate", TINY, s.payer_keys, max(3, args.per_payer // 5),
                                 processes=CLIENT_PROCESSES, watch=s.watch(s.gate))
    report += [
        "### For the record: imagegate-tiny, 128×128, 1 step (real rendering on the CPU)",
        "",
        f"- 402 challenges/s: {rate['imagegate-tiny 402']:.0f} ({rate['imagegate-tiny 402'] / rate['hello']:.2f}× "
        "hello)",
        f"- paid, one payer: p50 {tiny_sequential.p(50):.1f} ms, p95 {tiny_sequential.p(95):.1f} ms "
        f"(n={len(tiny_sequential.statuses)}, failures {tiny_sequential.failures}); Server-Timing medians: "
        f"{step_medians(tiny_sequential.timings)}",
        f"- paid, {len(s.payer_keys)} payers: {tiny_concurrent.per_second:.1f}/s ({len(tiny_concurrent.statuses)} "
        f"requests, {tiny_concurrent.failures} failures); bound: {_bound(tiny_concurrent)}",
        "",
    ]


def _bound(run: PaidRun) -> str:
    return run.window.bound("server") if run.window is not None else "not measured"


async def block_time_figures(root: Path, block_time_s: float, args: argparse.Namespace, report: list[str]) -> None:
    async with setup(root, payers=args.payers, block_time_s=block_time_s, with_hello=False) as s:
        count = max(6, args.requests // 10)
        # A pause of random length (up to a block) before each request: a payer that sent its next request
        # the moment the last one was confirmed would always arrive just after a block and wait a whole one.
        sequential = await sequential_pair({"imagegate": (f"{s.gate.url}/v1/images/generate", SIMULATED),
                                            "SDK": (f"{s.sdk.url}/paid", {})}, s.payer_keys[0], count, 2,
                                           think_s=block_time_s)
        per_payer = max(3, args.per_payer // 10)
        concurrent = {
            "imagegate": await paid(f"{s.gate.url}/v1/images/generate", SIMULATED, s.payer_keys, per_payer,
                                    processes=CLIENT_PROCESSES, watch=s.watch(s.gate)),
            "SDK": await paid(f"{s.sdk.url}/paid", {}, s.payer_keys, per_payer, processes=CLIENT_PROCESSES,
                              watch=s.watch(s.sdk)),
        }
    ours, theirs = sequential["imagegate"], sequential["SDK"]
    report += [
        f"### A Base-like chain: a block every {block_time_s:g} s",
        "",
        "| measurement | imagegate | SDK middleware | ratio |",
        "|---|---|---|---|",
        f"| paid p50 / p95, one payer, random arrivals (ms) | {ours.p(50):.0f} / {ours.p(95):.0f} | "
        f"{theirs.p(50):.0f} / {theirs.p(95):.0f} | {ours.p(50) / theirs.p(50):.2f} |",
        f"| paid requests/s, {len(s.payer_keys)} payers | {concurrent['imagegate'].per_second:.2f} | "
        f"{concurrent['SDK'].per_second:.2f} | {concurrent['imagegate'].per_second / concurrent['SDK'].per_second:.1f}"
        " |",
        f"| failures (sequential + concurrent) | {ours.failures + concurrent['imagegate'].failures} | "
        f"{theirs.failures + concurrent['SDK'].failures} | |",
        "",
        f"- imagegate Server-Timing medians (ms): {step_medians(ours.timings)}",
        f"- bounds: imagegate {_bound(concurrent['imagegate'])}; SDK {_bound(concurrent['SDK'])}",
        "",
    ]


PROBE_GAS_KEY = "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356"  # anvil account 7


async def chain_probe(chain: devchain.DevChain, count: int = 30) -> list[float]:
    """Milliseconds the chain takes to mine one settlement (a transferWithAuthorization through
    eth_sendRawTransactionSync from a spare gas account): the chain's share, without imagegate."""
    from tests.support.payments import Terms, sign

    from imagegate.payments import eip3009
    from imagegate.payments.rpc import JsonRpc
    from imagegate.payments.sender import TransactionSender

    rpc = JsonRpc(chain.rpc_url)
    sender = TransactionSender(rpc, [PROBE_GAS_KEY], chain_id=devchain.CHAIN_ID)
    times = []
    try:
        for _ in range(count):
            calldata = eip3009.transfer_calldata(eip3009.TransferAuthorization.from_payload(sign(Terms(1))))
            started = time.perf_counter()
            await sender.send(devchain.USDC_ADDRESS, calldata, deadline=time.monotonic() + 30,
                              give_up_at=time.time() + 300)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        await sender.aclose()
        await rpc.aclose()
    return times


def _without_settle(run: PaidRun) -> list[float]:
    """Latency minus the settle step (Server-Timing): what is left when the chain's mining is taken out."""
    result = []
    for latency, header in zip(run.latencies_ms, run.timings, strict=True):
        steps = dict(item.strip().split(";dur=") for item in header.split(",") if ";dur=" in item)
        result.append(latency - float(steps.get("settle", 0)))
    return result


async def history_figures(root: Path, total: int, args: argparse.Namespace, report: list[str]) -> None:
    """p50 of 100 paid requests before and after ``total`` more on the same chain and ledger; a fresh
    chain and ledger measured alongside the last 100 tells history apart from the machine's load, and
    a probe of the chain alone tells the chain's share apart from imagegate's."""
    sample = 100
    async with setup(root / "grown", payers=args.payers, with_hello=False) as grown:
        url = f"{grown.gate.url}/v1/images/generate"
        probe_first = await chain_probe(grown.chain)
        first = await paid(url, SIMULATED, grown.payer_keys[:1], sample, processes=1)
        done, started = 0, time.monotonic()
        batch = max(1, min(250, total // len(grown.payer_keys)))
        failures = 0
        while done < total:
            per_payer = min(batch, max(1, (total - done) // len(grown.payer_keys)))
            run = await paid(url, SIMULATED, grown.payer_keys, per_payer, processes=CLIENT_PROCESSES)
            done += len(run.statuses)
            failures += run.failures
            print(f"  history: {done}/{total} paid requests ({done / (time.monotonic() - started):.0f}/s)",
                  file=sys.stderr, flush=True)
        blocks = await grown.chain.block_number()
        wal = root / "grown" / "imagegate" / "ledger.sqlite3-wal"
        wal_mb = (await asyncio.to_thread(lambda: wal.stat().st_size if wal.exists() else 0)) / 1024**2
        probe_after = await chain_probe(grown.chain)
        async with setup(root / "fresh", payers=1, with_hello=False) as fresh:
            fresh_url = f"{fresh.gate.url}/v1/images/generate"
            lasts: list[PaidRun] = []
            controls: list[PaidRun] = []
            for _ in range(4):  # in turn, so that load changes fall on both alike
                lasts.append(await paid(url, SIMULATED, grown.payer_keys[:1], sample // 4, processes=1))
                controls.append(await paid(fresh_url, SIMULATED, fresh.payer_keys[:1], sample // 4, processes=1))
    last = PaidRun([x for r in lasts for x in r.latencies_ms], [x for r in lasts for x in r.statuses], 0,
                   [x for r in lasts for x in r.timings])
    control = PaidRun([x for r in controls for x in r.latencies_ms], [x for r in controls for x in r.statuses], 0,
                      [x for r in controls for x in r.timings])

    def row(name: str, run: PaidRun) -> str:
        return (f"| {name} | {run.p(50):.1f} | {run.p(95):.1f} | {percentile(_without_settle(run), 50):.1f} | "
                f"{step_medians(run.timings)} |")

    first_p50, last_p50 = first.p(50), last.p(50)
    own_first, own_last = percentile(_without_settle(first), 50), percentile(_without_settle(last), 50)
    report += [
        f"### Latency after {total:,} paid requests on the same dev chain and ledger",
        "",
        "| measurement | p50 (ms) | p95 (ms) | p50 without the settle step (ms) | Server-Timing medians (ms) |",
        "|---|---|---|---|---|",
        row(f"first {sample} paid requests", first),
        row(f"{sample} paid requests after {done:,} more ({blocks:,} blocks on the chain)", last),
        row(f"control: {sample} on a fresh chain and ledger, taken in turn with the row above", control),
        "",
        f"- after ÷ first: **{last_p50 / first_p50:.2f}** (goal ≤ 1.10: "
        f"{'met' if last_p50 <= 1.1 * first_p50 else 'NOT met'}); after ÷ fresh control at the same moment: "
        f"**{last_p50 / control.p(50):.2f}**; without the settle step, after ÷ first: **{own_last / own_first:.2f}**",
        f"- the chain alone (a settlement mined through eth_sendRawTransactionSync, no imagegate): p50 "
        f"{percentile(probe_first, 50):.1f} ms before, {percentile(probe_after, 50):.1f} ms after",
        f"- failures during the history: {failures}; SQLite WAL at the end: {wal_mb:.1f} MB",
        "",
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="sequential paid requests per server")
    parser.add_argument("--payers", type=int, default=8)
    parser.add_argument("--per-payer", type=int, default=50, help="paid requests per payer in the concurrent run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wrk-seconds", type=float, default=5.0)
    parser.add_argument("--history", type=int, default=0, help="paid requests between the before/after p50s")
    parser.add_argument("--block-time", type=float, action="append", default=[], help="seconds (repeatable)")
    parser.add_argument("--skip-devchain", action="store_true", help="only --history / --block-time")
    parser.add_argument("--quick", action="store_true", help="tiny counts (a smoke run, not a measurement)")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.per_payer, args.rounds, args.wrk_seconds = 12, 4, 1, 1.0
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: ./scripts/setup --tests installs it (Debian package wrk)")
    root = Path(tempfile.mkdtemp(prefix="imagegate-bench-gate-"))
    load_before = os.getloadavg()
    started = datetime.now(UTC)
    report = [f"## bench/bench_gate.py — {started:%Y-%m-%d %H:%M} UTC", "",
              f"`{' '.join(['.venv/bin/python -m bench.bench_gate', *sys.argv[1:]])}`", "",
              f"Machine: {machine()}, {platform.platform()}; load average at start "
              f"{load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}.", ""]
    raw: dict[str, Any] = {}
    try:
        if not args.skip_devchain:
            async with setup(root / "devchain", payers=args.payers) as s:
                await devchain_figures(s, args, report, raw)
        for block_time in args.block_time:
            await block_time_figures(root / f"block-{block_time:g}", block_time, args, report)
        if args.history:
            await history_figures(root / "history", args.history, args, report)
    finally:
        load_after = os.getloadavg()
        report.append(f"Load average at the end {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}; "
                      f"{(datetime.now(UTC) - started).total_seconds():.0f} s in all.")
        print("\n".join(report))
        if args.json:
            args.json.write_text(json.dumps(raw))
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
