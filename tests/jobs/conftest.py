"""One paid server for tests/jobs: real uvicorn on loopback, the real dev chain, x402 on base-sepolia.

Models: ``bench-simulated`` (a simulated GPU: steps every ~1/steps of ``batch_ms``, queue of one),
``bench-slow`` (the same, 2 s + 7 s per image: 9 s for one image, 30 s for four), and the tiny diffusers
pipelines under the built-in ids (real step callbacks). Webhooks may target loopback here; their
retry schedule is shortened to fractions of a second.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from imagegate import devchain
from imagegate.app import app_from_settings
from imagegate.config import Settings
from tests.integration.conftest import network_payments, tiny_settings
from tests.support.payments import Terms, sign, v2_header
from tests.support.postgres import PostgresServer
from tests.support.server import live_server

PAYER = devchain.PAYER_ACCOUNT
SIMULATED = "bench-simulated"
SLOW = "bench-slow"
SIM_BATCH_MS = 1600
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"imagegate-tests-operator-secret!!").decode()
MAX_TIMEOUT_S = 300


def simulated_model(batch_ms: int, image_ms: int = 0) -> dict[str, Any]:
    return {"name": "Simulated", "backend": "simulated", "source": "simulated", "enabled": True,
            "default_width": 128, "default_height": 128,
            "steps": {"supported": True, "default": 4, "min": 1, "max": 50},
            "guidance": {"mode": "cfg", "default": 1.0}, "negative_prompt": "cfg", "price": {"unit": 1000},
            "options": {"batch_ms": batch_ms, "image_ms": image_ms}}


def jobs_settings(root: Path, tiny_model_paths: dict[str, Path], rpc_url: str, **overrides: Any) -> Settings:
    secret_file = root / "webhook.secret"
    secret_file.write_text(WEBHOOK_SECRET)
    payments = {**network_payments(root, rpc_url), "max_timeout_seconds": MAX_TIMEOUT_S}
    return tiny_settings(
        root, tiny_model_paths, payments=payments,
        models={SIMULATED: simulated_model(SIM_BATCH_MS), SLOW: simulated_model(2000, 7000)},
        jobs={"lease_s": 3, "poll_interval_s": 0.2, "sse_ping_s": 0.5, **overrides.pop("jobs", {})},
        webhooks={"secret_file": str(secret_file), "allow_private_targets": True, "allow_http": True,
                  "retry_schedule_s": [0.3, 0.6, 1.0], "jitter": 0.1, **overrides.pop("webhooks", {})},
        **overrides,
    )


@pytest.fixture(scope="package")
def postgres_url(postgres_server: PostgresServer) -> str:
    """A database of its own on the session's PostgreSQL (tests/support/postgres.py)."""
    return postgres_server.create_database("jobs")


@pytest.fixture(scope="package")
async def chain() -> AsyncIterator[devchain.DevChain]:
    async with devchain.DevChain() as running:
        yield running


@dataclass(frozen=True)
class JobsServer:
    base_url: str
    root: Path


@pytest.fixture(scope="package")
def jobs_server(chain: devchain.DevChain, tmp_path_factory: pytest.TempPathFactory,
                tiny_model_paths: dict[str, Path]) -> Iterator[JobsServer]:
    root = tmp_path_factory.mktemp("jobs-api")
    with live_server(app_from_settings(jobs_settings(root, tiny_model_paths, chain.rpc_url))) as base_url:
        yield JobsServer(base_url, root)


@pytest.fixture
async def http(jobs_server: JobsServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=jobs_server.base_url, timeout=120, trust_env=False) as client:
        yield client


async def amount_of(http: httpx.AsyncClient, body: dict[str, Any]) -> int:
    response = await http.post("/v1/images/estimate", json={k: v for k, v in body.items()
                                                             if not k.startswith("webhook")})
    assert response.status_code == 200, response.text
    return int(response.json()["estimatedCost"]["amount"])


@dataclass
class Paid:
    terms: Terms
    headers: dict[str, str]


async def payment_for(http: httpx.AsyncClient, body: dict[str, Any], *, key: str = PAYER.private_key,
                      **terms: Any) -> Paid:
    """A real EIP-3009 authorization for exactly the estimate (sent as the x402 v2 header)."""
    payment_terms = Terms(await amount_of(http, body), **terms)
    return Paid(payment_terms, v2_header(payment_terms, sign(payment_terms, key)))


async def submit(http: httpx.AsyncClient, body: dict[str, Any], paid: Paid, *,
                 prefer: str = "respond-async", headers: dict[str, str] | None = None) -> httpx.Response:
    return await http.post("/v1/images/generate", json=body,
                           headers={**paid.headers, "Prefer": prefer, **(headers or {})})


async def read_events(http: httpx.AsyncClient, path: str, *, last_event_id: str | None = None,
                      stop_after: int | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, event, data) of an SSE stream until it ends (or ``stop_after`` events: a dropped connection)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[tuple[str, str, dict[str, Any]]] = []
    async with aconnect_sse(http, "GET", path, headers=headers) as source:
        assert source.response.status_code == 200, await source.response.aread()
        async for sse in source.aiter_sse():
            if not sse.data:  # the opening "retry:" frame: no event (browsers dispatch none either)
                continue
            events.append((sse.id, sse.event, json.loads(sse.data)))
            if stop_after is not None and len(events) >= stop_after:
                break
    return events


async def wait_terminal(http: httpx.AsyncClient, job_id: str, *, timeout_s: float = 90.0) -> dict[str, Any]:
    """The job once finished (its events stream ends with the last event)."""
    async with asyncio.timeout(timeout_s):
        events = await read_events(http, f"/v1/jobs/{job_id}/events")
    assert events and events[-1][1] in ("succeeded", "failed", "cancelled", "expired"), events
    response = await http.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200
    job: dict[str, Any] = response.json()
    return job


def payment_key(terms: Terms, payer: str = PAYER.address) -> str:
    return f"{devchain.NETWORK_V2}:{payer.lower()}:0x{terms.nonce.hex()}"


def ledger_url(root: Path) -> str:
    return f"sqlite+aiosqlite:///{root / 'ledger.sqlite3'}"

