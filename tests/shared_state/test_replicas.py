"""Several `imagegate serve` processes on one PostgreSQL ledger and one S3 bucket (moto), one dev chain
and one facilitator, all real processes on loopback. Payments are raced between API processes, API
processes are SIGKILLed mid-request, and the survivors race to finish their work: nothing is charged
twice, published twice, or lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from imagegate import devchain
from imagegate.ledger import GenerationStatus, PaymentStatus
from tests.shared_state.cluster import (
    MODEL,
    PREFIX,
    Cluster,
    ClusterOptions,
    ImagegateProcess,
    SignedPayment,
    running_cluster,
)
from tests.support.postgres import PostgresServer
from tests.support.s3 import MotoS3Server

PAYER = devchain.PAYER_ACCOUNT.address
# The simulated GPU holds each image this long (asyncio.sleep, no CPU): long enough to kill a process
# mid-render, and longer than stale_after_s (10 s) so a live request can outlive its reservation.
SLOW_RENDER_S = 15.0


@pytest.fixture(scope="module")
async def cluster(postgres_server: PostgresServer, s3_server: MotoS3Server, chain: devchain.DevChain,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    options = ClusterOptions(api_processes=3, settings={"models": {"bench-simulated": {
        "enabled": True, "max_concurrency": 4, "options": {"batch_ms": 0, "image_ms": SLOW_RENDER_S * 1000}}}})
    async with running_cluster(tmp_path_factory.mktemp("replicas"), postgres_server, s3_server, chain,
                               options) as running:
        yield running


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {what} after {timeout_s:.0f} s")
        await asyncio.sleep(0.1)


async def post(http: httpx.AsyncClient, base_url: str, body: dict[str, Any],
               payment: SignedPayment) -> httpx.Response:
    return await http.post(f"{base_url}/v1/images/generate", json=body, headers=payment.headers)


async def payer_transfers_since(chain: devchain.DevChain, from_block: int,
                                payer: str = PAYER) -> list[devchain.TokenTransfer]:
    return [t for t in await chain.token_transfers(from_block=from_block) if t.sender == payer]


@contextlib.asynccontextmanager
async def restarting(cluster: Cluster, api: ImagegateProcess) -> AsyncIterator[None]:
    """Restart ``api`` in the background, as a supervisor would, while the block runs."""
    restart = asyncio.create_task(cluster.restart(api))
    try:
        yield
    except BaseException:
        await asyncio.gather(restart, return_exceptions=True)
        raise
    await restart


async def generation_status(cluster: Cluster, payment: SignedPayment) -> list[GenerationStatus]:
    return [generation.status for generation in await cluster.generations_paid_by(payment.key)]


def uuids(response: httpx.Response) -> list[str]:
    return [image["uuid"] for image in response.json()["images"]]


async def test_one_payment_sent_to_two_api_processes_at_once_buys_one_generation(cluster: Cluster) -> None:
    body = {"prompt": "two green squares on a white background", "model": MODEL, "width": 128, "height": 128,
            "steps": 4, "numberResults": 2, "seed": 21}
    [payer_key] = await cluster.new_payers(1)
    payment = await cluster.sign(body, payer_key)
    first_api, second_api, third_api = cluster.apis
    from_block = await cluster.chain.block_number() + 1
    async with httpx.AsyncClient(timeout=300, trust_env=False) as http:
        first, second = await asyncio.gather(post(http, first_api.base_url, body, payment),
                                             post(http, second_api.base_url, body, payment))
        assert (first.status_code, second.status_code) == (200, 200), (first.text, second.text)
        # The one that lost the race waited for the other and answered with the same generation.
        assert first.json()["id"] == second.json()["id"] and uuids(first) == uuids(second)
        [generation] = await cluster.generations_paid_by(payment.key)
        assert generation.status is GenerationStatus.COMPLETED and generation.id == first.json()["id"]
        [transfer] = await payer_transfers_since(cluster.chain, from_block, payment.payer)
        assert transfer.value == payment.terms.amount
        assert first.json()["cost"]["transaction"] == second.json()["cost"]["transaction"] == transfer.transaction_hash

        # A resend to the third process returns the same images, and every process serves them.
        resent = await post(http, third_api.base_url, body, payment)
        assert resent.status_code == 200 and uuids(resent) == uuids(first) and resent.json()["id"] == generation.id
        for image_uuid in uuids(first):
            stored = cluster.object_bytes(f"{PREFIX}images/{image_uuid}.png")
            for api in cluster.apis:
                response = await http.get(f"{api.base_url}/images/{image_uuid}.png")
                assert response.status_code == 200 and response.content == stored
                assert response.headers["content-type"] == "image/png"
                assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
                cached = await http.get(f"{api.base_url}/images/{image_uuid}.png",
                                        headers={"If-None-Match": response.headers["etag"]})
                assert cached.status_code == 304
            # And the bucket itself (the CDN's origin) serves it to anyone.
            public = await http.get(f"{cluster.public_base_url}/{image_uuid}.png")
            assert public.status_code == 200 and public.content == stored
    assert await payer_transfers_since(cluster.chain, from_block, payment.payer) == [transfer]
    await cluster.wait_until_settled()
    await cluster.check_books()


async def test_a_settlement_cut_short_by_sigkill_is_finished_once_by_the_survivors(cluster: Cluster) -> None:
    """The process that paid dies while its settlement is on the way to the chain. Both survivors
    reconcile the same ledger every half second: the transfer is found, the images are published once,
    and the client's resend to a survivor gets them."""
    chain = cluster.chain
    doomed, *survivors = cluster.apis
    body = {"prompt": "a blue triangle", "model": MODEL, "width": 128, "height": 128, "steps": 4, "seed": 5}
    payment = await cluster.sign(body)
    from_block = await chain.block_number() + 1
    await chain.rpc("evm_setAutomine", False)  # the settlement waits in the mempool until we mine it
    try:
        async with httpx.AsyncClient(timeout=300, trust_env=False) as http:
            interrupted = asyncio.create_task(post(http, doomed.base_url, body, payment))

            async def broadcast() -> bool:
                record = await cluster.payment(payment.key)
                status = await chain.rpc("txpool_status")
                return record is not None and record.status is PaymentStatus.SETTLING and int(status["pending"], 16) > 0

            await until(broadcast, "settling with the transaction broadcast")
            doomed.kill()
            with contextlib.suppress(httpx.TransportError):
                await interrupted
    finally:
        await chain.rpc("evm_setAutomine", True)
    await chain.mine()
    [transfer] = await payer_transfers_since(chain, from_block)
    assert transfer.value == payment.terms.amount
    record = await cluster.payment(payment.key)
    assert record is not None and record.status is PaymentStatus.SETTLING  # the dead process never learnt it

    # Restarted at once, as an operator's supervisor would: a third process that reconciles too.
    async with restarting(cluster, doomed):

        async def completed() -> bool:
            return await generation_status(cluster, payment) == [GenerationStatus.COMPLETED]

        await until(completed, "completed by reconciliation", timeout_s=cluster.options.stale_after_s + 90)
        record = await cluster.payment(payment.key)
        assert record is not None and record.status is PaymentStatus.SETTLED
        assert record.transaction == transfer.transaction_hash
        [generation] = await cluster.generations_paid_by(payment.key)

        def finishers() -> list[str]:
            return [api.name for api in cluster.apis if f"reconciled generation {generation.id}" in api.log_tail(10**7)]

        async def logged() -> bool:
            return bool(finishers())

        await until(logged, "logged by the process that finished it", timeout_s=10)
        assert len(finishers()) == 1, finishers()

        async with httpx.AsyncClient(timeout=300, trust_env=False) as http:
            for api in survivors:
                resent = await post(http, api.base_url, body, payment)
                assert resent.status_code == 200, resent.text
                assert resent.json()["id"] == generation.id
                assert resent.json()["cost"]["transaction"] == record.transaction
                for image_uuid in uuids(resent):
                    assert (await http.get(f"{api.base_url}/images/{image_uuid}.png")).status_code == 200
    assert await payer_transfers_since(chain, from_block) == [transfer]
    await cluster.wait_until_settled()
    await cluster.check_books()


async def test_reservations_of_a_dead_or_outlived_request_go_to_the_resend(cluster: Cluster) -> None:
    """Two requests outlive stale_after_s on the simulated GPU: one because its process is SIGKILLed
    mid-render, one because it renders for longer. Each client resends its payment to the third process.
    The dead request's reservation is released by a reconciler and the resend renders anew; the live one
    keeps its reservation alive (the heartbeat), so its resend waits for it and gets the same images.
    One transfer each; the dead request's generation is marked failed by the sweep."""
    slow_api, doomed, resend_api = cluster.apis
    from_block = await cluster.chain.block_number() + 1

    def body(seed: int) -> dict[str, Any]:
        return {"prompt": "a slow render", "model": "bench-simulated", "width": 128, "height": 128, "steps": 2,
                "seed": seed}

    killed, outlived = await cluster.sign(body(1)), await cluster.sign(body(2))

    async def running(payment: SignedPayment) -> bool:
        return await generation_status(cluster, payment) == [GenerationStatus.RUNNING]

    async with httpx.AsyncClient(timeout=300, trust_env=False) as http:
        doomed_request = asyncio.create_task(post(http, doomed.base_url, body(1), killed))
        slow_request = asyncio.create_task(post(http, slow_api.base_url, body(2), outlived))
        await until(lambda: running(killed), "rendering the first payment")
        await until(lambda: running(outlived), "rendering the second payment")
        doomed.kill()
        with contextlib.suppress(httpx.TransportError):
            await doomed_request
        async with restarting(cluster, doomed):
            resent_killed, resent_outlived = await asyncio.gather(
                post(http, resend_api.base_url, body(1), killed), post(http, resend_api.base_url, body(2), outlived))
            slow = await slow_request

    assert resent_killed.status_code == 200, resent_killed.text
    assert resent_outlived.status_code == 200, resent_outlived.text
    # The outlived request was alive all along: it delivered, and its resend got the same generation.
    assert slow.status_code == 200, slow.text
    assert resent_outlived.json()["id"] == slow.json()["id"]
    transfers = await payer_transfers_since(cluster.chain, from_block)
    assert sorted(t.value for t in transfers) == [killed.terms.amount, outlived.terms.amount]
    for payment, resent in ((killed, resent_killed), (outlived, resent_outlived)):
        generations = {g.id: g for g in await cluster.generations_paid_by(payment.key)}
        assert generations[resent.json()["id"]].status is GenerationStatus.COMPLETED
        record = await cluster.payment(payment.key)
        assert record is not None and record.status is PaymentStatus.SETTLED
        assert record.generation_id == resent.json()["id"]
    assert len(await cluster.generations_paid_by(outlived.key)) == 1

    async def abandoned_failed() -> bool:
        generations = await cluster.generations_paid_by(killed.key)
        abandoned = [g for g in generations if g.id != resent_killed.json()["id"]]
        return [g.status for g in abandoned] == [GenerationStatus.FAILED]

    # The killed request's generation: nothing staged, its payment used again; the sweep marks it failed.
    await until(abandoned_failed, "the dead request's generation marked failed",
                timeout_s=cluster.options.stale_after_s + 90)
    await cluster.wait_until_settled()
    await cluster.check_books()


def test_every_process_upgraded_the_ledger_at_most_once(cluster: Cluster) -> None:
    """They all started at once on an empty database: exactly one created the schema."""
    upgrades = [api.name for api in cluster.apis if "Running upgrade  -> 0001" in api.log_tail(10**7)]
    assert len(upgrades) == 1, upgrades
