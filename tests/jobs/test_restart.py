"""Jobs across process deaths: real ``imagegate serve`` processes SIGKILLed mid-job, restarted or
replaced by a replica on the same ledger, the real dev chain. A job completes (or is released) and is
charged at most once; a payment is rendered at most once at a time, whichever replica receives it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from imagegate import devchain
from tests.jobs.conftest import PAYER, payment_for, read_events, submit
from tests.support.server import free_port, wait_healthy

BODY = {"prompt": "a plain square of colour", "model": "bench-simulated", "width": 128, "height": 128}
SLOW_BODY = {**BODY, "model": "bench-slow"}


def write_config(root: Path, rpc_url: str, ledger_url: str | None = None) -> Path:
    key_file = root / "facilitator.key"
    key_file.write_text(devchain.FACILITATOR_ACCOUNT.private_key)
    simulated = ('backend = "simulated"\nsource = "simulated"\nname = "Simulated"\nenabled = true\n'
                 'default_width = 128\ndefault_height = 128\nnegative_prompt = "cfg"\n'
                 'steps = { supported = true, default = 4, min = 1, max = 50 }\n'
                 'guidance = { mode = "cfg", default = 1.0 }\nprice = { unit = 1000 }\n')
    config = root / "imagegate.toml"
    ledger = f'[ledger]\nurl = "{ledger_url}"\n' if ledger_url else ""
    config.write_text(f"""
data_dir = "{root / 'data'}"
{ledger}[storage]
directory = "{root / 'images'}"
[jobs]
lease_s = 2
poll_interval_s = 0.2
[payments]
mode = "network"
reconcile_rpc_url = "{rpc_url}"
[[payments.options]]
network = "base-sepolia"
pay_to = "{devchain.PAY_TO_ACCOUNT.address}"
[payments.facilitator]
kind = "builtin"
rpc_url = "{rpc_url}"
private_key_file = "{key_file}"
[models.bench-simulated]
{simulated}options = {{ batch_ms = 4000 }}
[models.bench-slow]
{simulated}options = {{ batch_ms = 30000 }}
""")
    return config


@contextmanager
def serve(config: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``imagegate serve`` as its own process (so that it can be SIGKILLed), stopped by its PID."""
    log = (config.parent / f"serve-{port}-{time.monotonic_ns()}.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "imagegate", "serve", "--config", str(config),
                                "--port", str(port), "--log-level", "warning"], stdout=log, stderr=log)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        log.close()


def kill(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait(timeout=30)


async def wait_for_event(http: httpx.AsyncClient, job_id: str, kind: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        events = await http.get(f"/v1/jobs/{job_id}")
        body = events.json()
        if kind == "progress" and body["status"] == "running" and body.get("progress"):
            return
        if kind == "queued" and body["status"] == "queued" and body.get("queuePosition") is not None:
            return
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)


async def finished(http: httpx.AsyncClient, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job: dict[str, Any] = (await http.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] in ("succeeded", "failed", "cancelled", "expired"):
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.2)


async def payer_transfers(chain: devchain.DevChain, block: int) -> list[int]:
    return [t.value for t in await chain.token_transfers(from_block=block + 1) if t.sender == PAYER.address]


async def test_a_restarted_server_finishes_its_running_and_queued_jobs_once(
        chain: devchain.DevChain, tmp_path: Path) -> None:
    config = write_config(tmp_path, chain.rpc_url)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    block = await chain.block_number()
    async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as http:
        with serve(config, port) as first:
            await wait_healthy(url, first)
            running = (await submit(http, BODY, await payment_for(http, BODY))).json()
            queued = (await submit(http, BODY, await payment_for(http, BODY))).json()
            await wait_for_event(http, running["id"], "progress")
            await wait_for_event(http, queued["id"], "queued")
            seen = await read_events(http, f"/v1/jobs/{running['id']}/events", stop_after=3)
            kill(first)  # mid-render for one, in line for the other; nothing settled yet
        assert await payer_transfers(chain, block) == []

        with serve(config, port) as second:
            await wait_healthy(url, second)
            # Their status is served at once, from the ledger database.
            for job in (running, queued):
                status = (await http.get(f"/v1/jobs/{job['id']}")).json()["status"]
                assert status in ("queued", "running", "settling", "succeeded"), status
            rest = await read_events(http, f"/v1/jobs/{running['id']}/events", last_event_id=seen[-1][0])
            assert rest[-1][1] == "succeeded" and int(rest[0][0]) > int(seen[-1][0])
            done = [await finished(http, job["id"]) for job in (running, queued)]
            assert [job["status"] for job in done] == ["succeeded", "succeeded"], done
            for job in done:
                image = await http.get(job["result"]["images"][0]["url"])
                assert image.status_code == 200
            # Charged once each, with the transactions the jobs report.
            amounts = [int(job["payment"]["amount"]) for job in done]
            assert sorted(await payer_transfers(chain, block)) == sorted(amounts)
            assert {job["payment"]["state"] for job in done} == {"settled"}


async def test_a_job_whose_payment_expires_while_the_server_is_down_is_released(
        chain: devchain.DevChain, tmp_path: Path) -> None:
    config = write_config(tmp_path, chain.rpc_url)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    block = await chain.block_number()
    async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as http:
        with serve(config, port) as first:
            await wait_healthy(url, first)
            # Valid for 32 s: the job must have rendered 20 s before that, 12 s from now.
            paid = await payment_for(http, SLOW_BODY, valid_before=int(time.time()) + 32)
            job = (await submit(http, SLOW_BODY, paid)).json()
            await wait_for_event(http, job["id"], "progress")
            deadline = time.time() + 12
            kill(first)
        await asyncio.sleep(max(0.0, deadline - time.time()) + 0.5)
        with serve(config, port) as second:
            await wait_healthy(url, second)
            done = await finished(http, job["id"])
            assert done["status"] == "expired" and done["payment"]["state"] == "released", done
            assert done["error"]["error"] == "JOB_EXPIRED"
    assert await payer_transfers(chain, block) == []


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
async def test_one_payment_sent_to_two_replicas_is_one_job_finished_by_the_survivor(
        chain: devchain.DevChain, tmp_path: Path, database: str, request: pytest.FixtureRequest) -> None:
    ledger_url = None
    if database == "postgresql":
        server_url = request.getfixturevalue("postgres_url")
        name = f"replicas_{uuid.uuid4().hex[:8]}"
        engine = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
        async with engine.connect() as connection:
            await connection.exec_driver_sql(f"CREATE DATABASE {name}")
        await engine.dispose()
        ledger_url = server_url.rsplit("/", 1)[0] + f"/{name}"
    config = write_config(tmp_path, chain.rpc_url, ledger_url)
    ports = free_port(), free_port()
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    block = await chain.block_number()
    with serve(config, ports[0]) as replica_a:
        # One after the other: two processes creating the tables of a fresh PostgreSQL database at once
        # collide (the ledger's create_all; its Alembic migrations will take a lock).
        await wait_healthy(urls[0], replica_a)
        with serve(config, ports[1]) as replica_b:
            await wait_healthy(urls[1], replica_b)
            await one_job_at_two_replicas(chain, block, urls, ports, replica_a, replica_b)


async def one_job_at_two_replicas(chain: devchain.DevChain, block: int, urls: list[str], ports: tuple[int, int],
                                  replica_a: subprocess.Popen[bytes], replica_b: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient(base_url=urls[0], timeout=60, trust_env=False) as a, \
            httpx.AsyncClient(base_url=urls[1], timeout=60, trust_env=False) as b:
        paid = await payment_for(a, BODY)
        answers = await asyncio.gather(submit(a, BODY, paid), submit(b, BODY, paid))
        assert {r.status_code for r in answers} == {202}, [r.text for r in answers]
        job_ids = {r.json()["id"] for r in answers}
        assert len(job_ids) == 1, job_ids  # one payment, one job, whichever replica got it first
        job_id = job_ids.pop()
        owner = next(r for r in answers if "cancelToken" in r.json())
        owner_process, survivor = (replica_a, b) if owner.url.port == ports[0] else (replica_b, a)
        await wait_for_event(survivor, job_id, "progress")
        kill(owner_process)
        done = await finished(survivor, job_id)
        assert done["status"] == "succeeded" and done["payment"]["state"] == "settled", done
    assert await payer_transfers(chain, block) == [paid.terms.amount]
