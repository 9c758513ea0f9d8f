"""Soak with faults (short): 16 x402 payers in 4 processes against a real ``imagegate serve`` on the
embedded defaults, the server SIGKILLed after a payment is reserved, mid-generation and between
settlement and response, restarted each time; every interrupted client resends its payment.

The long version (over 1,000 paid requests) is ``bench/bench_soak.py``; the harness is shared.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.soak import SoakPlan, run_soak


@pytest.mark.slow
async def test_crashes_lose_no_paid_work_and_the_books_balance(tmp_path: Path) -> None:
    plan = SoakPlan(payers=16, client_processes=4, requests_per_payer=5,
                    faults=["payment_reserved=10", "render_step=30", "settled=10"])
    report = await run_soak(tmp_path, plan)
    assert report.problems == [], "\n".join(report.problems)
    # Every crash happened where it was aimed, and interrupted someone who then got their images.
    assert [crash.fault.partition("=")[0] for crash in report.crashes] == ["payment_reserved", "render_step",
                                                                          "settled"]
    assert all(crash.residue >= 1 and crash.recovered_s is not None for crash in report.crashes)
    assert report.figures["delivered"] == 16 * 5
    assert report.figures["interrupted_requests"] >= 3
