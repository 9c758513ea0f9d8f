"""The soak: many x402 payers against one real ``imagegate serve`` on the embedded defaults, with the
server SIGKILLed at chosen moments and restarted each time; then the books are audited.

Shared by ``tests/ops_durability/test_soak.py`` (short) and ``bench/bench_soak.py`` (long).

- The server runs on the embedded defaults: its own dev chain (anvil), SQLite, local files, and the
  simulated GPU (renders of ``batch_ms``). Each run of the server may carry one fault
  (``imagegate.faults``): it SIGKILLs itself the Nth time it reaches a point of the request flow;
  the harness restarts it at once with the next run's fault, and so on.
- Payers run in several client processes (``tests.support.soak_payer``), each paying with the x402
  SDK and resending its payment until it has its images.
- The audit: every request has its images (or was refused without moving money); on chain
  Σ transfers to payTo == ledger revenue == Σ prices of delivered generations, per payer too, with
  one transfer per delivered request; no reverted transaction; nothing left staged, running or
  settling once reconciliation has run; the dev chain is the same anvil from the first start to the
  last stop (the restarted servers reattached to it), and no anvil is left after the clean stop.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account

from imagegate import devchain
from tests.support.serve import ServeProcess, embedded_config

REPO = Path(__file__).resolve().parents[2]
PAY_TO = devchain.PAY_TO_ACCOUNT.address
FUNDING = 100 * 10**devchain.TOKEN_DECIMALS  # 100 test USDC per payer
# What a crash at each fault point leaves in the ledger (checked before the restart): proof that the
# crash landed at that moment of the request flow.
RESIDUE = {
    "payment_reserved": "SELECT count(*) FROM payments WHERE status = 'reserved' AND generation_id IS NULL",
    "render_step": "SELECT count(*) FROM generations WHERE status = 'running'",
    # The transfer is on chain; the ledger still says settling (its success is recorded with the delivery).
    "settled": "SELECT count(*) FROM payments p JOIN generations g ON g.id = p.generation_id "
               "WHERE p.status IN ('settling', 'settled') AND g.status = 'settling'",
}


@dataclass
class SoakPlan:
    payers: int = 16
    client_processes: int = 4
    requests_per_payer: int = 6
    # One entry per server run that ends in a crash: "point=N" (see imagegate.faults).
    faults: list[str] = field(default_factory=lambda: ["payment_reserved=12", "render_step=40", "settled=16"])
    # The simulated GPU: a render takes batch_ms + image_ms per image, up to max_concurrency at once.
    batch_ms: float = 500
    image_ms: float = 100
    max_concurrency: int = 8
    stale_after_s: float = 6
    reconcile_interval_s: float = 1
    settle_timeout_s: float = 240


@dataclass
class Crash:
    fault: str
    at: float  # wall clock (time.time) when the harness saw the process gone
    ran_s: float
    residue: int
    restart_s: float = 0.0
    recovered_s: float | None = None  # crash -> the last request it interrupted has its images


@dataclass
class SoakReport:
    requests: list[dict[str, Any]]
    crashes: list[Crash]
    duration_s: float
    problems: list[str]
    figures: dict[str, Any]


async def run_soak(root: Path, plan: SoakPlan) -> SoakReport:
    """Runs the whole soak under ``root``; returns what happened and every problem the audit found."""
    serve = ServeProcess(root / "server", embedded_config(
        root / "server", batch_ms=plan.batch_ms, image_ms=plan.image_ms, max_concurrency=plan.max_concurrency,
        stale_after_s=plan.stale_after_s,
        reconcile_interval_s=plan.reconcile_interval_s,
        extra="in_flight_wait_s = 60\n"))
    clients: list[asyncio.subprocess.Process] = []
    try:
        return await _run(serve, root, plan, clients)
    finally:
        for client in clients:
            if client.returncode is None:
                client.kill()
                await client.wait()
        serve.cleanup()


async def _run(serve: ServeProcess, root: Path, plan: SoakPlan,
               clients: list[asyncio.subprocess.Process]) -> SoakReport:
    problems: list[str] = []
    faults = list(plan.faults)
    await serve.start_ready(faults=faults[0] if faults else None)
    first_anvil = serve.chain_record()
    assert first_anvil is not None
    chain = await serve.chain()
    try:
        keys = [Account.create().key.hex() for _ in range(plan.payers)]
        keys = [key if key.startswith("0x") else "0x" + key for key in keys]
        payers = [Account.from_key(key).address for key in keys]
        for address in payers:
            await chain.mint(address, FUNDING)
        start_block = await chain.block_number() + 1
    finally:
        await chain.stop()

    # The payers, spread over the client processes.
    results_dir = root / "clients"
    results_dir.mkdir(parents=True, exist_ok=True)
    per_process = [keys[index::plan.client_processes] for index in range(plan.client_processes)]
    started = time.time()
    for index, chunk in enumerate(per_process):
        key_file = results_dir / f"keys-{index}.txt"
        key_file.write_text("\n".join(chunk))
        clients.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.soak_payer", "--url", serve.url, "--keys", str(key_file),
            "--requests", str(plan.requests_per_payer), "--out", str(results_dir / f"results-{index}.jsonl"),
            "--seed", str(index), cwd=str(REPO)))

    # Supervise: restart the server whenever its fault kills it, until every client is done.
    crashes: list[Crash] = []
    run_started = time.monotonic()
    while any(client.returncode is None for client in clients):
        if not serve.running():
            fault = faults.pop(0) if faults else "none"
            crashed_at = time.time()
            residue_query = RESIDUE.get(fault.partition("=")[0])
            residue = serve.ledger_rows(residue_query)[0][0] if residue_query else 0
            crash = Crash(fault, crashed_at, time.monotonic() - run_started, residue)
            if serve.returncode != -9:
                problems.append(f"the server exited with {serve.returncode}, not by its fault ({fault}):\n"
                                f"{serve.log_tail()}")
            crash.restart_s = await serve.start_ready(faults=faults[0] if faults else None)
            run_started = time.monotonic()
            crashes.append(crash)
        await asyncio.sleep(0.05)
    duration = time.time() - started
    for index, client in enumerate(clients):
        if client.returncode != 0:
            problems.append(f"client process {index} exited with {client.returncode}")
    if faults:
        problems.append(f"faults never reached (too few requests?): {faults}")
    for crash in crashes:
        if crash.residue < 1:
            problems.append(f"the crash at {crash.fault} left no trace of that moment in the ledger")

    requests = [json.loads(line) for path in sorted(results_dir.glob("results-*.jsonl"))
                for line in path.read_text().splitlines() if line.strip()]
    for crash in crashes:
        spanned = [r for r in requests if r["started"] <= crash.at <= r["finished"] and r.get("status") == 200]
        if spanned:
            crash.recovered_s = max(r["finished"] for r in spanned) - crash.at

    await _wait_reconciled(serve, plan, problems)
    await _audit(serve, plan, requests, payers, start_block, first_anvil, problems)
    return SoakReport(requests, crashes, duration, problems, _figures(requests, crashes, duration))


async def _wait_reconciled(serve: ServeProcess, plan: SoakPlan, problems: list[str]) -> None:
    """Until reconciliation has finished everything (nothing staged, running, settling or pending)."""
    unfinished = ("SELECT count(*) FROM generations WHERE status IN ('running', 'settling', 'settlement_pending')"
                  " UNION ALL SELECT count(*) FROM payments WHERE status IN ('reserved', 'settling', 'pending')")
    deadline = time.monotonic() + plan.stale_after_s * 4 + 60
    while time.monotonic() < deadline:
        open_rows = sum(row[0] for row in serve.ledger_rows(unfinished))
        staged = list(serve.staging_dir.iterdir()) if serve.staging_dir.exists() else []
        if open_rows == 0 and not staged:
            return
        await asyncio.sleep(0.5)
    problems.append(f"after reconciliation: {open_rows} unfinished ledger rows, {len(staged)} staged files left")


async def _audit(serve: ServeProcess, plan: SoakPlan, requests: list[dict[str, Any]], payers: list[str],
                 start_block: int, first_anvil: devchain.AnvilRecord, problems: list[str]) -> None:
    expected = plan.payers * plan.requests_per_payer
    if len(requests) != expected:
        problems.append(f"{len(requests)} requests reported, {expected} made")
    delivered = [r for r in requests if r.get("status") == 200]
    refused = [r for r in requests if r.get("status") != 200]
    for request in refused:
        problems.append(f"no images for a request of {request['payer']}: {request.get('status')} "
                        f"{request.get('error', '')[:200]} (answers: {request['answers'][-5:]})")
    for request in delivered:
        if request["charged"] != request["amount"]:
            problems.append(f"charged {request['charged']} for a request priced {request['amount']}")

    anvil = serve.chain_record()
    if anvil != first_anvil or anvil is None or not anvil.alive():
        problems.append(f"the dev chain changed across restarts: {first_anvil} then {anvil}")
    chain = await serve.chain()
    try:
        transfers = [t for t in await chain.token_transfers(from_block=start_block) if t.recipient == PAY_TO]
        transactions = await chain.transactions_to(devchain.USDC_ADDRESS, from_block=start_block)
    finally:
        await chain.stop()
    reverted = [t.hash for t in transactions if t.status != 1]
    if reverted:
        problems.append(f"{len(reverted)} reverted transactions: {reverted[:5]}")
    on_chain = sum(t.value for t in transfers)
    prices = sum(r["amount"] for r in delivered)
    revenue = serve.ledger_rows("SELECT coalesce(sum(charged_amount), 0) FROM generations "
                                "WHERE status = 'completed'")[0][0]
    if not on_chain == revenue == prices:
        problems.append(f"the books do not balance: on chain {on_chain}, ledger revenue {revenue}, "
                        f"delivered prices {prices}")
    if len(transfers) != len(delivered):
        problems.append(f"{len(transfers)} transfers for {len(delivered)} delivered requests")
    paid_by: Counter[str] = Counter()
    for transfer in transfers:
        paid_by[transfer.sender.lower()] += transfer.value
    owed_by: Counter[str] = Counter()
    for request in delivered:
        owed_by[request["payer"].lower()] += request["amount"]
    for address in payers:
        if paid_by[address.lower()] != owed_by[address.lower()]:
            problems.append(f"payer {address} paid {paid_by[address.lower()]} for {owed_by[address.lower()]} "
                            "of delivered images")
    transactions_of = {r.get("transaction") for r in delivered}
    if len(transactions_of) != len(delivered):
        problems.append("two delivered requests share one settlement transaction")

    # The clean stop: drained, and the dev chain stopped with it (no orphan).
    code = await serve.stop()
    if code not in (0, -15):
        problems.append(f"the final clean stop exited with {code}")
    if first_anvil.alive():
        problems.append(f"anvil {first_anvil.pid} still runs after the server's clean stop")


def _figures(requests: list[dict[str, Any]], crashes: list[Crash], duration: float) -> dict[str, Any]:
    delivered = [r for r in requests if r.get("status") == 200]
    clean = sorted(r["finished"] - r["started"] for r in delivered if r["interruptions"] == 0
                   and not any(a.startswith("503") or a.startswith("202") for a in r["answers"]))
    interrupted = [r for r in delivered if r["interruptions"] > 0]
    answers: defaultdict[str, int] = defaultdict(int)
    for request in requests:
        for answer in request["answers"]:
            answers[answer] += 1

    def percentile(values: list[float], share: float) -> float:
        return values[min(len(values) - 1, int(share * len(values)))] if values else float("nan")

    return {
        "requests": len(requests),
        "delivered": len(delivered),
        "images": sum(len(r["images"]) for r in delivered),
        "paid_requests_per_s": len(delivered) / duration if duration else 0.0,
        "duration_s": duration,
        "latency_p50_s": statistics.median(clean) if clean else float("nan"),
        "latency_p95_s": percentile(clean, 0.95),
        "interrupted_requests": len(interrupted),
        "interruptions": sum(r["interruptions"] for r in delivered),
        "answers": dict(answers),
        "crashes": [{"fault": c.fault, "after_s": round(c.ran_s, 1), "residue": c.residue,
                     "restart_s": round(c.restart_s, 1),
                     "recovered_s": None if c.recovered_s is None else round(c.recovered_s, 1)} for c in crashes],
    }
