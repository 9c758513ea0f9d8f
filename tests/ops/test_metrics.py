"""``GET /metrics`` of a real paid server: every family the operator needs, moved by real traffic.

Counters are compared before and after the traffic of each test (the server is shared by the package).
"""

from __future__ import annotations

import asyncio
import time

import httpx

from imagegate import devchain
from tests.ops.conftest import SLOW_RENDER_MS, Samples, Served, client_ip, metric, scrape
from tests.support.payments import Terms, sign, v1_header

PAYER = devchain.PAYER_ACCOUNT
SLOW = {"prompt": "a slow render", "model": "bench-simulated", "width": 512, "height": 512}


async def wait_for(http: httpx.AsyncClient, condition: str, check: object, timeout_s: float = 60) -> Samples:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = await scrape(http)
        if check(samples):  # type: ignore[operator]
            return samples
        assert time.monotonic() < deadline, f"metrics never showed {condition}"
        await asyncio.sleep(0.05)


async def test_paid_traffic_moves_every_family(paid_server: Served, paid_http: httpx.AsyncClient) -> None:
    headers = {"X-Forwarded-For": client_ip()}
    before = await scrape(paid_http)
    catalog = [model["id"] for model in (await paid_http.get("/v1/images/models", headers=headers)).json()["models"]]
    amount = int((await paid_http.post("/v1/images/estimate", json=SLOW, headers=headers))
                 .json()["estimatedCost"]["amount"])

    # An unpaid request (the challenge), a bogus payment (refused), then a paid render held for 2 s.
    assert (await paid_http.post("/v1/images/generate", json=SLOW, headers=headers)).status_code == 402
    bogus = await paid_http.post("/v1/images/generate", json=SLOW, headers={**headers, "X-PAYMENT": "bm90IGpzb24="})
    assert bogus.status_code == 402 and bogus.json()["reason"] == "invalid_payload"
    terms = Terms(amount=amount)
    payment = v1_header(terms, sign(terms))
    paid = asyncio.create_task(paid_http.post("/v1/images/generate", json=SLOW, headers={**headers, **payment}))

    # While it renders: the model's queue holds it, and with no room to wait a new request is refused
    # before any payment step.
    during = await wait_for(paid_http, "the render in the queue",
                            lambda s: metric(s, "imagegate_queue_depth", model="bench-simulated") == 1)
    busy = await paid_http.post("/v1/images/generate", json=SLOW, headers=headers)
    assert busy.status_code == 503 and busy.json()["error"] == "MODEL_BUSY" and busy.headers["retry-after"]
    for model_id in catalog:  # every catalog model is reported, idle ones as 0
        assert ("imagegate_queue_depth", frozenset({("model", model_id)})) in during
    response = await paid
    assert response.status_code == 200, response.text
    body = response.json()
    image = body["images"][0]["url"].split("/images/", 1)[1]
    assert (await paid_http.get(f"/images/{image}", headers=headers)).status_code == 200
    replay = await paid_http.post("/v1/images/generate", json=SLOW, headers={**headers, **payment})
    assert replay.status_code == 200 and replay.json()["id"] == body["id"]
    assert (await paid_http.get("/no/such/route", headers=headers)).status_code == 404

    after = await wait_for(paid_http, "an idle queue",
                           lambda s: metric(s, "imagegate_queue_depth", model="bench-simulated") == 0)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    # HTTP by route template and status; unmatched paths share one label.
    assert delta("imagegate_http_requests_total", method="POST", route="/v1/images/generate", status="200") == 2
    assert delta("imagegate_http_requests_total", method="POST", route="/v1/images/generate", status="402") == 2
    assert delta("imagegate_http_requests_total", method="POST", route="/v1/images/generate", status="503") == 1
    assert delta("imagegate_http_requests_total", method="GET", route="/images/{name}", status="200") == 1
    assert delta("imagegate_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert delta("imagegate_http_request_duration_seconds_count", method="POST", route="/v1/images/generate") == 5
    # Payments by outcome.
    assert delta("imagegate_payments_total", outcome="challenged", reason="") == 1
    assert delta("imagegate_payments_total", outcome="failed", reason="invalid_payload") == 1
    assert delta("imagegate_payments_total", outcome="verified", reason="") == 1
    assert delta("imagegate_payments_total", outcome="settled", reason="") == 1
    assert delta("imagegate_payments_total", outcome="replayed", reason="") == 1
    # Money, in atomic units of the asset, by model.
    asset, network = devchain.USDC_ADDRESS.lower(), "base-sepolia"
    assert delta("imagegate_revenue_atomic_total", model="bench-simulated", network=network, asset=asset) == amount
    assert delta("imagegate_generations_total", model="bench-simulated", outcome="completed") == 1
    # Latencies: the render held SLOW_RENDER_MS, in the 512 size bucket; one settlement.
    assert delta("imagegate_generation_seconds_count", model="bench-simulated", size="512") == 1
    assert delta("imagegate_generation_seconds_sum", model="bench-simulated", size="512") >= SLOW_RENDER_MS / 1000
    assert delta("imagegate_settlement_seconds_count", network=network, outcome="settled") == 1
    assert delta("imagegate_busy_refusals_total", model="bench-simulated") == 1
    # The reconciler reports its backlog (nothing pending here).
    assert ("imagegate_reconciliation_backlog", frozenset({("state", "payment_pending")})) in after
    assert metric(after, "imagegate_reconciliation_backlog", state="payment_pending") == 0
    assert metric(after, "imagegate_build_info", version="0.1.0") == 1


async def test_loaded_models_and_their_memory(paid_server: Served, paid_http: httpx.AsyncClient) -> None:
    headers = {"X-Forwarded-For": client_ip()}
    body = {"prompt": "a blue square", "width": 128, "height": 128}
    amount = int((await paid_http.post("/v1/images/estimate", json=body, headers=headers))
                 .json()["estimatedCost"]["amount"])
    terms = Terms(amount=amount)
    response = await paid_http.post("/v1/images/generate", json=body,
                                    headers={**headers, **v1_header(terms, sign(terms))})
    assert response.status_code == 200, response.text
    samples = await scrape(paid_http)
    assert metric(samples, "imagegate_model_loaded", model="imagegate-tiny") == 1
    assert metric(samples, "imagegate_model_memory_bytes", model="imagegate-tiny") > 10_000_000
    assert metric(samples, "imagegate_model_loaded", model="bench-simulated") == 0
