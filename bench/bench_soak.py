"""Soak with faults (long): at least 1,000 paid requests by 16 x402 payers against one real
``imagegate serve`` on the embedded defaults, the server SIGKILLed at chosen moments and restarted.

    .venv/bin/python -m bench.bench_soak [--requests-per-payer 64] [--crashes 6] [--out report.json]

The harness (``tests/support/soak.py``) is the one ``tests/ops_durability/test_soak.py`` runs short.
Crashes cycle through the three moments (after a payment is reserved, mid-generation, between
settlement and response), spread over the run. The audit must find no problem; the figures are
throughput (paid requests per second, crashes and recoveries included), latency of uninterrupted
requests (p50/p95), and per crash the restart time and the recovery time (crash to the moment the
last request it interrupted had its images). A reference run with the same load and no crashes
follows at once, for what the crashes cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.soak import SoakPlan, run_soak

from bench._load import machine

POINTS = ("payment_reserved", "render_step", "settled")


def spread_faults(crashes: int, total_requests: int) -> list[str]:
    """``crashes`` faults cycling through the points, one per server run, spread over the requests."""
    per_run = max(2, total_requests // (crashes + 1))
    faults = []
    for index in range(crashes):
        point = POINTS[index % len(POINTS)]
        # render_step counts denoising steps (4 per simulated render), the others count requests.
        faults.append(f"{point}={per_run * 4 if point == 'render_step' else per_run}")
    return faults


async def soak(plan: SoakPlan) -> dict[str, Any]:
    """One soak run, with the load average around it; its directory is kept only if it found problems."""
    load_before = os.getloadavg()
    started = time.time()
    root = Path(tempfile.mkdtemp(prefix="imagegate-soak-"))
    report = await run_soak(root, plan)
    if report.problems:
        print(f"kept for inspection: {root} (server log, ledger, client results)")
    else:
        shutil.rmtree(root)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "plan": {"payers": plan.payers, "client_processes": plan.client_processes,
                 "requests_per_payer": plan.requests_per_payer, "faults": plan.faults, "batch_ms": plan.batch_ms,
                 "image_ms": plan.image_ms, "max_concurrency": plan.max_concurrency,
                 "stale_after_s": plan.stale_after_s},
        "figures": report.figures,
        "problems": report.problems,
        "requests": report.requests,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payers", type=int, default=16)
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--requests-per-payer", type=int, default=64)
    parser.add_argument("--crashes", type=int, default=6)
    parser.add_argument("--batch-ms", type=float, default=500)
    parser.add_argument("--no-reference", action="store_true", help="skip the run without crashes")
    parser.add_argument("--out", type=Path, default=None, help="write the full reports (JSON) here")
    args = parser.parse_args()
    total = args.payers * args.requests_per_payer

    def plan(crashes: int) -> SoakPlan:
        return SoakPlan(payers=args.payers, client_processes=args.client_processes,
                        requests_per_payer=args.requests_per_payer, faults=spread_faults(crashes, total),
                        batch_ms=args.batch_ms)

    runs = {"crashes": await soak(plan(args.crashes))}
    if not args.no_reference:
        # The same load without faults, right after: what the crashes cost.
        runs["reference"] = await soak(plan(0))
    summary: dict[str, Any] = {"machine": machine()}
    for name, run in runs.items():
        summary[name] = {key: value for key, value in run.items() if key != "requests"}
    if "reference" in runs:
        with_crashes = runs["crashes"]["figures"]["paid_requests_per_s"]
        without = runs["reference"]["figures"]["paid_requests_per_s"]
        summary["throughput_ratio_crashes_vs_reference"] = round(with_crashes / without, 3) if without else None
    print(json.dumps(summary, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps({"machine": machine(), **runs}, indent=1))
    problems = sum(len(run["problems"]) for run in runs.values())
    if problems:
        raise SystemExit(f"{problems} problem(s) found")


if __name__ == "__main__":
    asyncio.run(main())
