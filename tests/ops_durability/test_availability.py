"""Honest availability: a model whose weights would have to come from the hub is listed available only
while the hub (``HF_ENDPOINT``) serves them, and nobody is asked to pay for it otherwise.

The hub is always a loopback stand-in (``tests.support.fake_hub``); nothing here reaches the real one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import huggingface_hub.constants
import pytest

from imagegate.backends.base import Availability
from imagegate.backends.diffusers import DiffusersBackend
from imagegate.catalog import ModelSpec, build_catalog
from imagegate.config import load_settings
from imagegate.devchain import PAYER_ACCOUNT as PAYER
from tests.support.fake_hub import FakeHub, fake_hub
from tests.support.payer import SdkPayer
from tests.support.payments import decode_header
from tests.support.serve import ServeProcess, embedded_config, eventually
from tests.support.server import free_port

REPO = "imagegate-tests/never-cached-pipeline"
MODEL = {"source": REPO, "requires_cuda": False, "dtype": "float32", "memory_gb": 0.05}


@pytest.fixture
def hub_reachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Downloads allowed and not offline (the suite sets HF_HUB_OFFLINE), an empty hub cache."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
async def backend(hub_reachable: None) -> AsyncIterator[Any]:
    created: list[DiffusersBackend] = []

    def make(**diffusers: Any) -> tuple[ModelSpec, DiffusersBackend]:
        settings = load_settings(models={"sd-turbo": MODEL},
                                 diffusers={"allow_downloads": True, "hub_probe_timeout_s": 1.0, **diffusers})
        created.append(DiffusersBackend(settings))
        return build_catalog(settings)["sd-turbo"], created[-1]

    yield make
    for made in created:
        await made.aclose()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with fake_hub() as running:
        monkeypatch.setenv("HF_ENDPOINT", running.url)
        yield running


@pytest.mark.parametrize(("mode", "available", "reason"), [
    ("serving", True, "downloads from the Hugging Face hub"),
    ("down", False, "answered 503"),
    ("gated", False, "refuses access"),
    ("missing", False, "no such pipeline"),
])
async def test_the_probe_tells_why(backend: Any, hub: FakeHub, mode: str, available: bool, reason: str) -> None:
    hub.mode = mode  # type: ignore[assignment]
    spec, made = backend()
    availability = await made.availability(spec)
    assert availability.available is available and reason in (availability.reason or ""), availability
    assert hub.requests == [("HEAD", f"/{REPO}/resolve/main/model_index.json")]
    if not available:
        assert availability.retry_after is not None and availability.retry_after > 0


async def test_an_unreachable_or_hanging_hub_is_unavailable_within_the_probe_timeout(
        backend: Any, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    spec, made = backend()
    availability = await made.availability(spec)
    assert not availability.available and "unreachable" in (availability.reason or "")

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    hub.delay_s = 4  # beyond the probe's 1 s timeout
    spec, made = backend()
    started = time.monotonic()
    availability = await made.availability(spec)
    assert time.monotonic() - started < 3.5
    assert not availability.available and "unreachable" in (availability.reason or "")


async def test_reprobed_periodically_without_being_asked(backend: Any, hub: FakeHub) -> None:
    hub.mode = "down"
    spec, made = backend(hub_probe_interval_s=0.5)
    assert not (await made.availability(spec)).available
    hub.mode = "serving"
    # Nobody asks: the backend probes again on its own.
    async def probed_again() -> bool:
        return len(hub.requests) >= 3

    assert await eventually(probed_again, 30)
    availability: Availability = await made.availability(spec)
    assert availability.available, availability
    # Answered from the last probe: asking does not probe.
    probes = len(hub.requests)
    for _ in range(5):
        await made.availability(spec)
    assert len(hub.requests) - probes <= 1


# --- over HTTP, against a real imagegate serve on the dev chain -----------------------------------


@pytest.fixture
def serve(tmp_path: Path, hub: FakeHub) -> Iterator[ServeProcess]:
    extra = f"""
[diffusers]
allow_downloads = true
hub_probe_timeout_s = 2
hub_probe_interval_s = 300

[models.sd-turbo]
source = "{REPO}"
requires_cuda = false
dtype = "float32"
memory_gb = 0.05
"""
    server = ServeProcess(tmp_path, embedded_config(tmp_path) + extra, env={
        "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")})
    try:
        yield server
    finally:
        server.cleanup()


async def test_listed_as_the_hub_allows_and_never_paid_for_when_unavailable(serve: ServeProcess,
                                                                           hub: FakeHub) -> None:
    body = {"prompt": "a red circle", "model": "sd-turbo", "width": 128, "height": 128}
    await serve.start_ready()
    # Probed at startup, in the background: nobody has asked for the models yet.
    probe = ("HEAD", f"/{REPO}/resolve/main/model_index.json")

    async def probed() -> bool:
        return probe in hub.requests

    assert await eventually(probed, 60)
    async with httpx.AsyncClient(base_url=serve.url, timeout=120, trust_env=False) as http:
        assert (await _listed(http))["available"] is True
        amount = int((await http.post("/v1/images/estimate", json=body)).json()["estimatedCost"]["amount"])
        payer = SdkPayer(PAYER.private_key, max_atomic=amount)
        headers = await payer.sign(http, "/v1/images/generate", body)

        # The hub goes away; the listing cannot know before the next probe. A paid request then fails
        # to load the weights: 503, its payment released (nothing charged), and the hub re-probed.
        hub.mode = "down"
        failed = await http.post("/v1/images/generate", json=body, headers=headers)
        assert failed.status_code == 503 and failed.json()["error"] == "MODEL_UNAVAILABLE", failed.text
        assert serve.ledger_rows("SELECT status FROM payments") == [("released",)]
        async def listed_unavailable() -> bool:
            return (await _listed(http))["available"] is False

        assert await eventually(listed_unavailable, 30)
        assert "answered 503" in (await _listed(http))["unavailableReason"]

        # Now nobody is asked to pay for it: 503 before any payment step, even with a payment in hand.
        unpaid = await http.post("/v1/images/generate", json=body)
        assert unpaid.status_code == 503 and unpaid.json()["error"] == "MODEL_UNAVAILABLE", unpaid.text
        assert "PAYMENT-REQUIRED" not in unpaid.headers and int(unpaid.headers["retry-after"]) > 0
        paid = await http.post("/v1/images/generate", json=body, headers=headers)
        assert paid.status_code == 503 and paid.json()["error"] == "MODEL_UNAVAILABLE"
        assert serve.ledger_rows("SELECT status FROM payments") == [("released",)]
    chain = await serve.chain()
    try:
        nonce = decode_header(headers["PAYMENT-SIGNATURE"])["payload"]["authorization"]["nonce"]
        assert not await chain.authorization_state(PAYER.address, bytes.fromhex(nonce[2:]))
    finally:
        await chain.stop()
    await serve.stop()


async def _listed(http: httpx.AsyncClient) -> dict[str, Any]:
    models = (await http.get("/v1/images/models")).json()["models"]
    entry: dict[str, Any] = next(m for m in models if m["id"] == "sd-turbo")
    return entry
