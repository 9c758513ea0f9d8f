"""Payments whose settlement outcome is unknown, in the metrics: a real ``imagegate serve`` behind an
http facilitator (the builtin one, served here) whose /settle answer comes after the server stopped
waiting. The transfer lands; the server answers 202 SETTLEMENT_PENDING, and its reconciler finds the
transfer on chain a moment later."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegate import devchain
from imagegate.payments.facilitator_server import create_facilitator_app
from imagegate.payments.facilitators import BuiltinFacilitator
from tests.ops.conftest import Samples, Served, base_config, metric, scrape, serve
from tests.support.payments import Terms, sign, v1_header
from tests.support.server import live_server

SMALL = {"prompt": "a small red circle", "width": 128, "height": 128}
SETTLE_ANSWER_DELAY_S = 4.0


class LateSettleAnswers:
    """Settles for real, then holds the /settle answer back (a response lost in the network)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/settle":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        await self.app(scope, receive, hold)
        await asyncio.sleep(SETTLE_ANSWER_DELAY_S)
        for message in held:
            await send(message)


@pytest.fixture(scope="module")
def late_facilitator(ops_chain: devchain.DevChain) -> Iterator[str]:
    facilitator = BuiltinFacilitator(devchain.FACILITATOR_ACCOUNT.private_key, ops_chain.rpc_url,
                                     [devchain.NETWORK_V2], confirmation_timeout_s=30)
    with live_server(LateSettleAnswers(create_facilitator_app(facilitator))) as url:
        yield url


@pytest.fixture(scope="module")
def pending_server(ops_chain: devchain.DevChain, late_facilitator: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("ops-pending")
    config = base_config(root)
    config["payments"] = {
        "mode": "network",
        "options": [{"network": "base-sepolia", "pay_to": devchain.PAY_TO_ACCOUNT.address}],
        "facilitator": {"kind": "http", "url": late_facilitator, "timeout_s": 2},
        "reconcile_rpc_url": ops_chain.rpc_url,
        "reconcile_interval_s": 1.0,
    }
    with serve(root, config) as served:
        yield served


async def test_pending_settlements_are_counted_and_reconciled(pending_server: Served) -> None:
    async with httpx.AsyncClient(base_url=pending_server.base_url, timeout=120, trust_env=False) as http:
        before = await scrape(http)
        amount = int((await http.post("/v1/images/estimate", json=SMALL)).json()["estimatedCost"]["amount"])
        terms = Terms(amount=amount)
        pending = await http.post("/v1/images/generate", json=SMALL, headers=v1_header(terms, sign(terms)))
        assert pending.status_code == 202 and pending.json()["error"] == "SETTLEMENT_PENDING", pending.text

        def delta(samples: Samples, name: str, **labels: str) -> float:
            return metric(samples, name, **labels) - metric(before, name, **labels)

        at_answer = await scrape(http)
        assert delta(at_answer, "imagegate_payments_total", outcome="pending", reason="") == 1
        assert delta(at_answer, "imagegate_settlement_seconds_count", network="base-sepolia", outcome="pending") == 1
        assert delta(at_answer, "imagegate_generations_total", model="imagegate-tiny",
                     outcome="settlement_pending") == 1

        # The reconciler (every second here) finds the transfer: the images are delivered and the
        # money is counted, once; nothing is left in the backlog after its next round.
        deadline = time.monotonic() + 90
        while True:
            samples = await scrape(http)
            if (delta(samples, "imagegate_payments_total", outcome="reconciled", reason="settled") == 1
                    and delta(samples, "imagegate_generations_total", model="imagegate-tiny", outcome="completed")):
                break
            assert time.monotonic() < deadline, "the pending settlement was never reconciled"
            await asyncio.sleep(0.2)
        # The backlog is reported at the end of each round: it empties.
        backlog = [("imagegate_reconciliation_backlog", frozenset({("state", state)}))
                   for state in ("payment_pending", "generation_pending")]
        while not all(samples.get(key) == 0 for key in backlog):
            assert time.monotonic() < deadline, f"the backlog never emptied: {[samples.get(k) for k in backlog]}"
            await asyncio.sleep(0.2)
            samples = await scrape(http)
    labels = {"model": "imagegate-tiny", "network": "base-sepolia", "asset": devchain.USDC_ADDRESS.lower()}
    assert delta(samples, "imagegate_revenue_atomic_total", **labels) == amount
    assert delta(samples, "imagegate_generations_total", model="imagegate-tiny", outcome="completed") == 1
