"""x402 payments end to end: a real server on loopback, the real dev chain, real x402 clients.

Every paid test checks the money, not just the status: the payer's balance falls by exactly the
estimate, the transfer is on chain, and failed requests move nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from imagegate import devchain
from imagegate.app import app_from_settings
from imagegate.payments.client import post_with_payment
from imagegate.payments.x402 import MIN_VALIDITY_LEFT_S
from tests.integration.conftest import tiny_settings
from tests.support.payments import Terms, decode_header, sign, v1_header, v2_header
from tests.support.server import free_port, live_server, wait_healthy

REPO = Path(__file__).resolve().parents[2]
CLIENTS = REPO / "tests" / "integration" / "clients"
PAYER = devchain.PAYER_ACCOUNT
PAY_TO = devchain.PAY_TO_ACCOUNT.address
SMALL = {"prompt": "a small red circle", "width": 128, "height": 128}


@pytest.fixture(scope="module")
async def chain() -> AsyncIterator[devchain.DevChain]:
    async with devchain.DevChain() as running:
        yield running


def paid_settings(root: Path, tiny_model_paths: dict[str, Path], rpc_url: str, **facilitator: Any) -> Any:
    root.mkdir(parents=True, exist_ok=True)
    key_file = root / "facilitator.key"
    key_file.write_text(devchain.FACILITATOR_ACCOUNT.private_key)
    return tiny_settings(root, tiny_model_paths, payments={
        "mode": "network",
        "options": [{"network": "base-sepolia", "pay_to": PAY_TO}],
        "facilitator": {"kind": "builtin", "rpc_url": rpc_url, "private_key_file": str(key_file), **facilitator},
        "reconcile_rpc_url": rpc_url,
    })


@pytest.fixture(scope="module")
def api(chain: devchain.DevChain, tmp_path_factory: pytest.TempPathFactory,
        tiny_model_paths: dict[str, Path]) -> Iterator[str]:
    settings = paid_settings(tmp_path_factory.mktemp("paid-api"), tiny_model_paths, chain.rpc_url)
    with live_server(app_from_settings(settings)) as base_url:
        yield base_url


@pytest.fixture
async def http(api: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api, timeout=300, trust_env=False) as client:
        yield client


async def estimate_amount(http: httpx.AsyncClient, body: dict[str, Any]) -> int:
    response = await http.post("/v1/images/estimate", json=body)
    assert response.status_code == 200, response.text
    return int(response.json()["estimatedCost"]["amount"])


async def assert_no_money_moved(chain: devchain.DevChain, before: int, from_block: int) -> None:
    assert await chain.balance_of(PAYER.address) == before
    assert [t for t in await chain.token_transfers(from_block=from_block) if t.sender == PAYER.address] == []


# 1. The challenge


async def test_challenge_has_both_protocol_versions(http: httpx.AsyncClient, api: str) -> None:
    body = {**SMALL, "numberResults": 2}
    amount = await estimate_amount(http, body)
    response = await http.post("/v1/images/generate", json=body, headers={"Origin": "https://app.example"})
    assert response.status_code == 402
    challenge = response.json()
    assert challenge["x402Version"] == 1 and challenge["error"] == "PAYMENT_REQUIRED" and challenge["message"]
    (accept,) = challenge["accepts"]
    assert accept["scheme"] == "exact" and accept["network"] == "base-sepolia"
    assert accept["maxAmountRequired"] == str(amount) and accept["asset"] == devchain.USDC_ADDRESS
    assert accept["payTo"] == PAY_TO and accept["resource"] == f"{api}/v1/images/generate"
    assert accept["mimeType"] == "application/json" and accept["description"]
    assert isinstance(accept["maxTimeoutSeconds"], int) and accept["maxTimeoutSeconds"] >= 120
    assert accept["extra"] == {"name": "USDC", "version": "2"}
    assert accept["outputSchema"]["input"]["method"] == "POST"
    assert "prompt" in accept["outputSchema"]["input"]["bodyFields"]
    v2 = decode_header(response.headers["PAYMENT-REQUIRED"])
    assert v2["x402Version"] == 2 and v2["resource"]["url"] == f"{api}/v1/images/generate"
    (accept_v2,) = v2["accepts"]
    assert (accept_v2["network"], accept_v2["amount"], accept_v2["payTo"]) == ("eip155:84532", str(amount), PAY_TO)
    assert response.headers["access-control-allow-origin"] in ("*", "https://app.example")
    exposed = response.headers["access-control-expose-headers"].upper()
    assert {"X-PAYMENT-RESPONSE", "PAYMENT-RESPONSE", "PAYMENT-REQUIRED"} <= set(map(str.strip, exposed.split(",")))


async def test_cors_preflight(http: httpx.AsyncClient) -> None:
    response = await http.options("/v1/images/generate", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-payment,payment-signature,access-control-expose-headers"})
    assert response.status_code == 200
    allowed = response.headers["access-control-allow-headers"].lower()
    for header in ("content-type", "x-payment", "payment-signature", "access-control-expose-headers"):
        assert header in allowed


async def test_bad_bodies_get_400_before_any_payment(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/images/generate", json={"prompt": "a cat", "width": 100})
    assert response.status_code == 400 and response.json()["error"] == "INVALID_DIMENSIONS"


# 2. Paying with the Python x402 SDK client


async def test_python_x402_client_pays_exactly_the_estimate(http: httpx.AsyncClient, api: str,
                                                            chain: devchain.DevChain) -> None:
    body = {**SMALL, "numberResults": 2, "seed": 5}
    amount = await estimate_amount(http, body)
    before, pay_to_before = await chain.balance_of(PAYER.address), await chain.balance_of(PAY_TO)
    paid = await post_with_payment(f"{api}/v1/images/generate", body, PAYER.private_key, max_atomic=amount)
    assert paid.status == 200, paid.body
    assert paid.payment_response is not None and paid.payment_response["success"] is True
    receipt = await chain.transaction_receipt(paid.payment_response["transaction"])
    assert receipt is not None and int(receipt["status"], 16) == 1
    assert await chain.balance_of(PAYER.address) == before - amount
    assert await chain.balance_of(PAY_TO) == pay_to_before + amount
    assert paid.body["cost"]["amount"] == str(amount) and paid.body["cost"]["transaction"]
    for image in paid.body["images"]:
        assert (await http.get(image["url"])).status_code == 200


# 3. Paying with the npm clients, as the spec's examples are written


async def run_node(script: str, env: dict[str, str]) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        shutil.which("node") or "node", str(CLIENTS / script), cwd=REPO,
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=300)
    assert process.returncode == 0, stderr.decode()
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("example", ["1", "3", "4", "5", "8"])
async def test_x402_fetch_v1_runs_the_spec_examples(example: str, api: str, http: httpx.AsyncClient,
                                                    chain: devchain.DevChain) -> None:
    from_block = await chain.block_number() + 1
    before = await chain.balance_of(PAYER.address)
    result = await run_node("x402_fetch_v1.mjs", {"BASE_URL": api, "PRIVATE_KEY": PAYER.private_key,
                                                  "EXAMPLE": example})
    assert result["status"] == 200, result
    body = result["body"]
    assert body["model"] == "flux-schnell"
    payment = result["paymentResponse"]
    assert payment["success"] is True and payment["network"] == "base-sepolia" and payment["payer"] == PAYER.address
    assert payment["transaction"] == payment["transactionHash"]
    amount = int(body["cost"]["amount"])
    assert await chain.balance_of(PAYER.address) == before - amount
    transfers = [t for t in await chain.token_transfers(from_block=from_block) if t.sender == PAYER.address]
    assert [(t.recipient, t.value, t.transaction_hash) for t in transfers] == [(PAY_TO, amount, payment["transaction"])]
    for image in body["images"]:
        assert (await http.get(image["url"])).status_code == 200


async def test_x402_fetch_v2_pays(api: str, http: httpx.AsyncClient, chain: devchain.DevChain) -> None:
    before = await chain.balance_of(PAYER.address)
    result = await run_node("x402_fetch_v2.mjs", {"BASE_URL": api, "PRIVATE_KEY": PAYER.private_key,
                                                  "EXAMPLE": "1"})
    assert result["status"] == 200, result
    payment = result["paymentResponse"]
    assert payment["success"] is True and payment["network"] == "eip155:84532"
    amount = int(result["body"]["cost"]["amount"])
    assert payment["amount"] == str(amount)
    assert await chain.balance_of(PAYER.address) == before - amount
    receipt = await chain.transaction_receipt(payment["transaction"])
    assert receipt is not None and int(receipt["status"], 16) == 1


# 4. Attacks and faults


async def expect_402(http: httpx.AsyncClient, headers: dict[str, str], reason: str,
                     body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = await http.post("/v1/images/generate", json=body or SMALL, headers=headers)
    assert response.status_code == 402, response.text
    challenge: dict[str, Any] = response.json()
    assert challenge["error"] == "PAYMENT_REQUIRED" and challenge["reason"] == reason, challenge
    assert challenge["accepts"], "a refused payment still gets the requirements to pay correctly"
    return challenge


async def test_malformed_headers(http: httpx.AsyncClient) -> None:
    await expect_402(http, {"X-PAYMENT": "%%%not-base64%%%"}, "invalid_payload")
    await expect_402(http, {"X-PAYMENT": base64.b64encode(b"{not json").decode()}, "invalid_payload")
    await expect_402(http, {"PAYMENT-SIGNATURE": base64.b64encode(b'{"x402Version": 2}').decode()}, "invalid_payload")
    await expect_402(http, {"X-PAYMENT": base64.b64encode(b'{"x402Version": 7}').decode()}, "invalid_payload")


async def test_mismatched_terms(http: httpx.AsyncClient, chain: devchain.DevChain) -> None:
    amount = await estimate_amount(http, SMALL)
    before, from_block = await chain.balance_of(PAYER.address), await chain.block_number() + 1
    other = Account.create().address
    wrong_pay_to = Terms(amount, pay_to=other)
    await expect_402(http, v1_header(wrong_pay_to, sign(wrong_pay_to)), "invalid_exact_evm_payload_recipient_mismatch")
    await expect_402(http, v2_header(wrong_pay_to, sign(wrong_pay_to)), "invalid_exact_evm_payload_recipient_mismatch")
    too_little = Terms(amount - 1)
    value_mismatch = "invalid_exact_evm_payload_authorization_value_mismatch"
    await expect_402(http, v1_header(too_little, sign(too_little)), value_mismatch)
    await expect_402(http, v2_header(too_little, sign(too_little)), value_mismatch)
    wrong_network = Terms(amount, network_v1="base", network_v2="eip155:8453")
    await expect_402(http, v1_header(wrong_network, sign(wrong_network)), "network_mismatch")
    wrong_asset = Terms(amount, asset="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913")
    await expect_402(http, v2_header(wrong_asset, sign(wrong_asset)), "invalid_exact_evm_asset_mismatch")
    await assert_no_money_moved(chain, before, from_block)


async def test_time_window(http: httpx.AsyncClient, chain: devchain.DevChain) -> None:
    amount = await estimate_amount(http, SMALL)
    before, from_block = await chain.balance_of(PAYER.address), await chain.block_number() + 1
    expired = Terms(amount, valid_before=int(time.time()) - 1)
    await expect_402(http, v1_header(expired, sign(expired)), "invalid_exact_evm_payload_authorization_valid_before")
    future = Terms(amount, valid_after=int(time.time()) + 3600)
    await expect_402(http, v1_header(future, sign(future)), "invalid_exact_evm_payload_authorization_valid_after")
    await assert_no_money_moved(chain, before, from_block)


async def test_bad_signature_and_insufficient_balance(http: httpx.AsyncClient, chain: devchain.DevChain) -> None:
    amount = await estimate_amount(http, SMALL)
    before, from_block = await chain.balance_of(PAYER.address), await chain.block_number() + 1
    forged = Terms(amount)
    await expect_402(http, v1_header(forged, sign(forged, signer_key=Account.create().key.hex())),
                     "invalid_exact_evm_payload_signature")
    pauper = Account.create()
    broke = Terms(amount)
    await expect_402(http, v1_header(broke, sign(broke, private_key=pauper.key.hex())),
                     "invalid_exact_evm_insufficient_balance")
    await assert_no_money_moved(chain, before, from_block)


async def test_resending_a_settled_payment_returns_the_same_result(http: httpx.AsyncClient,
                                                                  chain: devchain.DevChain) -> None:
    amount = await estimate_amount(http, SMALL)
    terms = Terms(amount)
    headers = v1_header(terms, sign(terms))
    first = await http.post("/v1/images/generate", json=SMALL, headers=headers)
    assert first.status_code == 200, first.text
    balance = await chain.balance_of(PAYER.address)
    again = await http.post("/v1/images/generate", json=SMALL, headers=headers)
    assert again.status_code == 200
    assert again.json()["images"] == first.json()["images"] and again.json()["id"] == first.json()["id"]
    assert decode_header(again.headers["X-PAYMENT-RESPONSE"]) == decode_header(first.headers["X-PAYMENT-RESPONSE"])
    assert await chain.balance_of(PAYER.address) == balance
    # The same payment cannot buy a different image.
    await expect_402(http, headers, "payment_used_for_another_request", body={**SMALL, "prompt": "a blue circle"})


async def test_twenty_concurrent_copies_of_one_payment(http: httpx.AsyncClient, chain: devchain.DevChain) -> None:
    body = {**SMALL, "prompt": "twenty at once"}
    amount = await estimate_amount(http, body)
    terms = Terms(amount)
    headers = v2_header(terms, sign(terms))
    before, from_block = await chain.balance_of(PAYER.address), await chain.block_number() + 1
    responses = await asyncio.gather(*(http.post("/v1/images/generate", json=body, headers=headers)
                                       for _ in range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    assert len({r.json()["id"] for r in responses}) == 1, "exactly one generation"
    assert await chain.balance_of(PAYER.address) == before - amount
    to_token = await chain.transactions_to(devchain.USDC_ADDRESS, from_block=from_block)
    assert len(to_token) == 1 and [tx.status for tx in to_token] == [1], "one transfer, zero reverted"


async def test_generation_failure_is_not_settled_and_the_payment_stays_usable(
        http: httpx.AsyncClient, chain: devchain.DevChain, tiny_model_paths: dict[str, Path]) -> None:
    weights = next((tiny_model_paths["sdxl"] / "unet").glob("*.safetensors"))
    good = weights.read_bytes()
    body = {**SMALL, "model": "sdxl"}
    amount = await estimate_amount(http, body)
    terms = Terms(amount)
    headers = v1_header(terms, sign(terms))
    before, from_block = await chain.balance_of(PAYER.address), await chain.block_number() + 1
    weights.write_bytes(b"corrupted weights")
    try:
        failed = await http.post("/v1/images/generate", json=body, headers=headers)
    finally:
        weights.write_bytes(good)
    assert failed.status_code in (500, 503) and failed.json()["error"] in ("INTERNAL_ERROR", "MODEL_UNAVAILABLE")
    await assert_no_money_moved(chain, before, from_block)
    retried = await http.post("/v1/images/generate", json=body, headers=headers)
    assert retried.status_code == 200, retried.text
    assert await chain.balance_of(PAYER.address) == before - amount


async def test_unreachable_facilitator_or_rpc_is_503_and_nobody_pays(
        chain: devchain.DevChain, tmp_path: Path, tiny_model_paths: dict[str, Path]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for name, settings in (
        ("rpc", paid_settings(tmp_path / "rpc", tiny_model_paths, dead)),
        ("facilitator", paid_settings(tmp_path / "fac", tiny_model_paths, chain.rpc_url, kind="http", url=dead)),
    ):
        with live_server(app_from_settings(settings)) as base_url:
            async with httpx.AsyncClient(base_url=base_url, timeout=60, trust_env=False) as client:
                amount = await estimate_amount(client, SMALL)
                terms = Terms(amount)
                before = await chain.balance_of(PAYER.address)
                response = await client.post("/v1/images/generate", json=SMALL, headers=v1_header(terms, sign(terms)))
                assert response.status_code == 503, (name, response.text)
                assert response.json()["error"] == "PAYMENT_UNAVAILABLE" and response.headers["retry-after"]
                assert await chain.balance_of(PAYER.address) == before


# 5. The standard facilitator API, served by `imagegate facilitator`


@pytest.fixture(scope="module")
def facilitator_url(chain: devchain.DevChain) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "imagegate", "facilitator", "--rpc-url", chain.rpc_url, "--port", str(port)],
        env={**os.environ, "IMAGEGATE_FACILITATOR_KEY": devchain.FACILITATOR_ACCOUNT.private_key},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/healthz", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError as exc:
                if process.poll() is not None:
                    message = process.stderr.read().decode() if process.stderr else "facilitator died"
                    raise RuntimeError(message) from exc
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


async def test_http_facilitator_server(facilitator_url: str, chain: devchain.DevChain, tmp_path: Path,
                                       tiny_model_paths: dict[str, Path]) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        supported = (await client.get(f"{facilitator_url}/supported")).json()
    assert any(kind["network"] == "eip155:84532" for kind in supported["kinds"])
    settings = paid_settings(tmp_path, tiny_model_paths, chain.rpc_url, kind="http", url=facilitator_url)
    with live_server(app_from_settings(settings)) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=120, trust_env=False) as client:
            amount = await estimate_amount(client, SMALL)
        before = await chain.balance_of(PAYER.address)
        paid = await post_with_payment(f"{base_url}/v1/images/generate", SMALL, PAYER.private_key, max_atomic=amount)
        assert paid.status == 200, paid.body
        assert paid.payment_response is not None and paid.payment_response["success"] is True
        assert await chain.balance_of(PAYER.address) == before - amount


def slow_settle_proxy(upstream: str, delay_s: float) -> Any:
    """A facilitator front that settles for real but answers /settle too late (a lost response)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def forward(request: Request) -> Response:
        async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
            upstream_response = await client.request(request.method, f"{upstream}{request.url.path}",
                                                     content=await request.body(),
                                                     headers={"content-type": "application/json"})
        if request.url.path == "/settle":
            await asyncio.sleep(delay_s)
        return Response(upstream_response.content, status_code=upstream_response.status_code,
                        media_type="application/json")

    return Starlette(routes=[Route(path, forward, methods=["GET", "POST"])
                             for path in ("/verify", "/settle", "/supported")])


async def test_unknown_settlement_outcome_is_reconciled_not_charged_twice(
        facilitator_url: str, chain: devchain.DevChain, tmp_path: Path, tiny_model_paths: dict[str, Path]) -> None:
    with live_server(slow_settle_proxy(facilitator_url, delay_s=4)) as proxy_url:
        settings = paid_settings(tmp_path, tiny_model_paths, chain.rpc_url, kind="http", url=proxy_url, timeout_s=2)
        with live_server(app_from_settings(settings)) as base_url:
            async with httpx.AsyncClient(base_url=base_url, timeout=120, trust_env=False) as client:
                amount = await estimate_amount(client, SMALL)
                terms = Terms(amount)
                headers = v1_header(terms, sign(terms))
                before = await chain.balance_of(PAYER.address)
                pending = await client.post("/v1/images/generate", json=SMALL, headers=headers)
                assert pending.status_code == 202, pending.text
                assert pending.json()["error"] == "SETTLEMENT_PENDING" and pending.headers["retry-after"]
                # The transfer did land (the facilitator settled; only its answer was lost).
                await asyncio.sleep(1)
                assert await chain.balance_of(PAYER.address) == before - amount
                resent = await client.post("/v1/images/generate", json=SMALL, headers=headers)
                assert resent.status_code == 200, resent.text
                receipt = decode_header(resent.headers["X-PAYMENT-RESPONSE"])
                assert receipt["success"] is True and receipt["transaction"].startswith("0x")
                assert (await client.get(resent.json()["images"][0]["url"])).status_code == 200
                assert await chain.balance_of(PAYER.address) == before - amount


async def test_a_known_payment_close_to_expiry_gets_its_outcome_not_a_402(
        chain: devchain.DevChain, tmp_path: Path, tiny_model_paths: dict[str, Path]) -> None:
    """A payment must have MIN_VALIDITY_LEFT_S of validity left to be taken on (to render and settle in),
    not to be answered: resent in its last seconds, one whose transfer is still in the mempool stays 202
    SETTLEMENT_PENDING (a 402 would invite a second signature while the first may still land), and a
    settled one returns its images."""
    settings = paid_settings(tmp_path, tiny_model_paths, chain.rpc_url, confirmation_timeout_s=1)
    with live_server(app_from_settings(settings)) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=120, trust_env=False) as client:
            amount = await estimate_amount(client, SMALL)
            # Its last MIN_VALIDITY_LEFT_S seconds begin 10 s from now.
            terms = Terms(amount, valid_before=int(time.time()) + MIN_VALIDITY_LEFT_S + 10)
            headers = v2_header(terms, sign(terms))
            before = await chain.balance_of(PAYER.address)
            await chain.rpc("evm_setAutomine", False)  # the transfer waits in the mempool
            try:
                pending = await client.post("/v1/images/generate", json=SMALL, headers=headers)
                assert pending.status_code == 202 and pending.json()["error"] == "SETTLEMENT_PENDING", pending.text
                await asyncio.sleep(max(0.0, terms.valid_before - MIN_VALIDITY_LEFT_S + 1 - time.time()))
                still = await client.post("/v1/images/generate", json=SMALL, headers=headers)
                assert still.status_code == 202 and still.json()["error"] == "SETTLEMENT_PENDING", still.text
            finally:
                await chain.rpc("evm_setAutomine", True)
                await chain.mine()
            assert terms.valid_before - time.time() < MIN_VALIDITY_LEFT_S
            settled = await client.post("/v1/images/generate", json=SMALL, headers=headers)
            assert settled.status_code == 200, settled.text
            again = await client.post("/v1/images/generate", json=SMALL, headers=headers)
            assert again.status_code == 200 and again.json()["id"] == settled.json()["id"], again.text
            assert (await client.get(settled.json()["images"][0]["url"])).status_code == 200
            assert await chain.balance_of(PAYER.address) == before - amount


async def test_generate_command_shows_the_price_caps_it_and_pays(api: str, chain: devchain.DevChain,
                                                                tmp_path: Path) -> None:
    key_file = tmp_path / "payer.key"
    key_file.write_text(PAYER.private_key)
    command = [sys.executable, "-m", "imagegate", "generate", "a small red circle", "--url", api, "--width", "128",
               "--height", "128", "-n", "2", "--seed", "9", "--key-file", str(key_file), "--out", str(tmp_path / "out")]
    before = await chain.balance_of(PAYER.address)
    refused = await asyncio.to_thread(subprocess.run, [*command, "--max-usd", "0.0001"], capture_output=True,
                                      text=True, timeout=120)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "Price: $0.000218" in refused.stdout and "Refusing to pay" in refused.stdout
    assert await chain.balance_of(PAYER.address) == before
    paid = await asyncio.to_thread(subprocess.run, [*command, "--max-usd", "0.01"], capture_output=True, text=True,
                                   timeout=300)
    assert paid.returncode == 0, paid.stdout + paid.stderr
    assert "success=True" in paid.stdout and "transaction 0x" in paid.stdout
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    assert await chain.balance_of(PAYER.address) == before - 218


def _serve(config: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "imagegate", "serve", "--config", str(config), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_a_server_killed_while_settling_recovers_the_paid_images(
        facilitator_url: str, chain: devchain.DevChain, tmp_path: Path, tiny_model_paths: dict[str, Path]) -> None:
    with live_server(slow_settle_proxy(facilitator_url, delay_s=60)) as proxy_url:
        config = tmp_path / "imagegate.toml"
        config.write_text(f"""
data_dir = "{tmp_path / 'data'}"
[storage]
directory = "{tmp_path / 'images'}"
[diffusers]
cpu_threads = 1
allow_downloads = false
[catalog]
default_model = "flux-schnell"
[models.flux-schnell]
source = "{tiny_model_paths['flux']}"
requires_cuda = false
dtype = "float32"
memory_gb = 0.05
[payments]
mode = "network"
reconcile_rpc_url = "{chain.rpc_url}"
reconcile_interval_s = 0.5
# Longer than the request takes on a loaded machine (model load + render): a live request's payment
# is never stale (a stale reserved payment is released, and its request then refuses to settle it).
stale_after_s = 10
[[payments.options]]
network = "base-sepolia"
pay_to = "{PAY_TO}"
[payments.facilitator]
kind = "http"
url = "{proxy_url}"
timeout_s = 120
""")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = _serve(config, port)
        try:
            await wait_healthy(url, server)
            async with httpx.AsyncClient(base_url=url, timeout=120, trust_env=False) as client:
                amount = await estimate_amount(client, SMALL)
                terms = Terms(amount)
                headers = v2_header(terms, sign(terms))
                before = await chain.balance_of(PAYER.address)
                request = asyncio.create_task(client.post("/v1/images/generate", json=SMALL, headers=headers))
                # The facilitator settles on chain, then its answer is held back: kill the server meanwhile.
                for _ in range(600):
                    if await chain.balance_of(PAYER.address) == before - amount:
                        break
                    await asyncio.sleep(0.1)
                server.kill()
                server.wait()
                with pytest.raises(httpx.TransportError):
                    await request
        finally:
            if server.poll() is None:
                server.kill()
        assert await chain.balance_of(PAYER.address) == before - amount

        restarted = _serve(config, port)
        try:
            await wait_healthy(url, restarted)
            async with httpx.AsyncClient(base_url=url, timeout=120, trust_env=False) as client:
                for _ in range(160):  # the reconciler runs every 0.5 s once the record is 10 s stale
                    response = await client.post("/v1/images/generate", json=SMALL, headers=headers)
                    if response.status_code == 200:
                        break
                    assert response.status_code in (202, 503), response.text
                    await asyncio.sleep(0.5)
                assert response.status_code == 200, response.text
                receipt = decode_header(response.headers["PAYMENT-RESPONSE"])
                assert receipt["success"] is True and receipt["transaction"].startswith("0x")
                assert (await client.get(response.json()["images"][0]["url"])).status_code == 200
        finally:
            restarted.terminate()
            restarted.wait(timeout=60)
        assert await chain.balance_of(PAYER.address) == before - amount
