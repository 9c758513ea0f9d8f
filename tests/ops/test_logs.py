"""Structured logs of a real paid run: one JSON object per line, tied to request ids, and no secret in them.

The server runs at debug level (every library's lines included); a paid request through the x402 SDK
(v2 header) and one with a hand-signed v1 header go through it, then its whole log is searched for
the payer's signatures, the raw payment headers, the facilitator's and the payer's keys.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import httpx

from imagegate import devchain
from imagegate.ledger import SqlLedger
from imagegate.payments.client import post_with_payment
from tests.ops.conftest import Served, client_ip
from tests.support.payments import Terms, sign, v1_header

PAYER = devchain.PAYER_ACCOUNT
SMALL = {"prompt": "a small red circle", "width": 128, "height": 128, "seed": 3}
STEPS = {"validate", "payment", "generate", "store", "settle", "publish"}


async def signature_of(served: Served, generation_id: str) -> str:
    ledger = SqlLedger(f"sqlite+aiosqlite:///{served.root / 'ledger.sqlite3'}")
    await ledger.start()
    try:
        generation = await ledger.generation(generation_id)
        assert generation is not None and generation.payment_key is not None
        payment = await ledger.payment(generation.payment_key)
        assert payment is not None
        signature: str = payment.payload["payload"]["payload"]["signature"]
        return signature
    finally:
        await ledger.aclose()


def json_lines(served: Served) -> list[dict[str, Any]]:
    """Every whole line of the server's log as JSON (a line that is not JSON fails the test); a last
    line the server is still writing is left for the next read."""
    whole, _, _ = served.log_text().rpartition("\n")
    return [json.loads(line) for line in whole.splitlines() if line.strip()]


async def access_event(served: Served, request_id: str, status: int = 200, timeout_s: float = 10) -> dict[str, Any]:
    """The access line of the request's answer with ``status`` (a paying client sends its request
    twice, both times with its id: first unpaid, then with the payment). The server writes it once
    the response is sent, so it may land a moment after the client has read the answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        events = [e for e in json_lines(served) if e.get("logger") == "imagegate.access"
                  and e.get("request_id") == request_id and e["status"] == status]
        if events or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    (event,) = events
    return event


async def test_paid_requests_leave_structured_lines_and_no_secret(paid_server: Served,
                                                                   paid_http: httpx.AsyncClient) -> None:
    ip = client_ip()
    estimate = await paid_http.post("/v1/images/estimate", json=SMALL, headers={"X-Forwarded-For": ip})
    amount = int(estimate.json()["estimatedCost"]["amount"])

    # 1. The x402 SDK (v2); the signature it made is read back from the server's ledger.
    paid = await post_with_payment(f"{paid_server.base_url}/v1/images/generate", SMALL, PAYER.private_key,
                                   max_atomic=amount, headers={"X-Request-ID": "ops-log-v2", "X-Forwarded-For": ip})
    assert paid.status == 200, paid.body
    assert paid.headers["x-request-id"] == "ops-log-v2"
    v2_signature = await signature_of(paid_server, paid.body["id"])

    # 2. A hand-signed v1 header.
    terms = Terms(amount=amount)
    v1_payload = sign(terms)
    v1 = v1_header(terms, v1_payload)
    response = await paid_http.post("/v1/images/generate", json={**SMALL, "seed": 4},
                                    headers={**v1, "X-Request-ID": "ops-log-v1", "X-Forwarded-For": ip})
    assert response.status_code == 200, response.text
    transaction = response.json()["cost"]["transaction"]

    # Each request's access line carries what the flow learned.
    for request_id, body in (("ops-log-v2", paid.body), ("ops-log-v1", response.json())):
        event = await access_event(paid_server, request_id)
        assert event["level"] == "INFO" and event["time"] and event["message"].startswith("POST /v1/images/generate")
        assert (event["route"], event["status"], event["method"]) == ("/v1/images/generate", 200, "POST")
        assert event["model"] == "imagegate-tiny" and event["generation_id"] == body["id"]
        assert event["payer"] == PAYER.address and event["price"] == event["charged"] == amount
        assert event["transaction"] == body["cost"]["transaction"] and event["client"] == ip
        assert set(event["step_ms"]) == STEPS and event["duration_ms"] > 0
    assert (await access_event(paid_server, "ops-log-v1"))["transaction"] == transaction
    assert (await access_event(paid_server, "ops-log-v1"))["x402_version"] == 1
    # Lines logged inside a request (here: the flow's debug lines) carry its id.
    inside = [e for e in json_lines(paid_server) if e.get("request_id") == "ops-log-v1" and e["logger"] !=
              "imagegate.access"]
    assert inside, "no line logged during the paid request carries its request id"

    # No secret anywhere in the log, in any form.
    log = paid_server.log_text()
    facilitator_key = devchain.FACILITATOR_ACCOUNT.private_key
    secrets = {
        "v2 signature": v2_signature, "v1 signature": v1_payload["signature"],
        "v1 header": v1["X-PAYMENT"],
        # Any x402 message as base64 JSON (payment headers, challenges, receipts) starts so.
        "base64 x402 JSON": base64.b64encode(b'{"x402Version":').decode()[:18],
        "facilitator key": facilitator_key, "payer key": PAYER.private_key,
    }
    for name, secret in list(secrets.items()):
        secrets[f"{name} without 0x"] = secret.removeprefix("0x")
        secrets[f"{name} (start)"] = secret.removeprefix("0x")[:48]
    leaked = [name for name, secret in secrets.items() if secret in log or secret.lower() in log.lower()]
    assert leaked == []


async def test_request_ids_are_accepted_sanitised_or_made(paid_http: httpx.AsyncClient) -> None:
    headers = {"X-Forwarded-For": client_ip()}
    kept = await paid_http.get("/healthz", headers={**headers, "X-Request-ID": "trace-4f2a:7"})
    assert kept.headers["x-request-id"] == "trace-4f2a:7"
    for unusable in ("has spaces in it", "x" * 200, "line\tbreak", ""):
        replaced = await paid_http.get("/healthz", headers={**headers, "X-Request-ID": unusable})
        assert replaced.headers["x-request-id"] != unusable and len(replaced.headers["x-request-id"]) == 24
    made = [(await paid_http.get("/healthz", headers=headers)).headers["x-request-id"] for _ in range(3)]
    assert len(set(made)) == 3
    # Errors too: the router's 404 and 405, the flow's 400.
    for response in (await paid_http.get("/nope", headers=headers),
                     await paid_http.delete("/v1/images/generate", headers=headers),
                     await paid_http.post("/v1/images/estimate", json={"width": 100}, headers=headers)):
        assert response.status_code in (400, 404, 405) and len(response.headers["x-request-id"]) == 24
