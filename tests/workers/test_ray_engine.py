"""The Ray engine against a real Ray Serve app: 2 model-host replicas on a loopback head with 2
declared GPUs (on the CPU), imagegate-tiny and simulated-GPU models; then through real HTTP with
real payments on the dev chain.

One app for the module (replicas take seconds to start on two cores); the tests run in file order,
and the last one deletes and redeploys it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from imagegate import devchain
from imagegate.app import app_from_settings
from imagegate.backends.base import GenerationJob
from imagegate.catalog import Catalog, build_catalog
from imagegate.config import Settings, load_settings
from imagegate.errors import GenerationTimedOut
from imagegate.workers.base import RenderProgress
from imagegate.workers.protocol import ReplicaStats
from imagegate.workers.ray import RayEngine, app_handle, delete, deploy, read_app_status, replica_stats
from tests.integration.conftest import chain, network_payments
from tests.support.payments import Terms, sign, v2_header
from tests.support.ray import RayHead
from tests.support.server import live_server
from tests.workers.conftest import simulated_model

__all__ = ["chain"]

APP = "imagegate-engine-tests"
MODELS = {
    # One simulated pipeline call: 4 s whatever its size, so deadlines, kills and full queues are easy
    # to reach; 20 steps of 0.2 s each.
    "sim-slow": simulated_model(4000),
}
SLOW_STEPS = 20
PAYER = devchain.PAYER_ACCOUNT


def worker_settings(head: RayHead, root: Path, *, workers: dict[str, Any] | None = None, **sections: Any) -> Settings:
    """The same settings for the deployed replicas and the API side (as an operator's one config)."""
    return load_settings(
        data_dir=root,
        storage={"directory": str(root / "images")},
        diffusers={"cpu_threads": 1, "allow_downloads": False},
        catalog={"default_model": "imagegate-tiny"},
        models=MODELS,
        workers={"engine": "ray", "address": head.address, "app_name": APP, "replicas": 2, "gpus_per_replica": 1,
                 "cpus_per_replica": 0, "batch_max_images": 4, "batch_wait_s": 0.3, "accept_timeout_s": 60,
                 "deployment_options": {"health_check_period_s": 1, "graceful_shutdown_timeout_s": 1},
                 **(workers or {})},
        **sections,
    )


@dataclass
class Workers:
    settings: Settings
    catalog: Catalog
    root: Path


@pytest.fixture(scope="module")
def workers(ray_head: RayHead, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    root = tmp_path_factory.mktemp("ray-engine")
    settings = worker_settings(ray_head, root)
    status = deploy(settings, timeout_s=300)
    assert status.running_replicas == 2, status
    try:
        yield Workers(settings, build_catalog(settings), root)
    finally:
        delete(settings)


@pytest.fixture(scope="module")
async def engine(workers: Workers) -> AsyncIterator[RayEngine]:
    ray_engine = RayEngine(workers.settings)
    yield ray_engine
    await ray_engine.aclose()


async def all_replica_stats(expected: int = 2) -> list[ReplicaStats]:
    stats = await replica_stats(app_handle(APP), expected)
    assert len(stats) == expected, stats
    return stats


async def eventually(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await condition()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")


def slow_job(catalog: Catalog, seed: int) -> GenerationJob:
    return GenerationJob(catalog["sim-slow"], "a slow render", None, 128, 128, SLOW_STEPS, None, (seed,), True)


def max_pixel_difference(first: Any, second: Any) -> int:
    return int(np.abs(np.asarray(first, dtype=np.int16) - np.asarray(second, dtype=np.int16)).max())


def test_joining_the_cluster_keeps_this_process_sigterm_handler(ray_head: RayHead) -> None:
    # Ray's own would end an API process mid-request on SIGTERM instead of letting it drain.
    before, after = ray_head.sigterm_handlers
    assert after is before


async def test_jobs_of_several_clients_share_one_pipeline_call_and_stream_every_step(
        workers: Workers, engine: RayEngine) -> None:
    from imagegate.backends.diffusers import DiffusersBackend

    spec = workers.catalog["imagegate-tiny"]
    assert (await engine.availability(spec)).available
    prompts = ["a red circle", "two blue squares", "a green triangle on a yellow background",
               "a small purple star", "three orange circles", "a large white square"]
    jobs = [GenerationJob(spec, prompt, None, 256, 256, 4, None, (1000 + index,), True)
            for index, prompt in enumerate(prompts)]
    before = {stats.replica: len(stats.recent_batches) for stats in await all_replica_stats()}
    events: list[list[RenderProgress]] = [[] for _ in jobs]
    results = await asyncio.gather(*(engine.render(job, engine.admit(spec), progress=events[index].append,
                                                   timeout_s=300) for index, job in enumerate(jobs)))

    # The six clients' jobs went into fewer pipeline calls than jobs: compatible requests were batched.
    calls = [size for stats in await all_replica_stats() for size in stats.recent_batches[before[stats.replica]:]]
    assert sum(calls) == len(jobs) and len(calls) < len(jobs), calls
    reports = list(engine.recent_renders)[-len(jobs):]
    assert max(report.batch_jobs for report in reports) >= 2
    assert engine.queue_depth(spec.id) == 0
    # Every job of a batch heard every step of its call, in order.
    for job_events in events:
        assert job_events == [RenderProgress.running(), *(RenderProgress.stepped(step, 4) for step in range(1, 5))]
    # Each image is the one its seed gives alone, in this process (within 1 LSB: batched kernels).
    local = DiffusersBackend(workers.settings)
    try:
        for job, result in zip(jobs, results, strict=True):
            solo = await local.generate(job)
            assert [image.seed for image in result.images] == list(job.seeds)
            assert max_pixel_difference(result.images[0].image, solo.images[0].image) <= 1
    finally:
        await local.aclose()
    assert "imagegate-tiny" in engine.loaded_models()


async def test_every_replica_reports_while_one_of_them_renders(workers: Workers, engine: RayEngine) -> None:
    # Serve sends a call to the replica with the fewest ongoing requests, and the engine's router knows
    # which replica holds its renders: asked one call after another, only the idle replica would answer.
    spec = workers.catalog["sim-slow"]
    renders = [asyncio.create_task(engine.render(slow_job(workers.catalog, seed), engine.admit(spec), timeout_s=120))
               for seed in (5, 6, 7)]

    async def both_answer_one_renders() -> list[ReplicaStats] | None:
        stats = await engine.replica_stats()
        busy = [replica for replica in stats if any(active.state == "rendering" for active in replica.active)]
        return stats if len(stats) == 2 and busy else None

    stats = await eventually(both_answer_one_renders, 30, "both replicas report while jobs render")
    assert len({replica.pid for replica in stats}) == 2
    assert [[image.seed for image in result.images] for result in await asyncio.gather(*renders)] == [[5], [6], [7]]


async def test_a_timed_out_job_is_cancelled_on_its_replica(workers: Workers, engine: RayEngine) -> None:
    spec = workers.catalog["sim-slow"]
    assert (await engine.availability(spec)).available

    async def totals() -> tuple[int, int]:
        stats = await all_replica_stats()
        return sum(s.jobs_finished for s in stats), sum(s.jobs_cancelled for s in stats)

    finished_before, cancelled_before = await totals()
    started = time.monotonic()
    with pytest.raises(GenerationTimedOut):
        await engine.render(slow_job(workers.catalog, 7), engine.admit(spec), timeout_s=1.5)
    assert time.monotonic() - started < 4.0
    assert engine.queue_depth(spec.id) == 0

    async def cancelled() -> bool:
        return (await totals())[1] == cancelled_before + 1

    await eventually(cancelled, 10, "the replica cancels the job")
    # Past the moment it would have finished: it never rendered to the end.
    await asyncio.sleep(max(0.0, started + 5.0 - time.monotonic()))
    assert await totals() == (finished_before, cancelled_before + 1)


async def test_a_job_whose_replica_dies_is_retried_and_delivered_once(workers: Workers, engine: RayEngine) -> None:
    spec = workers.catalog["sim-slow"]
    assert (await engine.availability(spec)).available
    job = slow_job(workers.catalog, 99)
    render = asyncio.create_task(engine.render(job, engine.admit(spec), timeout_s=120))

    async def rendering() -> tuple[ReplicaStats, str] | None:
        for stats in await all_replica_stats():
            for active in stats.active:
                if active.model == spec.id and active.state == "rendering":
                    return stats, active.job_id
        return None

    victim, job_id = await eventually(rendering, 30, "the job renders on a replica")
    os.kill(victim.pid, signal.SIGKILL)  # a replica of the head this session started
    result = await render
    assert [image.seed for image in result.images] == [99]
    report = next(report for report in engine.recent_renders if report.job_id == job_id)
    # Tried again after its replica died (a second death while Serve learns of the first may add a try).
    assert report.attempts >= 2 and report.replicas[0] == victim.replica and report.replicas[-1] != victim.replica

    # Delivered once: the survivor rendered it once, and nobody else did.
    async def both_running() -> bool:
        return (await asyncio.to_thread(read_app_status, APP)).running_replicas == 2

    await eventually(both_running, 180, "Serve replaces the dead replica")
    finished = [stats.recent_finished.count(job_id) for stats in await all_replica_stats()]
    assert sorted(finished) == [0, 1], finished


# --- through HTTP, with payments --------------------------------------------------------------------


@pytest.fixture(scope="module")
async def paid_api(workers: Workers, chain: devchain.DevChain, ray_head: RayHead) -> AsyncIterator[httpx.AsyncClient]:
    root = workers.root / "api"
    root.mkdir()
    settings = worker_settings(ray_head, root, workers={"max_queue": 0},
                               payments=network_payments(root, chain.rpc_url))
    with live_server(app_from_settings(settings)) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=300, trust_env=False) as client:
            yield client


SLOW_REQUEST = {"prompt": "a slow render", "model": "sim-slow", "width": 128, "height": 128, "steps": SLOW_STEPS}


async def amount_of(client: httpx.AsyncClient) -> int:
    response = await client.post("/v1/images/estimate", json=SLOW_REQUEST)
    return int(response.json()["estimatedCost"]["amount"])


async def probe(client: httpx.AsyncClient) -> httpx.Response:
    """An unpaid request: 402 when the model could take it, 503 (before any payment step) otherwise."""
    return await client.post("/v1/images/generate", json=SLOW_REQUEST)


async def test_a_full_queue_on_the_workers_is_model_busy_before_payment(
        paid_api: httpx.AsyncClient, chain: devchain.DevChain) -> None:
    amount = await amount_of(paid_api)
    before = await chain.balance_of(PAYER.address)
    # 2 replicas x 4 jobs per batch, nobody waiting beyond them ([workers] max_queue = 0).
    filling = [Terms(amount) for _ in range(8)]
    renders = [asyncio.create_task(paid_api.post("/v1/images/generate", json=SLOW_REQUEST,
                                                 headers=v2_header(terms, sign(terms)))) for terms in filling]

    async def busy() -> httpx.Response | None:
        response = await probe(paid_api)
        return response if response.status_code == 503 else None

    refused = await eventually(busy, 60, "the model's workers are full")
    assert refused.json()["error"] == "MODEL_BUSY" and int(refused.headers["retry-after"]) >= 1
    assert "PAYMENT-REQUIRED" not in refused.headers

    waiting = Terms(amount)
    waiting_headers = v2_header(waiting, sign(waiting))
    busy_response = await paid_api.post("/v1/images/generate", json=SLOW_REQUEST, headers=waiting_headers)
    assert busy_response.status_code == 503 and busy_response.json()["error"] == "MODEL_BUSY", busy_response.text
    assert not await chain.authorization_state(PAYER.address, waiting.nonce)

    assert [response.status_code for response in await asyncio.gather(*renders)] == [200] * 8
    # The refused payment buys its images once there is room; everyone charged once.
    retried = await paid_api.post("/v1/images/generate", json=SLOW_REQUEST, headers=waiting_headers)
    assert retried.status_code == 200, retried.text
    assert await chain.balance_of(PAYER.address) == before - 9 * amount


async def test_without_replicas_the_payment_stays_unspent_and_works_after_redeploy(
        paid_api: httpx.AsyncClient, chain: devchain.DevChain, workers: Workers) -> None:
    amount = await amount_of(paid_api)
    await asyncio.to_thread(delete, workers.settings)

    async def unavailable() -> httpx.Response | None:
        response = await probe(paid_api)
        return response if response.status_code == 503 else None

    refused = await eventually(unavailable, 30, "the API sees the workers gone")
    assert refused.json()["error"] == "MODEL_UNAVAILABLE", refused.text
    assert "no worker app" in refused.json()["message"]

    terms = Terms(amount)
    headers = v2_header(terms, sign(terms))
    before = await chain.balance_of(PAYER.address)
    response = await paid_api.post("/v1/images/generate", json=SLOW_REQUEST, headers=headers)
    assert response.status_code == 503 and response.json()["error"] == "MODEL_UNAVAILABLE", response.text
    assert await chain.balance_of(PAYER.address) == before
    assert not await chain.authorization_state(PAYER.address, terms.nonce)

    status = await asyncio.to_thread(deploy, workers.settings, timeout_s=300)
    assert status.running_replicas == 2

    async def available() -> bool:
        return (await probe(paid_api)).status_code == 402

    await eventually(available, 60, "the API sees the workers back")
    paid = await paid_api.post("/v1/images/generate", json=SLOW_REQUEST, headers=headers)
    assert paid.status_code == 200, paid.text
    assert await chain.balance_of(PAYER.address) == before - amount
