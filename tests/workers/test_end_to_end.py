"""End to end with real processes on loopback: a Ray head with 2 declared GPUs (the session's), the
worker app deployed by `imagegate workers deploy` (2 replicas of imagegate-tiny on the CPU),
`imagegate serve` with engine = "ray", the dev chain, and 8 payers paying with the x402 SDK. One
replica is SIGKILLed while it renders. At the end every paid request has its images, the money adds
up three ways (on chain, in the ledger, in the responses), and the killed replica's job was
delivered once.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from imagegate import devchain
from imagegate.ledger import SqlLedger
from imagegate.payments.client import PaidResponse, post_with_payment
from imagegate.workers.ray import app_handle, read_app_status, replica_stats
from tests.support.ray import RayHead, kill_a_replica_mid_job, run_imagegate
from tests.support.server import free_port

APP = "imagegate-e2e"
PAYERS = 8
REQUESTS_PER_PAYER = 2
FUNDS = 10_000_000  # 10 test USDC each
PAY_TO = devchain.PAY_TO_ACCOUNT.address


@pytest.fixture(scope="module")
async def chain() -> AsyncIterator[devchain.DevChain]:
    async with devchain.DevChain() as running:
        yield running


def _config(root: Path, head: RayHead, rpc_url: str, port: int) -> Path:
    key_file = root / "facilitator.key"
    key_file.write_text(devchain.FACILITATOR_ACCOUNT.private_key)
    config = root / "imagegate.toml"
    config.write_text(f"""
data_dir = "{root / 'data'}"

[server]
host = "127.0.0.1"
port = {port}

[storage]
directory = "{root / 'images'}"

[diffusers]
cpu_threads = 1
allow_downloads = false

[catalog]
default_model = "imagegate-tiny"

[workers]
engine = "ray"
address = "{head.address}"
app_name = "{APP}"
replicas = 2
gpus_per_replica = 1
cpus_per_replica = 0
batch_max_images = 4
batch_wait_s = 0.2
deployment_options = {{ health_check_period_s = 1, graceful_shutdown_timeout_s = 1 }}

[payments]
mode = "network"
options = [{{ network = "base-sepolia", pay_to = "{PAY_TO}" }}]
reconcile_rpc_url = "{rpc_url}"

[payments.facilitator]
kind = "builtin"
rpc_url = "{rpc_url}"
private_key_file = "{key_file}"
""")
    return config


@dataclass
class Deployment:
    config: Path
    base_url: str
    server_log: Path


@pytest.fixture(scope="module")
def deployment(ray_head: RayHead, chain: devchain.DevChain, tmp_path_factory: pytest.TempPathFactory,
               ) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("e2e")
    port = free_port()
    config = _config(root, ray_head, chain.rpc_url, port)
    deployed = run_imagegate("workers", "deploy", "--config", str(config))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    server_log = root / "server.log"
    try:
        status = run_imagegate("workers", "status", "--config", str(config), "--json")
        assert status.returncode == 0, status.stderr
        described = json.loads(status.stdout)
        assert described["status"] == "RUNNING" and len(described["replicaStats"]) == 2, described
        with server_log.open("wb") as output:
            server = subprocess.Popen([sys.executable, "-m", "imagegate", "serve", "--config", str(config)],
                                      stdout=output, stderr=subprocess.STDOUT,
                                      env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            base_url = f"http://127.0.0.1:{port}"
            _wait_until_serving(base_url, server, server_log)
            yield Deployment(config, base_url, server_log)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
    finally:
        deleted = run_imagegate("workers", "delete", "--config", str(config))
        assert deleted.returncode == 0, deleted.stderr


def _wait_until_serving(base_url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"imagegate serve exited: {log.read_text()[-3000:]}")
        try:
            # The models list asks the workers about every model: the server is connected after it.
            response = httpx.get(f"{base_url}/v1/images/models", timeout=60, trust_env=False)
            models = {model["id"]: model for model in response.json()["models"]}
            if models["imagegate-tiny"]["available"]:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"imagegate serve did not get ready: {log.read_text()[-3000:]}")


async def test_paid_generations_on_ray_workers_survive_a_killed_replica(
        deployment: Deployment, chain: devchain.DevChain) -> None:
    payers = [Account.create() for _ in range(PAYERS)]
    for payer in payers:
        await chain.mint(payer.address, FUNDS)
    start_block = await chain.block_number()

    async def pay(payer_index: int) -> list[PaidResponse]:
        key = payers[payer_index].key.hex()
        responses = []
        for request_index in range(REQUESTS_PER_PAYER):
            body = {"prompt": f"{payer_index + 1} red circles and {request_index + 1} blue squares",
                    "model": "imagegate-tiny", "width": 256, "height": 256, "steps": 30,
                    "seed": 1000 * payer_index + request_index}
            responses.append(await post_with_payment(f"{deployment.base_url}/v1/images/generate", body, key,
                                                     max_atomic=100_000, timeout_s=300))
        return responses

    done = asyncio.Event()
    killer = asyncio.create_task(kill_a_replica_mid_job(APP, done))
    try:
        per_payer = await asyncio.gather(*(pay(index) for index in range(PAYERS)))
    finally:
        done.set()
    killed = await killer
    assert killed is not None, "no replica was seen rendering"

    # Every paid request got its images.
    responses = [response for payer_responses in per_payer for response in payer_responses]
    assert [response.status for response in responses] == [200] * PAYERS * REQUESTS_PER_PAYER, [
        response.body for response in responses if response.status != 200]
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        for response in responses:
            (image,) = response.body["images"]
            fetched = await http.get(image["url"])
            assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")

    # The money adds up: on chain == ledger revenue == the prices of the delivered generations.
    payer_addresses = {payer.address for payer in payers}
    transfers = [transfer for transfer in await chain.token_transfers(from_block=start_block)
                 if transfer.sender in payer_addresses]
    assert all(transfer.recipient == PAY_TO for transfer in transfers)
    assert len(transfers) == PAYERS * REQUESTS_PER_PAYER
    delivered = sum(int(response.body["cost"]["amount"]) for response in responses)
    ledger = SqlLedger(f"sqlite+aiosqlite:///{deployment.config.parent / 'data' / 'ledger.sqlite3'}")
    try:
        revenue = sum(row.revenue_micros for row in await ledger.revenue_by_model())
        completed = sum(row.generations for row in await ledger.revenue_by_model())
    finally:
        await ledger.aclose()
    assert sum(transfer.value for transfer in transfers) == revenue == delivered > 0
    assert completed == PAYERS * REQUESTS_PER_PAYER
    for payer, payer_responses in zip(payers, per_payer, strict=True):
        spent = sum(int(response.body["cost"]["amount"]) for response in payer_responses)
        assert await chain.balance_of(payer.address) == FUNDS - spent

    # The killed replica's job was tried again on the other replica and delivered once.
    log = deployment.server_log.read_text()
    assert re.search(rf"job {killed.job_id} \(imagegate-tiny\): its replica {killed.replica.replica} is gone", log), log
    assert len(re.findall(rf"job {killed.job_id} \(imagegate-tiny\) delivered after \d+ tries", log)) == 1, log

    async def both_running() -> bool:
        return (await asyncio.to_thread(read_app_status, APP)).running_replicas == 2

    deadline = time.monotonic() + 180
    while not await both_running():
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        await asyncio.sleep(0.5)
    rendered = [stats.recent_finished.count(killed.job_id) for stats in await replica_stats(app_handle(APP), 2)]
    assert sorted(rendered) == [0, 1], rendered
