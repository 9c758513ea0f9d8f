"""Async jobs over real HTTP: submit with Prefer, status, events, cancel, expiry; paid on the dev chain.

Every paid test checks the money: a succeeded job moves exactly its price once, a cancelled, failed or
expired one moves nothing and its payment can be sent again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_defunct
from pydantic import ValidationError

from imagegate import devchain
from imagegate.app import app_from_settings
from imagegate.config import load_settings
from imagegate.jobs.runner import JobRunner
from imagegate.ledger import PaymentStatus, SqlLedger
from tests.integration.conftest import tiny_settings
from tests.jobs.conftest import (
    MAX_TIMEOUT_S,
    PAYER,
    SIMULATED,
    SLOW,
    JobsServer,
    amount_of,
    ledger_url,
    payment_for,
    payment_key,
    read_events,
    submit,
    wait_terminal,
)
from tests.support.payments import decode_header
from tests.support.server import free_port, live_server

BODY = {"prompt": "a plain square of colour", "model": SIMULATED, "width": 128, "height": 128}
SLOW_BODY = {**BODY, "model": SLOW}


async def payer_transfers(chain: devchain.DevChain, block: int, payer: str = PAYER.address) -> list[int]:
    return [t.value for t in await chain.token_transfers(from_block=block + 1) if t.sender == payer]


async def test_submit_answers_202_and_the_job_settles_only_after_storing(
        http: httpx.AsyncClient, chain: devchain.DevChain) -> None:
    body = {**BODY, "steps": 6}
    paid = await payment_for(http, body)
    before = await chain.balance_of(PAYER.address)
    block = await chain.block_number()

    response = await submit(http, body, paid)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert response.headers["preference-applied"] == "respond-async"
    assert job["status"] in ("queued", "running") and job["payment"]["state"] == "verified"
    assert job["cancelToken"] and job["result"] is None and job["finishedAt"] is None
    assert len(job["id"]) > 30  # unguessable

    events = await read_events(http, f"/v1/jobs/{job['id']}/events")
    kinds = [kind for _, kind, _ in events]
    assert kinds[-1] == "succeeded", kinds
    steps = [data["step"] for _, kind, data in events if kind == "progress"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(data["totalSteps"] == 6 for _, kind, data in events if kind == "progress")
    assert kinds.index("running") < kinds.index("progress") < kinds.index("settling") < kinds.index("succeeded")
    ids = [int(event_id) for event_id, _, _ in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    done = (await http.get(f"/v1/jobs/{job['id']}")).json()
    assert done["status"] == "succeeded" and done["payment"]["state"] == "settled"
    assert done["startedAt"] and done["finishedAt"] and "cancelToken" not in done
    result = done["result"]
    assert set(result) == {"images", "model", "steps", "cost", "id"}  # the synchronous 200 body
    assert result["cost"]["transaction"] == done["payment"]["transaction"]
    assert events[-1][2]["job"]["result"] == result
    image = await http.get(result["images"][0]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"

    amount = int(job["payment"]["amount"])
    assert amount == await amount_of(http, body)
    assert await chain.balance_of(PAYER.address) == before - amount
    transfers = [t for t in await chain.token_transfers(from_block=block + 1) if t.sender == PAYER.address]
    assert [(t.value, t.transaction_hash) for t in transfers] == [(amount, result["cost"]["transaction"])]


async def test_resending_the_payment_returns_the_same_job_and_charges_once(
        http: httpx.AsyncClient, chain: devchain.DevChain) -> None:
    paid = await payment_for(http, BODY)
    block = await chain.block_number()
    first = await submit(http, BODY, paid)
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]

    again = await submit(http, BODY, paid)  # while it renders
    assert again.status_code == 202 and again.json()["id"] == job_id
    assert "cancelToken" not in again.json()

    await wait_terminal(http, job_id)
    after = await submit(http, BODY, paid)  # once it is done
    assert after.status_code == 200 and after.json()["id"] == job_id and after.json()["status"] == "succeeded"
    # Synchronous resend of the same payment: the same images.
    sync = await http.post("/v1/images/generate", json=BODY, headers=paid.headers)
    assert sync.status_code == 200 and sync.json() == after.json()["result"]
    # The same payment for different content is refused.
    other = await submit(http, {**BODY, "prompt": "something else entirely"}, paid)
    assert other.status_code == 402 and other.json()["reason"] == "payment_used_for_another_request"
    assert await payer_transfers(chain, block) == [paid.terms.amount]


async def test_prefer_wait_answers_the_finished_job_or_the_job_so_far(http: httpx.AsyncClient) -> None:
    paid = await payment_for(http, BODY)
    finished = await submit(http, BODY, paid, prefer="wait=30")
    assert finished.status_code == 200, finished.text
    assert finished.headers["preference-applied"] == "wait=30"
    assert finished.json()["status"] == "succeeded"
    receipt = decode_header(finished.headers["payment-response"])
    assert receipt["success"] is True and receipt["transaction"] == finished.json()["payment"]["transaction"]

    paid = await payment_for(http, BODY)
    started = time.monotonic()
    waiting = await submit(http, BODY, paid, prefer="respond-async, wait=999")
    assert waiting.headers["preference-applied"] == "respond-async, wait=60"  # capped at [jobs] max_prefer_wait_s
    assert waiting.status_code == 200  # a 1.6 s render fits in 60 s

    paid = await payment_for(http, SLOW_BODY)
    started = time.monotonic()
    cut = await submit(http, SLOW_BODY, paid, prefer="respond-async; foo=bar, wait=1")
    assert cut.status_code == 202 and 0.9 < time.monotonic() - started < 10
    assert cut.json()["status"] in ("queued", "running")
    cancelled = await http.post(f"/v1/jobs/{cut.json()['id']}/cancel", json={"cancelToken": cut.json()["cancelToken"]})
    assert cancelled.json()["status"] == "cancelled"


async def test_cancel_by_token_or_signature_releases_the_payment(
        http: httpx.AsyncClient, chain: devchain.DevChain, jobs_server: JobsServer) -> None:
    paid = await payment_for(http, SLOW_BODY)
    block = await chain.block_number()
    job = (await submit(http, SLOW_BODY, paid)).json()
    events_task = asyncio.create_task(read_events(http, f"/v1/jobs/{job['id']}/events"))

    forbidden = await http.post(f"/v1/jobs/{job['id']}/cancel", json={"cancelToken": "not-the-token"})
    assert forbidden.status_code == 403 and forbidden.json()["error"] == "FORBIDDEN"
    assert forbidden.json()["details"]["message"] == f"Cancel imagegate job {job['id']}"
    stranger = Account.create()
    signed_by_stranger = stranger.sign_message(encode_defunct(text=f"Cancel imagegate job {job['id']}"))
    forbidden = await http.post(f"/v1/jobs/{job['id']}/cancel",
                                json={"signature": "0x" + signed_by_stranger.signature.hex().removeprefix("0x")})
    assert forbidden.status_code == 403

    cancelled = await http.post(f"/v1/jobs/{job['id']}/cancel", json={"cancelToken": job["cancelToken"]})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["payment"]["state"] == "released"
    events = await asyncio.wait_for(events_task, 30)
    assert events[-1][1] == "cancelled" and events[-1][2]["job"]["status"] == "cancelled"
    again = await http.post(f"/v1/jobs/{job['id']}/cancel", json={"cancelToken": job["cancelToken"]})
    assert again.status_code == 200 and again.json()["status"] == "cancelled"

    # The same signed payment buys a new job; the payer cancels that one by signature.
    second = await submit(http, SLOW_BODY, paid)
    assert second.status_code == 202 and second.json()["id"] != job["id"]
    message = encode_defunct(text=f"Cancel imagegate job {second.json()['id']}")
    signature = Account.sign_message(message, PAYER.private_key).signature.hex()
    cancelled = await http.post(f"/v1/jobs/{second.json()['id']}/cancel",
                                json={"signature": "0x" + signature.removeprefix("0x")})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    ledger = SqlLedger(ledger_url(jobs_server.root))
    try:
        record = await ledger.payment(payment_key(paid.terms))
        assert record is not None and record.status is PaymentStatus.RELEASED
    finally:
        await ledger.aclose()
    assert await payer_transfers(chain, block) == []


async def test_a_finished_job_cannot_be_cancelled(http: httpx.AsyncClient) -> None:
    paid = await payment_for(http, BODY)
    job = (await submit(http, BODY, paid, prefer="wait=30")).json()
    assert job["status"] == "succeeded"
    refused = await http.post(f"/v1/jobs/{job['id']}/cancel", json={"cancelToken": job["cancelToken"]})
    assert refused.status_code == 409 and refused.json()["error"] == "JOB_NOT_CANCELLABLE"


async def test_queued_jobs_report_their_place_in_line(http: httpx.AsyncClient) -> None:
    jobs = []
    for _ in range(3):  # one 9 s render at a time: the second waits behind one, the third behind two
        paid = await payment_for(http, SLOW_BODY)
        response = await submit(http, SLOW_BODY, paid)
        assert response.status_code == 202, response.text
        jobs.append(response.json())
    third = jobs[2]["id"]
    follower = asyncio.create_task(read_events(http, f"/v1/jobs/{third}/events"))
    deadline = time.monotonic() + 30
    while (snapshot := (await http.get(f"/v1/jobs/{third}")).json()).get("queuePosition") != 1:
        assert time.monotonic() < deadline, snapshot
        await asyncio.sleep(0.1)
    assert snapshot["status"] == "queued" and snapshot["startedAt"] is None
    for ahead in jobs[:2]:  # the renders ahead end: the third moves up, then runs
        cancelled = await http.post(f"/v1/jobs/{ahead['id']}/cancel", json={"cancelToken": ahead["cancelToken"]})
        assert cancelled.json()["status"] == "cancelled"
    while (snapshot := (await http.get(f"/v1/jobs/{third}")).json())["status"] != "running":
        assert time.monotonic() < deadline, snapshot
        await asyncio.sleep(0.1)
    await http.post(f"/v1/jobs/{third}/cancel", json={"cancelToken": jobs[2]["cancelToken"]})
    events = await asyncio.wait_for(follower, 30)
    positions = [data["queuePosition"] for _, kind, data in events if kind == "queued"]
    assert positions == [1, 0], events
    kinds = [kind for _, kind, _ in events]
    assert kinds[:3] == ["queued", "queued", "running"] and kinds[-1] == "cancelled", kinds


async def test_events_resume_from_last_event_id_with_heartbeats(http: httpx.AsyncClient) -> None:
    body = {**BODY, "steps": 10}
    job = (await submit(http, body, await payment_for(http, body))).json()
    path = f"/v1/jobs/{job['id']}/events"
    head = await read_events(http, path, stop_after=3)  # then the connection drops
    rest = await read_events(http, path, last_event_id=head[-1][0])
    assert rest[0][0] != head[-1][0] and int(rest[0][0]) > int(head[-1][0])
    whole = await read_events(http, path)
    assert [e[0] for e in head + rest] == [e[0] for e in whole]
    assert whole[-1][1] == "succeeded"
    # ?lastEventId= for clients that cannot set headers; a bad id is a 400.
    tail = await read_events(http, f"{path}?lastEventId={whole[-2][0]}")
    assert [e[0] for e in tail] == [whole[-1][0]]
    assert (await http.get(path, headers={"Last-Event-ID": "abc"})).status_code == 400

    # The raw stream: no buffering by proxies, a reconnection delay, heartbeats while nothing happens.
    slow = (await submit(http, SLOW_BODY, await payment_for(http, SLOW_BODY))).json()
    raw = ""
    async with http.stream("GET", f"/v1/jobs/{slow['id']}/events") as stream:
        assert stream.headers["x-accel-buffering"] == "no" and stream.headers["cache-control"] == "no-store"
        assert stream.headers["content-type"].startswith("text/event-stream")
        started = time.monotonic()
        async for chunk in stream.aiter_text():
            raw += chunk
            if raw.count(": ping") >= 2 or time.monotonic() - started > 10:
                break
    assert raw.startswith("retry: 2000") and raw.count(": ping") >= 2, raw
    await http.post(f"/v1/jobs/{slow['id']}/cancel", json={"cancelToken": slow["cancelToken"]})


async def test_a_job_that_cannot_finish_within_its_payment_is_expired_and_released(
        http: httpx.AsyncClient, chain: devchain.DevChain) -> None:
    # Valid for 32 s: rendering must end 20 s before, so a 30 s render (four images) cannot make it.
    body = {**SLOW_BODY, "numberResults": 4}
    paid = await payment_for(http, body, valid_before=int(time.time()) + 32)
    block = await chain.block_number()
    job = (await submit(http, body, paid)).json()
    assert job["status"] in ("queued", "running")
    done = await wait_terminal(http, job["id"], timeout_s=60)
    assert done["status"] == "expired", done
    assert done["error"]["error"] == "JOB_EXPIRED" and done["payment"]["state"] == "released"
    assert await payer_transfers(chain, block) == []


async def test_a_job_whose_settlement_fails_is_failed_with_the_error_body(
        http: httpx.AsyncClient, chain: devchain.DevChain) -> None:
    amount = await amount_of(http, BODY)
    payer = Account.create()
    await chain.mint(payer.address, amount)
    paid = await payment_for(http, BODY, key=payer.key.hex())
    job = (await submit(http, BODY, paid)).json()
    assert job["status"] in ("queued", "running"), job
    # The payer spends the money elsewhere while the job renders: settlement is refused on chain.
    await chain.rpc("anvil_setBalance", payer.address, hex(10**18))
    await chain.rpc("anvil_impersonateAccount", payer.address)
    transfer = "0xa9059cbb" + abi_encode(["address", "uint256"], [devchain.ADMIN_ACCOUNT.address, amount]).hex()
    await chain.send_transaction(devchain.USDC_ADDRESS, transfer, sender=payer.address)
    done = await wait_terminal(http, job["id"])
    assert done["status"] == "failed", done
    assert done["error"]["error"] == "SETTLEMENT_FAILED" and done["result"] is None
    assert done["payment"]["state"] == "failed"


async def test_a_synchronous_request_streams_its_progress_by_request_id(http: httpx.AsyncClient) -> None:
    request_id = str(uuid.uuid4())
    body = {**BODY, "steps": 5}
    follower = asyncio.create_task(read_events(http, f"/v1/requests/{request_id}/events"))
    await asyncio.sleep(0.3)  # a browser page opens its stream first, then sends the request
    paid = await payment_for(http, body)
    response = await http.post("/v1/images/generate", json=body, headers={**paid.headers, "X-Request-ID": request_id})
    assert response.status_code == 200, response.text
    events = await asyncio.wait_for(follower, 30)
    kinds = [kind for _, kind, _ in events]
    assert kinds[0] == "running" and kinds[-1] == "succeeded", kinds
    assert [data["step"] for _, kind, data in events if kind == "progress"] == [1, 2, 3, 4, 5]
    assert events[-1][2] == {"requestId": request_id, "status": "succeeded", "generationId": response.json()["id"]}
    bad = await http.get("/v1/requests/short/events")
    assert bad.status_code == 400 and bad.json()["error"] == "INVALID_PARAMETER"


async def test_the_402_covers_the_wait_and_unknown_jobs_are_404(http: httpx.AsyncClient) -> None:
    challenge = await http.post("/v1/images/generate", json=BODY, headers={"Prefer": "respond-async"})
    assert challenge.status_code == 402
    assert challenge.json()["accepts"][0]["maxTimeoutSeconds"] == MAX_TIMEOUT_S
    v2 = json.loads(base64.b64decode(challenge.headers["payment-required"]))
    assert v2["accepts"][0]["maxTimeoutSeconds"] == MAX_TIMEOUT_S
    webhook_on_sync = await http.post("/v1/images/generate", json={**BODY, "webhookUrl": "https://example.com/x"})
    assert webhook_on_sync.status_code == 400 and "Prefer: respond-async" in webhook_on_sync.json()["message"]
    for path in ("/v1/jobs/job_doesnotexist", "/v1/jobs/nope", "/v1/jobs/job_x/events"):
        missing = await http.get(path)
        assert missing.status_code == 404 and missing.json()["error"] == "NOT_FOUND"


def test_a_wait_longer_than_the_payment_validity_is_refused_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="max_timeout_seconds"):
        load_settings(jobs={"max_wait_s": 280}, payments={"max_timeout_seconds": 300})
    assert load_settings(payments={"max_timeout_seconds": 300}).job_max_wait_s() == 240
    assert load_settings(jobs={"max_wait_s": 200}).job_max_wait_s() == 200
    config = tmp_path / "bad.toml"
    config.write_text("[payments]\nmax_timeout_seconds = 120\n[jobs]\nmax_wait_s = 100\n")
    # A free port each: were a check to pass by mistake, the server would not take anyone's port.
    refused = subprocess.run([sys.executable, "-m", "imagegate", "serve", "--config", str(config),
                              "--port", str(free_port())],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Refusing to start" in refused.stderr, refused.stderr
    bad_secret = subprocess.run([sys.executable, "-m", "imagegate", "serve", "--port", str(free_port())],
                                capture_output=True, text=True,
                                timeout=120, env={**os.environ, "IMAGEGATE_WEBHOOK_SECRET": "whsec_short"})
    assert bad_secret.returncode == 2 and "webhook signing secret" in bad_secret.stderr, bad_secret.stderr


async def test_steps_come_from_the_diffusers_step_callback(http: httpx.AsyncClient) -> None:
    body = {"prompt": "a red circle", "model": "sdxl", "width": 128, "height": 128, "steps": 3}
    job = (await submit(http, body, await payment_for(http, body))).json()
    events = await read_events(http, f"/v1/jobs/{job['id']}/events")
    assert [(data["step"], data["totalSteps"]) for _, kind, data in events if kind == "progress"] == [
        (1, 3), (2, 3), (3, 3)]
    assert events[-1][1] == "succeeded", events


async def test_the_drain_hook_refuses_new_jobs_before_any_payment_step(
        tmp_path: Path, tiny_model_paths: dict[str, Path]) -> None:
    app = app_from_settings(tiny_settings(tmp_path, tiny_model_paths, payments={"enabled": False}))
    with live_server(app) as base_url:
        runner: JobRunner = app.state.jobs
        assert runner.in_flight == 0
        runner.stop_accepting()  # what a draining server does first
        async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=30) as client:
            refused = await client.post("/v1/images/generate", json={**BODY, "model": "flux-schnell"},
                                        headers={"Prefer": "respond-async"})
        assert refused.status_code == 503 and refused.json()["error"] == "SERVICE_UNAVAILABLE"
        assert refused.headers["retry-after"] == "5"
