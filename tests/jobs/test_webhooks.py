"""Webhook deliveries over real HTTP, verified by an independent Standard Webhooks implementation
(the ``standardwebhooks`` package): signatures, stable ids across retries, 410, the SSRF guard."""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from imagegate.app import app_from_settings
from imagegate.config import WebhooksSettings
from imagegate.errors import InvalidParameter
from imagegate.jobs.webhooks import resolve_target
from tests.integration.conftest import tiny_settings
from tests.jobs.conftest import SIMULATED, WEBHOOK_SECRET, payment_for, submit, wait_terminal
from tests.support.server import live_server

BODY = {"prompt": "a plain square of colour", "model": SIMULATED, "width": 128, "height": 128}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    base_url: str
    received: list[Received] = field(default_factory=list)

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def wait_for(self, path: str, count: int, timeout_s: float = 30) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while len(self.at(path)) < count:
            assert time.monotonic() < deadline, f"{len(self.at(path))} of {count} deliveries to {path}"
            await asyncio.sleep(0.05)
        return self.at(path)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    state = Receiver("")
    attempts: dict[str, int] = {}

    async def receive(request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        state.received.append(Received(path, dict(request.headers), body, time.monotonic()))
        message_id = request.headers.get("webhook-id", "")
        attempts[message_id] = attempts.get(message_id, 0) + 1
        if path == "/gone":
            return Response(status_code=410)
        if path == "/flaky" and attempts[message_id] <= 2:
            return Response(status_code=500)
        if path == "/throttled" and attempts[message_id] == 1:
            return Response(status_code=429, headers={"Retry-After": "1"})
        return Response(status_code=204)

    app = Starlette(routes=[Route("/{name}", receive, methods=["POST"])])
    with live_server(app) as base_url:
        state.base_url = base_url
        yield state


def verified(delivery: Received, secret: str = WEBHOOK_SECRET) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(secret).verify(delivery.body, delivery.headers)
    return payload


async def test_deliveries_are_signed_per_the_standard(http: httpx.AsyncClient, receiver: Receiver) -> None:
    body = {**BODY, "steps": 6, "webhookUrl": f"{receiver.base_url}/ok",
            "webhookEvents": ["running", "progress", "completed"]}
    job = (await submit(http, body, await payment_for(http, body))).json()
    # The render may already have started (and queued a "running" delivery) when the submit answers.
    assert job["webhook"]["url"] == f"{receiver.base_url}/ok"
    assert job["webhook"]["events"] == sorted(["running", "progress", "succeeded", "failed", "cancelled", "expired"])
    assert {d["event"] for d in job["webhook"]["deliveries"]} <= {"running", "progress"}
    await wait_terminal(http, job["id"])
    deadline = time.monotonic() + 30
    deliveries: list[Received] = []
    while not any(b"job.succeeded" in d.body for d in deliveries):
        assert time.monotonic() < deadline, deliveries
        await asyncio.sleep(0.05)
        deliveries = [d for d in receiver.at("/ok") if job["id"] in d.body.decode()]
    payloads = [verified(d) for d in deliveries]
    types = [p["type"] for p in payloads]
    assert types[0] == "job.running" and types[-1] == "job.succeeded", types
    # Step events are throttled to about one a second (a 1.6 s render: one or two of its six steps).
    assert 1 <= types.count("job.progress") <= 3
    final = payloads[-1]["data"]["job"]
    assert final["status"] == "succeeded" and final["result"]["images"][0]["url"].startswith("http")
    assert "cancelToken" not in final
    ids = [d.headers["webhook-id"] for d in deliveries]
    assert len(set(ids)) == len(ids) and all(i.startswith("msg_") for i in ids)
    assert all(d.headers["content-type"] == "application/json" for d in deliveries)

    # The signature covers the exact bytes: a changed body, id or secret does not verify.
    last = deliveries[-1]
    with pytest.raises(WebhookVerificationError):
        Webhook(WEBHOOK_SECRET).verify(last.body.replace(b"succeeded", b"failed"), last.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(WEBHOOK_SECRET).verify(last.body, {**last.headers, "webhook-id": last.headers["webhook-id"] + "0"})
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(last.body, last.headers)

    view = (await http.get(f"/v1/jobs/{job['id']}")).json()
    assert {d["status"] for d in view["webhook"]["deliveries"]} == {"delivered"}


async def test_retries_keep_their_id_and_follow_the_schedule(http: httpx.AsyncClient, receiver: Receiver) -> None:
    body = {**BODY, "webhookUrl": f"{receiver.base_url}/flaky"}
    job = (await submit(http, body, await payment_for(http, body))).json()
    await wait_terminal(http, job["id"])
    attempts = await receiver.wait_for("/flaky", 3)
    assert len({a.headers["webhook-id"] for a in attempts}) == 1
    assert all(verified(a)["type"] == "job.succeeded" for a in attempts)
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.3 * 0.9 - 0.05 and gaps[1] >= 0.6 * 0.9 - 0.05, gaps  # 0.3 s then 0.6 s, +-10 %
    deadline = time.monotonic() + 10
    while True:
        view = (await http.get(f"/v1/jobs/{job['id']}")).json()
        if view["webhook"]["deliveries"][0]["status"] == "delivered" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert view["webhook"]["deliveries"][0] | {"id": None} == {
        "id": None, "event": "succeeded", "status": "delivered", "attempts": 3, "lastStatus": 204}

    # 429 with Retry-After: the next attempt waits at least that long.
    body = {**BODY, "webhookUrl": f"{receiver.base_url}/throttled"}
    job = (await submit(http, body, await payment_for(http, body))).json()
    await wait_terminal(http, job["id"])
    throttled = await receiver.wait_for("/throttled", 2)
    assert throttled[1].at - throttled[0].at >= 0.95


async def test_a_410_stops_deliveries_to_that_url(http: httpx.AsyncClient, receiver: Receiver) -> None:
    body = {**BODY, "webhookUrl": f"{receiver.base_url}/gone", "webhookEvents": ["running", "completed"]}
    job = (await submit(http, body, await payment_for(http, body))).json()
    await wait_terminal(http, job["id"])
    first = await receiver.wait_for("/gone", 1)
    await asyncio.sleep(1.5)  # time for retries or later events, which must not come
    assert len(receiver.at("/gone")) == 1 and verified(first[0])["type"] == "job.running"
    view = (await http.get(f"/v1/jobs/{job['id']}")).json()
    assert [(d["event"], d["status"]) for d in view["webhook"]["deliveries"]] == [
        ("running", "gone"), ("succeeded", "gone")]


async def test_a_job_may_bring_its_own_secret(http: httpx.AsyncClient, receiver: Receiver) -> None:
    own = "whsec_" + base64.b64encode(b"the client's own 32-byte secret!").decode()
    body = {**BODY, "webhookUrl": f"{receiver.base_url}/own", "webhookSecret": own}
    job = (await submit(http, body, await payment_for(http, body))).json()
    assert "secret" not in job["webhook"] and own not in str(job)
    await wait_terminal(http, job["id"])
    delivery = (await receiver.wait_for("/own", 1))[0]
    assert verified(delivery, own)["data"]["job"]["id"] == job["id"]
    with pytest.raises(WebhookVerificationError):
        verified(delivery, WEBHOOK_SECRET)


async def test_bad_webhook_fields_are_refused_before_payment(http: httpx.AsyncClient) -> None:
    for fields, named in (({"webhookUrl": "ftp://example.com/x"}, "webhookUrl"),
                          ({"webhookUrl": "http://127.0.0.1:9/x", "webhookEvents": ["done"]}, "webhookEvents"),
                          ({"webhookUrl": "http://127.0.0.1:9/x", "webhookSecret": "abc"}, "webhookSecret"),
                          ({"webhookUrl": "http://user:pw@127.0.0.1:9/x"}, "webhookUrl")):
        refused = await http.post("/v1/images/generate", json={**BODY, **fields}, headers={"Prefer": "respond-async"})
        assert refused.status_code == 400, refused.text  # not a 402: nothing to pay for
        assert refused.json()["details"]["field"] == named


@pytest.fixture(scope="module")
def guarded_api(tmp_path_factory: pytest.TempPathFactory, tiny_model_paths: dict[str, Path]) -> Iterator[str]:
    """Default webhook settings (https only, public addresses only); payments off."""
    root = tmp_path_factory.mktemp("guarded")
    (root / "secret").write_text(WEBHOOK_SECRET)
    settings = tiny_settings(root, tiny_model_paths, payments={"enabled": False},
                             webhooks={"secret_file": str(root / "secret")})
    with live_server(app_from_settings(settings)) as base_url:
        yield base_url


@pytest.mark.parametrize("url", [
    "http://example.com/hook",  # plain http
    "https://127.0.0.1/hook", "https://localhost/hook", "https://[::1]/hook", "https://[::ffff:127.0.0.1]/hook",
    "https://10.1.2.3/hook", "https://192.168.0.10/hook", "https://172.16.5.4/hook",
    "https://169.254.169.254/latest/meta-data", "https://0.0.0.0/hook", "https://[fe80::1]/hook",
])
async def test_the_ssrf_guard_refuses_private_targets(guarded_api: str, url: str) -> None:
    async with httpx.AsyncClient(base_url=guarded_api, trust_env=False, timeout=30) as client:
        refused = await client.post("/v1/images/generate", json={**BODY, "webhookUrl": url},
                                    headers={"Prefer": "respond-async"})
    assert refused.status_code == 400, refused.text
    assert refused.json()["details"]["field"] == "webhookUrl"


async def test_a_public_address_passes_the_guard() -> None:
    target = await resolve_target("https://93.184.216.34:8443/hook?x=1", WebhooksSettings())
    assert (target.address, target.port, target.host) == ("93.184.216.34", 8443, "93.184.216.34")
    with pytest.raises(InvalidParameter, match="loopback"):
        await resolve_target("https://127.0.0.2/hook", WebhooksSettings())


async def test_jobs_run_with_payments_switched_off(guarded_api: str) -> None:
    async with httpx.AsyncClient(base_url=guarded_api, trust_env=False, timeout=60) as client:
        submitted = await client.post("/v1/images/generate", json={"prompt": "a red circle", "width": 128,
                                                                     "height": 128}, headers={"Prefer": "wait=60"})
        assert submitted.status_code == 200, submitted.text
        job = submitted.json()
        assert job["status"] == "succeeded" and job["payment"] is None
        assert job["result"]["cost"]["amount"] == "0"
