"""Per-client rate limits on the unpaid surface, over real HTTP (``paid_server``: burst 4 per class,
refused payments burst 2, refills slower than the tests run; clients told apart by X-Forwarded-For
from the trusted proxy 127.0.0.1)."""

from __future__ import annotations

from typing import Any

import httpx

from imagegate import devchain
from tests.ops.conftest import TIGHT, Served, client_ip, metric, scrape
from tests.support.payments import Terms, sign, v1_header

SMALL = {"prompt": "a small red circle", "width": 128, "height": 128}
BURST = int(TIGHT["burst"])


def assert_rate_limited(response: httpx.Response, route_class: str) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == "RATE_LIMITED" and body["message"] and body["details"]["limit"] == route_class
    assert int(response.headers["retry-after"]) >= 1 and response.headers["cache-control"] == "no-store"
    assert response.headers["x-request-id"]
    return body


async def test_each_class_has_its_own_bucket_per_client(paid_http: httpx.AsyncClient) -> None:
    client, other = {"X-Forwarded-For": client_ip()}, {"X-Forwarded-For": client_ip()}
    before = await scrape(paid_http)
    for _ in range(BURST):
        assert (await paid_http.post("/v1/images/generate", json=SMALL, headers=client)).status_code == 402
    # Browsers can read the refusal: CORS headers are on it.
    refused = await paid_http.post("/v1/images/generate", json=SMALL,
                                   headers={**client, "Origin": "https://app.example"})
    assert_rate_limited(refused, "challenge")
    assert refused.headers["access-control-allow-origin"] in ("*", "https://app.example")
    # Another class, and another client, are untouched.
    assert (await paid_http.post("/v1/images/estimate", json=SMALL, headers=client)).status_code == 200
    assert (await paid_http.post("/v1/images/generate", json=SMALL, headers=other)).status_code == 402
    for _ in range(BURST):
        assert (await paid_http.get("/v1/images/models", headers=other)).status_code == 200
    assert_rate_limited(await paid_http.get("/v1/images/models", headers=other), "models")
    for _ in range(BURST):
        assert (await paid_http.get("/images/no-such-image.png", headers=other)).status_code == 404
    assert_rate_limited(await paid_http.get("/images/no-such-image.png", headers=other), "images")
    # Unlimited routes stay open (health checks, metrics).
    assert (await paid_http.get("/healthz", headers=client)).status_code == 200
    after = await scrape(paid_http)
    assert metric(after, "imagegate_rate_limited_total", route_class="challenge") - metric(
        before, "imagegate_rate_limited_total", route_class="challenge") == 1
    assert metric(after, "imagegate_http_requests_total", method="GET", route="/images/{name}", status="429") >= 1


async def test_a_paying_client_is_not_limited_like_an_anonymous_one(paid_http: httpx.AsyncClient,
                                                                    ops_chain: devchain.DevChain) -> None:
    client = {"X-Forwarded-For": client_ip()}
    for _ in range(BURST):
        await paid_http.post("/v1/images/generate", json=SMALL, headers=client)
    assert_rate_limited(await paid_http.post("/v1/images/generate", json=SMALL, headers=client), "challenge")
    amount = int((await paid_http.post("/v1/images/estimate", json=SMALL, headers=client))
                 .json()["estimatedCost"]["amount"])
    for seed in range(3):  # more paid requests than the challenge burst left, all served
        terms = Terms(amount=amount)
        paid = await paid_http.post("/v1/images/generate", json={**SMALL, "seed": seed},
                                    headers={**client, **v1_header(terms, sign(terms))})
        assert paid.status_code == 200, paid.text


async def test_bogus_payment_headers_are_no_way_around_the_limits(paid_http: httpx.AsyncClient) -> None:
    client = {"X-Forwarded-For": client_ip()}
    price = int((await paid_http.post("/v1/images/estimate", json=SMALL, headers=client))
                .json()["estimatedCost"]["amount"])
    terms = Terms(amount=price + 1)  # a real signature for the wrong amount: refused after decoding
    wrong = v1_header(terms, sign(terms))
    for header in ({"X-PAYMENT": "garbage"}, wrong):
        refused = await paid_http.post("/v1/images/generate", json=SMALL, headers={**client, **header})
        assert refused.status_code == 402
    # The refusals' bucket is empty: the next payment header is not even decoded.
    assert_rate_limited(await paid_http.post("/v1/images/generate", json=SMALL,
                                             headers={**client, "PAYMENT-SIGNATURE": "more garbage"}),
                        "refused_payment")
    # The client's challenge bucket was never touched.
    assert (await paid_http.post("/v1/images/generate", json=SMALL, headers=client)).status_code == 402


async def test_x_forwarded_for_counts_only_from_trusted_proxies(paid_server: Served) -> None:
    # From the trusted proxy, the rightmost untrusted address is the client: a spoofed first entry
    # added by the client itself changes nothing.
    async with httpx.AsyncClient(base_url=paid_server.base_url, trust_env=False) as http:
        real = client_ip()
        for spoofed in range(BURST):
            headers = {"X-Forwarded-For": f"198.51.100.{spoofed}, {real}"}
            assert (await http.post("/v1/images/estimate", json=SMALL, headers=headers)).status_code == 200
        assert_rate_limited(await http.post("/v1/images/estimate", json=SMALL,
                                            headers={"X-Forwarded-For": f"198.51.100.99, {real}"}), "estimate")
