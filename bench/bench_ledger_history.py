"""Whether the ledger's cost per paid request grows with its history (issue 12, point 3), with no chain
and no server in the way: the four transactions of a paid request on the embedded SQLite ledger (reserve;
start the generation and bind the payment; mark both settling; record the settlement and the delivery),
timed in process, median of ``--sample`` flows before and after ``--history`` more.

`.venv/bin/python -m bench.bench_ledger_history [--history 5000]`
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from imagegate.ledger import GenerationStatus, PaymentRecord, PaymentStatus, SqlLedger

# Sizes like a real paid request's rows: the stored x402 payload (signature and authorization) and the request.
PAYLOAD = {"x402Version": 2, "signature": "0x" + "ab" * 65, "authorization": {"from": "0x" + "11" * 20,
                                                                              "nonce": "0x" + "22" * 32},
           "accepted": {"scheme": "exact", "extra": "x" * 400}}
REQUEST = {"prompt": "a red circle on a white background " * 5, "width": 512, "height": 512}
STEPS = ("reserve + start", "settling", "settled + completed")


def _payment(key: str) -> PaymentRecord:
    return PaymentRecord(key=key, status=PaymentStatus.RESERVED, network="eip155:84532", payer="0x" + "11" * 20,
                         nonce="0x" + secrets.token_hex(32), pay_to="0x" + "33" * 20, asset="0x" + "44" * 20,
                         amount=16, valid_before=2**40, generation_id=None, transaction=None, payload=PAYLOAD,
                         error=None)


async def paid_flow(ledger: SqlLedger) -> tuple[float, float, float]:
    """The ledger's part of one paid request, as ``service`` and the x402 gate call it: ms per step."""
    key, generation_id = f"eip155:84532:{secrets.token_hex(20)}:{secrets.token_hex(32)}", uuid.uuid4().hex
    started = time.perf_counter()
    assert await ledger.reserve_payment(_payment(key)) is None
    async with ledger.atomic():
        await ledger.start_generation(generation_id, "bench-simulated", REQUEST, 16, key)
        await ledger.update_payment(key, PaymentStatus.RESERVED, generation_id=generation_id,
                                    expected=[PaymentStatus.RESERVED])
    reserved = time.perf_counter()
    async with ledger.atomic():
        await ledger.update_generation(generation_id, GenerationStatus.SETTLING,
                                       images=[{"uuid": str(uuid.uuid4()), "format": "png", "seed": 1}])
        await ledger.update_payment(key, PaymentStatus.SETTLING, expected=[PaymentStatus.RESERVED],
                                    for_generation=generation_id)
    settling = time.perf_counter()
    async with ledger.claim_generation(generation_id, [GenerationStatus.SETTLING]) as claim:
        assert claim is not None
        await ledger.update_payment(key, PaymentStatus.SETTLED, transaction="0x" + secrets.token_hex(32),
                                    expected=[PaymentStatus.SETTLING])
        await claim.update(GenerationStatus.COMPLETED, receipt={"transaction": "0x"}, charged_amount=16)
    done = time.perf_counter()
    return (reserved - started) * 1e3, (settling - reserved) * 1e3, (done - settling) * 1e3


def _medians(flows: list[tuple[float, float, float]]) -> list[float]:
    return [statistics.median(step) for step in zip(*flows, strict=True)] + [
        statistics.median(sum(flow) for flow in flows)]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=int, default=5000)
    parser.add_argument("--sample", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imagegate-bench-ledger-") as root:
        ledger = SqlLedger(f"sqlite+aiosqlite:///{Path(root) / 'ledger.sqlite3'}")
        await ledger.start()
        try:
            first = [await paid_flow(ledger) for _ in range(args.sample)]
            for _ in range(args.history):
                await paid_flow(ledger)
            after = [await paid_flow(ledger) for _ in range(args.sample)]
        finally:
            await ledger.aclose()
    print(f"| flows | {' | '.join(STEPS)} | all (ms, medians of {args.sample}) |")
    print("|---|---|---|---|---|")
    for name, flows in ((f"first {args.sample}", first), (f"after {args.history:,} more", after)):
        print(f"| {name} | {' | '.join(f'{value:.3f}' for value in _medians(flows))} |")
    print(f"\nafter ÷ first: {_medians(after)[-1] / _medians(first)[-1]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
