"""Selling a hosted model end to end: a real imagegate server whose ``flux-schnell`` is served by the
Runware backend (pointed at the local Runware fake), paid through the real dev chain with the builtin
facilitator. No diffusers, no network: every server binds 127.0.0.1.

Checked: the client pays exactly the estimate and gets images at imagegate's own URLs; the ledger
records what Runware charged beside what the client paid; ``imagegate revenue`` prints the margin;
a provider failure answers 503 and moves no money, and the same signed payment works once the
provider is back.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from imagegate import devchain
from imagegate.app import app_from_settings
from imagegate.backends.provider import usd_to_micros
from imagegate.cli import cli
from imagegate.config import load_settings
from imagegate.ledger import GenerationStatus, SqlLedger
from tests.backends.fakes import FakeRunware, color_of, served
from tests.integration.conftest import network_payments
from tests.support.payments import Terms, sign, v1_header
from tests.support.server import live_server

RUNWARE_KEY = "rw-live-5c1d9e7a3b-TESTKEY"
PAYER = devchain.PAYER_ACCOUNT
PAY_TO = devchain.PAY_TO_ACCOUNT.address
# $0.02 per 1024x1024 image at 4 steps -> $0.00125 per 256x256 image: 2500 atomic USDC for two.
PRICE_UNIT = 20_000
BODY = {"prompt": "a lighthouse at dusk", "width": 256, "height": 256, "numberResults": 2, "seed": 11}
ESTIMATE = 2 * 1250


@dataclass
class Gateway:
    url: str
    config: Path
    data_dir: Path
    key_file: Path


@pytest.fixture(scope="module")
def runware() -> Iterator[FakeRunware]:
    with served(FakeRunware(RUNWARE_KEY)) as fake:
        yield fake


@pytest.fixture
def gateway(chain: devchain.DevChain, runware: FakeRunware, tmp_path: Path) -> Iterator[Gateway]:
    """A fresh imagegate (its own ledger and images) selling flux-schnell through Runware."""
    runware.reset()
    key_file = tmp_path / "runware.key"
    key_file.write_text(RUNWARE_KEY)
    config = {
        "data_dir": str(tmp_path / "data"),
        "storage": {"directory": str(tmp_path / "images")},
        "catalog": {"default_model": "flux-schnell"},
        "models": {
            "flux-schnell": {
                "backend": "runware",
                "source": "runware:100@1",
                "guidance": {"mode": "none"},
                "negative_prompt": "none",
                "price": {"unit": PRICE_UNIT},
            }
        },
        "providers": {
            "runware": {
                "base_url": f"{runware.url}/v1",
                # Relative to the config file, read per request.
                "api_key_file": "runware.key",
                "max_retries": 1,
                "backoff_s": 0.01,
                "backoff_max_s": 0.02,
                "retry_after_s": 5,
            }
        },
        "payments": network_payments(tmp_path, chain.rpc_url),
    }
    config_file = tmp_path / "imagegate.toml"
    config_file.write_text(to_toml(config))
    with live_server(app_from_settings(load_settings(config_file))) as url:
        yield Gateway(url, config_file, tmp_path / "data", key_file)


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=120, trust_env=False) as client:
        yield client


def to_toml(document: dict[str, Any]) -> str:
    """Just enough TOML for the config above: every top-level key with an inline value."""

    def key(name: str) -> str:
        return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int | float):
            return repr(item)
        if isinstance(item, str):
            return json.dumps(item)
        if isinstance(item, list):
            return "[" + ", ".join(value(entry) for entry in item) + "]"
        return "{ " + ", ".join(f"{key(k)} = {value(v)}" for k, v in item.items()) + " }"

    return "".join(f"{key(k)} = {value(v)}\n" for k, v in document.items())


async def estimate_amount(http: httpx.AsyncClient, body: dict[str, Any]) -> int:
    response = await http.post("/v1/images/estimate", json=body)
    assert response.status_code == 200, response.text
    return int(response.json()["estimatedCost"]["amount"])


async def payer_transfers(chain: devchain.DevChain, after_block: int) -> list[tuple[str, int, str]]:
    """The payer's token transfers in blocks mined after ``after_block``."""
    return [
        (t.recipient, t.value, t.transaction_hash)
        for t in await chain.token_transfers(from_block=after_block)
        if t.sender == PAYER.address and t.block_number > after_block
    ]


async def ledger_of(gateway: Gateway) -> SqlLedger:
    ledger = SqlLedger(f"sqlite+aiosqlite:///{gateway.data_dir / 'ledger.sqlite3'}")
    await ledger.start()
    return ledger


async def revenue_table(gateway: Gateway) -> dict[str, list[str]]:
    """``imagegate revenue --config <file>``: its rows by first cell."""
    # The command runs its own event loop, so it runs in a thread of its own.
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["revenue", "--config", str(gateway.config)])
    assert result.exit_code == 0, result.output
    rows = {}
    for line in result.output.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│┃|]", line)[1:-1]]
        if cells and cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


async def test_a_paid_generation_through_runware(
    gateway: Gateway, http: httpx.AsyncClient, runware: FakeRunware, chain: devchain.DevChain
) -> None:
    amount = await estimate_amount(http, BODY)
    assert amount == ESTIMATE
    before, pay_to_before = await chain.balance_of(PAYER.address), await chain.balance_of(PAY_TO)
    last_block = await chain.block_number()
    terms = Terms(amount)

    response = await http.post("/v1/images/generate", json=BODY, headers=v1_header(terms, sign(terms)))

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "flux-schnell" and body["cost"]["amount"] == str(amount)

    # Runware got one task for both images, with our key; it reports each image's seed.
    [call] = runware.requests
    assert call.headers["authorization"] == f"Bearer {RUNWARE_KEY}"
    [task] = call.body
    assert (task["model"], task["numberResults"], task["seed"], task["width"]) == ("runware:100@1", 2, 11, 256)

    # The images are imagegate's own (permanent) copies, not Runware's expiring URLs.
    assert [image["seed"] for image in body["images"]] == [11, 12]
    for image in body["images"]:
        assert image["url"].startswith(f"{gateway.url}/images/") and runware.url not in image["url"]
        served_image = await http.get(image["url"])
        assert served_image.status_code == 200 and served_image.headers["content-type"] == "image/png"
        pixels = Image.open(io.BytesIO(served_image.content))
        assert pixels.size == (256, 256) and pixels.convert("RGB").getpixel((0, 0)) == color_of(image["seed"])

    # The payer paid exactly the estimate, in one transfer to the operator.
    transaction = body["cost"]["transaction"]
    assert await chain.balance_of(PAYER.address) == before - amount
    assert await chain.balance_of(PAY_TO) == pay_to_before + amount
    assert await payer_transfers(chain, last_block) == [(PAY_TO, amount, transaction)]

    # The ledger: what the client paid beside what Runware charged ($0.0006 an image, exactly).
    provider_cost = usd_to_micros(runware.cost * 2)
    assert provider_cost == 1200
    ledger = await ledger_of(gateway)
    try:
        record = await ledger.generation(body["id"])
    finally:
        await ledger.aclose()
    assert record is not None and record.status is GenerationStatus.COMPLETED
    assert (record.charged_amount, record.provider_cost_micros) == (amount, provider_cost)

    # imagegate revenue: generations, revenue, provider cost, margin, uncosted (USD).
    rows = await revenue_table(gateway)
    assert rows["flux-schnell"] == ["1", "0.002500", "0.001200", "0.001300", "0"]
    assert rows["total"][1:4] == ["0.002500", "0.001200", "0.001300"]


@pytest.mark.parametrize(
    ("failure", "status", "error", "attempts"),
    [
        # Retried (1 + max_retries attempts), then 503 with the provider settings' Retry-After.
        ("persistent 500", 503, "UPSTREAM_UNAVAILABLE", 2),
        # The operator's key is refused: not retried, 503 (and a warning for the operator).
        ("rejected key", 503, "UPSTREAM_UNAVAILABLE", 1),
        # Runware's content check flags the second image: nothing is returned or charged.
        ("safety checker", 500, "INTERNAL_ERROR", 1),
    ],
)
async def test_a_provider_failure_is_not_paid_and_the_payment_stays_usable(
    failure: str,
    status: int,
    error: str,
    attempts: int,
    gateway: Gateway,
    http: httpx.AsyncClient,
    runware: FakeRunware,
    chain: devchain.DevChain,
) -> None:
    amount = await estimate_amount(http, BODY)
    terms = Terms(amount)
    headers = v1_header(terms, sign(terms))
    before, last_block = await chain.balance_of(PAYER.address), await chain.block_number()
    if failure == "persistent 500":
        runware.fail_next(500, "Internal server error", times=10)
    elif failure == "rejected key":
        gateway.key_file.write_text("rw-revoked-key")
    else:
        runware.nsfw_seeds = {12}

    failed = await http.post("/v1/images/generate", json=BODY, headers=headers)

    assert failed.status_code == status, failed.text
    assert failed.json()["error"] == error
    if status == 503:
        assert failed.headers["retry-after"] == "5"
    else:
        assert failed.json()["details"] == {"reason": "provider_safety_checker"}
    assert len(runware.requests) == attempts
    # Not settled: no money moved, and nothing counts as revenue.
    assert await chain.balance_of(PAYER.address) == before
    assert await payer_transfers(chain, last_block) == []
    ledger = await ledger_of(gateway)
    try:
        assert await ledger.revenue_by_model() == []
    finally:
        await ledger.aclose()

    # The provider is back (or the operator fixed the key): the same signed payment now buys the images.
    runware.failures.clear()
    gateway.key_file.write_text(RUNWARE_KEY)
    runware.nsfw_seeds = set()
    retried = await http.post("/v1/images/generate", json=BODY, headers=headers)

    assert retried.status_code == 200, retried.text
    assert [image["seed"] for image in retried.json()["images"]] == [11, 12]
    assert await chain.balance_of(PAYER.address) == before - amount
    assert await payer_transfers(chain, last_block) == [(PAY_TO, amount, retried.json()["cost"]["transaction"])]
    rows = await revenue_table(gateway)
    assert rows["flux-schnell"] == ["1", "0.002500", "0.001200", "0.001300", "0"]
