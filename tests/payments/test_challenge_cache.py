"""402 challenges from memory (``payments.challenge_cache``): the same answer the route gives, per body
and origin, and nothing but unpaid requests that would get a 402 is answered from it. A real server
on loopback; the challenge needs no chain (its RPC is a closed port)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from imagegate import devchain
from imagegate.app import app_from_settings
from imagegate.config import load_settings
from tests.support.server import free_port, live_server

BODY = {"prompt": "a red circle", "model": "bench-simulated", "width": 128, "height": 128, "steps": 1}


@pytest.fixture(scope="module")
async def api(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    root = tmp_path_factory.mktemp("challenge-cache")
    key_file = root / "gas.key"
    key_file.write_text(devchain.FACILITATOR_ACCOUNT.private_key)
    settings = load_settings(
        data_dir=root, storage={"directory": str(root / "images")},
        models={"bench-simulated": {"enabled": True}},
        payments={"mode": "network",
                  "options": [{"network": "base-sepolia", "pay_to": devchain.PAY_TO_ACCOUNT.address}],
                  "facilitator": {"kind": "builtin", "rpc_url": f"http://127.0.0.1:{free_port()}",
                                  "private_key_file": str(key_file)}},
    )
    with live_server(app_from_settings(settings)) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=60, trust_env=False) as client:
            yield client


def challenge_of(response: httpx.Response) -> tuple[dict[str, Any], dict[str, Any]]:
    return response.json(), json.loads(base64.b64decode(response.headers["payment-required"]))


async def test_the_402_from_memory_is_the_routes_own(api: httpx.AsyncClient) -> None:
    first = await api.post("/v1/images/generate", json=BODY)
    second = await api.post("/v1/images/generate", json=BODY)
    assert first.status_code == second.status_code == 402
    assert first.content == second.content and first.headers["payment-required"] == second.headers["payment-required"]
    # Whitespace past the size worth remembering: the same request, answered by the route itself.
    padded = json.dumps(BODY) + " " * 5000
    from_route = await api.post("/v1/images/generate", content=padded, headers={"content-type": "application/json"})
    assert from_route.status_code == 402
    assert challenge_of(from_route) == challenge_of(second)
    assert second.headers["cache-control"] == "no-store"
    assert challenge_of(second)[0]["accepts"][0]["maxAmountRequired"] == challenge_of(second)[1]["accepts"][0]["amount"]


async def test_it_remembers_per_origin(api: httpx.AsyncClient) -> None:
    resources = set()
    for host in ("a.example", "b.example", "a.example"):
        response = await api.post("/v1/images/generate", json=BODY, headers={"host": host})
        body, header = challenge_of(response)
        assert body["accepts"][0]["resource"] == header["resource"]["url"] == f"http://{host}/v1/images/generate"
        resources.add(header["resource"]["url"])
    assert len(resources) == 2


async def test_other_answers_come_from_the_route(api: httpx.AsyncClient) -> None:
    for _ in range(2):
        invalid = await api.post("/v1/images/generate", json={**BODY, "width": 100})
        assert invalid.status_code == 400 and invalid.json()["error"] == "INVALID_DIMENSIONS"
    await api.post("/v1/images/generate", json=BODY)  # remembered now
    # A payment header is never answered from memory: this one is malformed, and the route says so.
    paid = await api.post("/v1/images/generate", json=BODY, headers={"X-PAYMENT": "not base64!"})
    assert paid.status_code == 402 and paid.json()["reason"] == "invalid_payload"
    unpaid = await api.post("/v1/images/generate", json=BODY)
    assert unpaid.json()["reason"] == "payment_required"


async def test_browsers_get_the_cors_headers_on_a_remembered_402(api: httpx.AsyncClient) -> None:
    await api.post("/v1/images/generate", json=BODY)
    response = await api.post("/v1/images/generate", json=BODY, headers={"Origin": "https://app.example"})
    assert response.status_code == 402
    assert response.headers["access-control-allow-origin"] in ("*", "https://app.example")
    assert "PAYMENT-REQUIRED" in response.headers["access-control-expose-headers"].upper()


async def test_the_benchmark_model_is_listed_as_benchmark_only(api: httpx.AsyncClient) -> None:
    models = {entry["id"]: entry for entry in (await api.get("/v1/images/models")).json()["models"]}
    assert models["bench-simulated"]["benchmarkOnly"] is True and models["bench-simulated"]["default"] is False
    assert not any(entry["benchmarkOnly"] for model_id, entry in models.items() if model_id != "bench-simulated")


