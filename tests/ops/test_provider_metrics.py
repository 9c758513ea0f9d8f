"""Revenue and provider cost counters of a hosted model: a real ``imagegate serve`` selling flux-schnell
through the Runware backend (pointed at the local Runware fake), paid on the dev chain."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from imagegate import devchain
from imagegate.backends.provider import usd_to_micros
from tests.backends.fakes import FakeRunware, served
from tests.integration.conftest import network_payments
from tests.ops.conftest import Served, base_config, metric, scrape, serve
from tests.support.payments import Terms, sign, v1_header

RUNWARE_KEY = "rw-live-ops-metrics-TESTKEY"
BODY = {"prompt": "a lighthouse at dusk", "model": "flux-schnell", "width": 256, "height": 256,
        "numberResults": 2, "seed": 11}


@pytest.fixture(scope="module")
def runware() -> Iterator[FakeRunware]:
    with served(FakeRunware(RUNWARE_KEY)) as fake:
        yield fake


@pytest.fixture(scope="module")
def provider_server(ops_chain: devchain.DevChain, runware: FakeRunware,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("ops-provider")
    (root / "runware.key").write_text(RUNWARE_KEY)
    config = base_config(root)
    config["models"]["flux-schnell"] = {"enabled": True, "backend": "runware", "source": "runware:100@1",
                                        "guidance": {"mode": "none"}, "negative_prompt": "none",
                                        "price": {"unit": 20_000}}
    config["providers"] = {"runware": {"base_url": f"{runware.url}/v1", "api_key_file": str(root / "runware.key")}}
    config["payments"] = network_payments(root, ops_chain.rpc_url)
    with serve(root, config) as served_process:
        yield served_process


async def test_revenue_and_provider_cost_by_model(provider_server: Served, runware: FakeRunware) -> None:
    async with httpx.AsyncClient(base_url=provider_server.base_url, timeout=120, trust_env=False) as http:
        before = await scrape(http)
        amount = int((await http.post("/v1/images/estimate", json=BODY)).json()["estimatedCost"]["amount"])
        terms = Terms(amount=amount)
        paid = await http.post("/v1/images/generate", json=BODY, headers=v1_header(terms, sign(terms)))
        assert paid.status_code == 200, paid.text
        after = await scrape(http)
    labels = {"model": "flux-schnell", "network": "base-sepolia", "asset": devchain.USDC_ADDRESS.lower()}
    revenue = metric(after, "imagegate_revenue_atomic_total", **labels) - metric(
        before, "imagegate_revenue_atomic_total", **labels)
    cost = metric(after, "imagegate_provider_cost_atomic_total", **labels) - metric(
        before, "imagegate_provider_cost_atomic_total", **labels)
    # Runware reports its cost per image; two images were rendered.
    assert revenue == amount and cost == 2 * usd_to_micros(runware.cost) > 0
