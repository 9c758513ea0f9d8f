"""The OpenAI-compatible route, driven by the official ``openai`` SDK over the x402 SDK's paying httpx
transport, on the dev chain: images, the exact charge, b64_json, OpenAI-shaped errors and 402."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from eth_account import Account
from openai import AsyncOpenAI
from x402 import max_amount, x402Client
from x402.http.clients.httpx import x402_httpx_transport
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client

from imagegate import devchain
from tests.jobs.conftest import PAYER, JobsServer, amount_of

README = Path(__file__).resolve().parents[2] / "README.md"
TINY = "flux-schnell"  # the tiny diffusers pipeline under the built-in id
PROMPT = "a red circle on a white background"


def paying_openai(base_url: str, cap: int) -> AsyncOpenAI:
    """The documented setup: AsyncOpenAI whose httpx client pays 402s with the x402 SDK."""
    payer = x402Client()
    register_exact_evm_client(payer, EthAccountSigner(Account.from_key(PAYER.private_key)))
    payer.set_spend_controls(False)  # the dev chain's test USDC; the cap below bounds every payment
    payer.register_policy(max_amount(cap))
    http_client = httpx.AsyncClient(transport=x402_httpx_transport(payer), timeout=300, trust_env=False)
    return AsyncOpenAI(base_url=f"{base_url}/v1", api_key="not-needed", http_client=http_client, max_retries=0)


@pytest.fixture
async def client(jobs_server: JobsServer) -> AsyncIterator[AsyncOpenAI]:
    sdk = paying_openai(jobs_server.base_url, cap=1_000_000)
    yield sdk
    await sdk.close()


async def test_the_openai_sdk_pays_and_gets_images(client: AsyncOpenAI, http: httpx.AsyncClient,
                                                   chain: devchain.DevChain) -> None:
    estimate = await amount_of(http, {"model": TINY, "width": 128, "height": 128, "numberResults": 2})
    before = await chain.balance_of(PAYER.address)
    block = await chain.block_number()
    response = await client.images.generate(model=TINY, prompt=PROMPT, size="128x128", n=2)
    assert len(response.data) == 2 and all(image.url and not image.b64_json for image in response.data)
    assert response.created > 0 and response.size == "128x128" and response.output_format == "png"
    for image in response.data:
        assert image.url is not None
        fetched = await http.get(image.url)
        assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
    assert await chain.balance_of(PAYER.address) == before - estimate
    transfers = [t.value for t in await chain.token_transfers(from_block=block + 1) if t.sender == PAYER.address]
    assert transfers == [estimate]


async def test_b64_json_holds_the_same_bytes_as_the_url(client: AsyncOpenAI, http: httpx.AsyncClient) -> None:
    by_url = await client.images.generate(model=TINY, prompt=PROMPT, size="128x128", extra_body={"seed": 1234})
    inline = await client.images.generate(model=TINY, prompt=PROMPT, size="128x128", response_format="b64_json",
                                          extra_body={"seed": 1234})
    assert by_url.data[0].url is not None and inline.data[0].b64_json is not None and inline.data[0].url is None
    downloaded = (await http.get(by_url.data[0].url)).content
    assert base64.b64decode(inline.data[0].b64_json) == downloaded


@pytest.mark.parametrize(("arguments", "param", "code"), [
    ({"style": "vivid"}, "style", "unsupported_value"),
    ({"quality": "hd"}, "quality", "unsupported_value"),
    ({"background": "transparent"}, "background", "unsupported_value"),
    ({"stream": True}, "stream", "unsupported_value"),
    ({"size": "100x100"}, "size", "invalid_dimensions"),
    ({"size": "big"}, "size", "invalid_value"),
    ({"n": 9}, "n", "invalid_parameter"),
    ({"model": "dall-e-3"}, "model", "invalid_model"),
    ({"response_format": "xml"}, "response_format", "invalid_value"),
    ({"extra_body": {"mystery": 1}}, "mystery", "unknown_parameter"),
])
async def test_unsupported_fields_get_openai_shaped_400s(client: AsyncOpenAI, arguments: dict[str, object],
                                                         param: str, code: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await client.images.generate(prompt=PROMPT, **{"model": TINY, "size": "128x128", **arguments})  # type: ignore[arg-type]
    error = raised.value.response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code, error
    assert error["message"]


async def test_the_402_is_x402_and_openai_at_once(jobs_server: JobsServer, http: httpx.AsyncClient) -> None:
    challenge = await http.post("/v1/images/generations", json={"model": TINY, "prompt": PROMPT, "size": "128x128"})
    assert challenge.status_code == 402
    body = challenge.json()
    assert body["x402Version"] == 1
    accepted = body["accepts"][0]
    assert accepted["maxAmountRequired"] == str(await amount_of(http, {"model": TINY, "width": 128, "height": 128}))
    assert accepted["resource"].endswith("/v1/images/generations")
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "payment_required" and body["error"]["code"] == "payment_required"
    v2 = json.loads(base64.b64decode(challenge.headers["payment-required"]))
    assert v2["x402Version"] == 2 and v2["accepts"][0]["amount"] == accepted["maxAmountRequired"]

    # Without a paying transport the SDK surfaces it as a 402 APIStatusError.
    plain = AsyncOpenAI(base_url=f"{jobs_server.base_url}/v1", api_key="x", max_retries=0,
                        http_client=httpx.AsyncClient(trust_env=False))
    with pytest.raises(openai.APIStatusError) as raised:
        await plain.images.generate(model=TINY, prompt=PROMPT, size="128x128")
    assert raised.value.status_code == 402
    await plain.close()
    bad_json = await http.post("/v1/images/generations", content=b"{not json")
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"


async def test_the_readme_snippet_works(jobs_server: JobsServer, http: httpx.AsyncClient,
                                        chain: devchain.DevChain) -> None:
    section = README.read_text(encoding="utf-8").split("## OpenAI-compatible endpoint", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert snippet is not None
    estimate = await amount_of(http, {"width": 256, "height": 256})  # the server's default model
    before = await chain.balance_of(PAYER.address)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", snippet[1], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "IMAGEGATE_URL": jobs_server.base_url, "IMAGEGATE_PAYER_KEY": PAYER.private_key})
    stdout, _ = await asyncio.wait_for(process.communicate(), timeout=300)
    lines = stdout.decode().strip().splitlines()
    assert process.returncode == 0, stdout.decode()
    assert lines[0].startswith(f"{jobs_server.base_url}/images/") and lines[1].endswith("base64 characters")
    assert (await http.get(lines[0])).status_code == 200
    assert await chain.balance_of(PAYER.address) == before - 2 * estimate
