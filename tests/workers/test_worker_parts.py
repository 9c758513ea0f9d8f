"""The parts of the Ray workers that need no cluster: the per-key batcher, the deployment's options,
the wire protocol's errors, the loopback rule."""

from __future__ import annotations

import asyncio
import time

import pytest

from imagegate.backends.base import GenerationJob
from imagegate.catalog import build_catalog
from imagegate.config import load_settings
from imagegate.errors import GenerationFailed, ModelBusy, UpstreamUnavailable
from imagegate.workers.deployment import _Batcher, _Ticket, deployment_options, replicas_for
from imagegate.workers.protocol import BatchKey, Rendered, WorkerFailure
from imagegate.workers.ray import _is_loopback
from tests.workers.conftest import simulated_model

SETTINGS = load_settings(models={"sim": simulated_model(0)})
SPEC = build_catalog(SETTINGS)["sim"]


def ticket(name: str, images: int = 1) -> _Ticket:
    job = GenerationJob(SPEC, name, None, 128, 128, 4, None, tuple(range(images)), True)
    return _Ticket(name, job, asyncio.get_running_loop().create_future())


class Runs:
    """A stand-in pipeline: records each batch and holds it for ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.batches: list[list[str]] = []

    async def __call__(self, tickets: list[_Ticket]) -> None:
        self.batches.append([ticket.job_id for ticket in tickets])
        await asyncio.sleep(self.seconds)
        for each in tickets:
            each.tell(Rendered([], None, "replica", len(tickets)))


async def test_a_lone_job_waits_for_company_then_runs_alone() -> None:
    runs = Runs(0.0)
    batcher = _Batcher(runs, max_images=8, wait_s=0.2)
    started = time.monotonic()
    lone = ticket("lone")
    batcher.submit(lone)
    await lone.outcome
    assert runs.batches == [["lone"]] and time.monotonic() - started >= 0.2


async def test_jobs_arriving_during_a_render_ride_together_in_the_next_call() -> None:
    runs = Runs(0.3)
    batcher = _Batcher(runs, max_images=8, wait_s=0.0)
    first = ticket("first")
    batcher.submit(first)
    await asyncio.sleep(0.05)  # the first call renders now
    later = [ticket(f"later-{index}") for index in range(5)]
    for index, each in enumerate(later):
        batcher.submit(each)
        await asyncio.sleep(0.02 * index)  # spread out: each would be alone in a timed window
    await asyncio.gather(first.outcome, *(each.outcome for each in later))
    assert runs.batches == [["first"], [each.job_id for each in later]]


async def test_a_call_takes_the_oldest_jobs_that_fit_its_images() -> None:
    runs = Runs(0.0)
    batcher = _Batcher(runs, max_images=4, wait_s=0.05)
    jobs = [ticket("a", 2), ticket("b", 1), ticket("c", 4), ticket("d", 1)]
    for each in jobs:
        batcher.submit(each)
    await asyncio.gather(*(each.outcome for each in jobs))
    assert runs.batches == [["a", "b"], ["c"], ["d"]]


async def test_a_job_nobody_waits_for_is_dropped_before_it_runs() -> None:
    runs = Runs(0.2)
    batcher = _Batcher(runs, max_images=1, wait_s=0.0)
    running, gone, kept = ticket("running"), ticket("gone"), ticket("kept")
    for each in (running, gone, kept):
        batcher.submit(each)
    gone.waiters = 0  # its caller went away (the API's deadline passed)
    await asyncio.gather(running.outcome, kept.outcome)
    outcome = await gone.outcome
    assert isinstance(outcome, WorkerFailure) and outcome.dropped
    assert runs.batches == [["running"], ["kept"]]


def test_compatible_jobs_share_a_key_and_others_do_not() -> None:
    base = GenerationJob(SPEC, "a", None, 128, 128, 4, None, (1,), True)
    assert BatchKey.of(base) == BatchKey.of(GenerationJob(SPEC, "b", None, 128, 128, 4, None, (2, 3), False))
    for different in (GenerationJob(SPEC, "a", "blur", 128, 128, 4, None, (1,), True),
                      GenerationJob(SPEC, "a", None, 256, 128, 4, None, (1,), True),
                      GenerationJob(SPEC, "a", None, 128, 128, 5, None, (1,), True),
                      GenerationJob(SPEC, "a", None, 128, 128, 4, 2.0, (1,), True)):
        assert BatchKey.of(different) != BatchKey.of(base)


def test_one_replica_per_gpu_unless_told_otherwise() -> None:
    assert replicas_for(8, 1) == 8 and replicas_for(8, 0.5) == 16 and replicas_for(3, 2) == 1
    with pytest.raises(ValueError, match="fewer than one replica"):
        replicas_for(0, 1)
    with pytest.raises(ValueError, match="explicit"):
        replicas_for(8, 0)
    options = deployment_options(load_settings(workers={"engine": "ray", "gpus_per_replica": 0.5}), 4)
    assert options["num_replicas"] == 8 and options["ray_actor_options"] == {"num_gpus": 0.5, "num_cpus": 1.0}
    assert options["max_ongoing_requests"] == 16  # two batches of 8
    scaled = deployment_options(load_settings(workers={
        "engine": "ray", "autoscaling": {"min_replicas": 1, "max_replicas": 8},
        "deployment_options": {"health_check_period_s": 2}}), 8)
    assert "num_replicas" not in scaled and scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 8}
    assert scaled["health_check_period_s"] == 2


def test_worker_errors_cross_as_data_and_come_back_as_the_same_errors() -> None:
    busy = WorkerFailure.from_error(ModelBusy("busy", retry_after=30, details={"model": "m"}), out_of_memory=True)
    error = busy.to_error()
    assert isinstance(error, ModelBusy) and error.retry_after == 30 and error.details == {"model": "m"}
    assert busy.out_of_memory
    assert isinstance(WorkerFailure.from_error(UpstreamUnavailable("down")).to_error(), UpstreamUnavailable)
    assert type(WorkerFailure("SomethingElse", "odd").to_error()) is GenerationFailed


def test_a_loopback_address_is_recognised() -> None:
    assert _is_loopback("127.0.0.1:6379") and _is_loopback("localhost:1") and _is_loopback("[::1]:6379")
    assert not _is_loopback("10.0.0.1:6379") and not _is_loopback("auto") and not _is_loopback("head:6379")
