"""The Ray Serve side of ``[workers] engine = "ray"``: one ``ModelHost`` per replica, one replica per
GPU by default.

A replica builds the same catalog and ``Backends`` as an API process would from the operator's
settings, so *what* generates (diffusers pipelines, hosted providers, imagegate-tiny, the simulated
GPU) is unchanged; only *where* differs. For each job (``render``, a stream of ``protocol`` events):

1. Answer ``Accepted`` at once, so the API knows a replica holds the job.
2. Note the model in Serve's multiplexing (``serve.multiplexed``): Serve routes a model's requests to
   replicas that already hold it and forgets the least recently used beyond ``models_per_replica``;
   memory itself stays under the backend's budget (diffusers evicts its least recently used idle
   pipeline when a new one would not fit).
3. Queue the job in the batcher of its compatibility key (``protocol.BatchKey``: model, size,
   steps, guidance, negative prompt or not), one per key, made on first use: jobs of any clients
   that arrive within ``batch_wait_s``, or while the key's previous call renders, ride in one
   ``Backend.generate_batch`` call of at most ``batch_max_images`` images.
4. Stream the call's steps to every job in it, then each job's own images (or the failure).

A job whose callers all went away (the API's deadline passed and it called ``cancel()``) stops at
the next denoising step of its pipeline call, unless other jobs in that call still wait. A job id
sent again while the first copy still runs here joins it instead of rendering twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ray import serve
from ray.serve.deployment import Application

from imagegate.backends import Backends
from imagegate.backends.base import Availability, GenerationJob, RenderCancelled
from imagegate.catalog import Catalog, build_catalog
from imagegate.config import Settings
from imagegate.errors import GenerationFailed, ImagegateError, ModelUnavailable
from imagegate.workers.protocol import (
    Accepted,
    ActiveJob,
    BatchKey,
    Rendered,
    ReplicaStats,
    Started,
    Stepped,
    WorkerEvent,
    WorkerFailure,
    jobs_per_batch,
)

# Serve's replica logger: lines land in the replica's log file with its request ids.
log = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "ModelHost"
# Recent batch sizes and finished job ids kept for ``stats``.
RECENT = 256


@dataclass(eq=False)
class _Ticket:
    """One job on this replica, from its arrival to its outcome."""

    job_id: str
    job: GenerationJob
    outcome: asyncio.Future[Rendered | WorkerFailure]
    # What its pipeline call says, for the first caller's stream.
    events: asyncio.Queue[WorkerEvent] = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.monotonic)
    # Callers still waiting for the outcome (the first one, and any that sent the same job id again).
    waiters: int = 1
    state: Literal["waiting", "rendering"] = "waiting"

    @property
    def images(self) -> int:
        return len(self.job.seeds)

    @property
    def abandoned(self) -> bool:
        return self.waiters == 0

    def tell(self, event: WorkerEvent) -> None:
        self.events.put_nowait(event)
        if isinstance(event, Rendered | WorkerFailure) and not self.outcome.done():
            self.outcome.set_result(event)


class _Batcher:
    """The jobs of one compatibility key on one replica, run as batches one after the other.

    Hand-written rather than ``@serve.batch``: Serve closes a batch when its wait expires even while
    the previous batch still renders (the semaphore only orders the runs), so under steady load the
    requests that arrive during a multi-second render are cut into many small batches, each paying the
    pipeline call's fixed cost (bench/bench_workers.py: 0.5x linear at 4 replicas with it, 1.0x now).
    Here a batch closes when the key's previous one has finished: a lone request waits ``wait_s``
    for company; requests that arrived during a render all ride in the next call, up to
    ``max_images`` images, first come first served.
    """

    def __init__(self, run_batch: Callable[[list[_Ticket]], Awaitable[None]], *, max_images: int,
                 wait_s: float) -> None:
        self._run_batch = run_batch
        self._max_images = max_images
        self._wait_s = wait_s
        self._waiting: deque[_Ticket] = deque()
        self._arrival = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    def submit(self, ticket: _Ticket) -> None:
        self._waiting.append(ticket)
        self._arrival.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while self._drop_abandoned():
            # 1. Company for the oldest job: until the batch is full or its wait is over.
            deadline = self._waiting[0].arrived + self._wait_s
            while self._images_waiting() < self._max_images and time.monotonic() < deadline:
                self._arrival.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(deadline - time.monotonic()):
                        await self._arrival.wait()
            if not self._drop_abandoned():
                return
            # 2. The oldest jobs that fit, in one pipeline call; 3. the next batch after it.
            batch: list[_Ticket] = []
            images = 0
            while self._waiting and images + self._waiting[0].images <= self._max_images:
                ticket = self._waiting.popleft()
                batch.append(ticket)
                images += ticket.images
            try:
                await self._run_batch(batch)
            except Exception:
                # A bug of this module, not of a backend (those become failures in ``_outcomes``): its
                # callers hear it now instead of waiting for their deadline, and the key keeps serving.
                log.exception("a batch of %d jobs broke down", len(batch))
                for ticket in batch:
                    ticket.tell(WorkerFailure(GenerationFailed.__name__, "the worker failed to run the job"))

    def _images_waiting(self) -> int:
        return sum(ticket.images for ticket in self._waiting)

    def _drop_abandoned(self) -> bool:
        """Forget waiting jobs nobody waits for any more; whether any job is left."""
        for ticket in [ticket for ticket in self._waiting if ticket.abandoned]:
            self._waiting.remove(ticket)
            ticket.tell(WorkerFailure(GenerationFailed.__name__, "dropped before it ran: nobody waits for it",
                                      dropped=True))
        return bool(self._waiting)


@dataclass
class _HostedModel:
    """What ``serve.multiplexed`` holds per model: the id, dropped from the replica's list on eviction."""

    model_id: str
    hosted: list[str] = field(repr=False)

    def __del__(self) -> None:
        # Serve calls this on eviction and the garbage collector may call it again: idempotent.
        if self.model_id in self.hosted:
            self.hosted.remove(self.model_id)


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` comes from the accelerator running out of memory (torch raised it)."""
    cause: BaseException | None = error
    while cause is not None:
        if type(cause).__name__ == "OutOfMemoryError":
            return True
        cause = cause.__cause__
    return False


class ModelHost:
    """One replica: renders catalog models through the operator's backends, batching compatible jobs."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._catalog: Catalog = build_catalog(settings)
        self._backends = Backends(settings)
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._pid = os.getpid()
        self._tickets: dict[str, _Ticket] = {}
        self._batchers: dict[BatchKey, _Batcher] = {}
        self._hosted: list[str] = []
        self._recent_batches: deque[int] = deque(maxlen=RECENT)
        self._recent_finished: deque[str] = deque(maxlen=RECENT)
        self._jobs_finished = 0
        self._jobs_cancelled = 0

        async def host_model(model_id: str) -> _HostedModel:
            self._hosted.append(model_id)
            return _HostedModel(model_id, self._hosted)

        # Made here rather than as a decorated method: the number of models comes from the settings.
        self._host_model = serve.multiplexed(max_num_models_per_replica=settings.workers.models_per_replica)(
            host_model)
        # The catalog's backends now (diffusers imports torch: seconds), before Serve sends any request.
        for backend in sorted({spec.backend for spec in self._catalog.values()}):
            if self._backends.known(backend):
                self._backends.get(backend)
        log.info("imagegate model host %s (pid %d) ready: %d catalog models", self._replica, self._pid,
                 len(self._catalog))

    async def render(self, job_id: str, job: GenerationJob) -> AsyncIterator[WorkerEvent]:
        # 1. The API learns at once that a replica holds the job.
        yield Accepted(self._replica, self._pid)
        running = self._tickets.get(job_id)
        if running is not None:
            # The same job again (its first caller lost this replica's answer): wait for that copy.
            running.waiters += 1
            try:
                yield await asyncio.shield(running.outcome)
            finally:
                running.waiters -= 1
            return
        spec = self._catalog.get(job.spec.id)
        if spec is None or not self._backends.known(spec.backend):
            yield WorkerFailure.from_error(ModelUnavailable(
                f"Model {job.spec.id!r} is not in the workers' catalog; deploy the workers with the API's "
                "configuration", details={"model": job.spec.id}))
            return
        # The workers' own entry: where its weights are on this machine, its device and options.
        job = replace(job, spec=spec)
        # 2. Serve's multiplexing: this replica now serves the model (routing affinity, LRU).
        await self._host_model(spec.id)

        # 3. The batcher of the job's compatibility key, and 4. its events.
        ticket = _Ticket(job_id, job, asyncio.get_running_loop().create_future())
        self._tickets[job_id] = ticket
        ticket.outcome.add_done_callback(lambda _: self._tickets.pop(job_id, None))
        self._batcher(BatchKey.of(job)).submit(ticket)
        try:
            while True:
                event = await ticket.events.get()
                yield event
                if isinstance(event, Rendered | WorkerFailure):
                    return
        finally:
            # Gone before the end (the API cancelled it): its batch stops once nobody waits for any job.
            ticket.waiters -= 1

    def _batcher(self, key: BatchKey) -> _Batcher:
        batcher = self._batchers.get(key)
        if batcher is None:
            workers = self._settings.workers
            batcher = self._batchers[key] = _Batcher(
                self._render_batch, max_images=workers.batch_max_images if workers.batching else 1,
                wait_s=workers.batch_wait_s if workers.batching else 0.0)
        return batcher

    async def _render_batch(self, tickets: list[_Ticket]) -> None:
        """One pipeline call for ``tickets``: its steps to all of them, then each one's outcome."""
        count = len(tickets)
        spec = tickets[0].job.spec
        started = Started(count, sum(ticket.images for ticket in tickets))
        for ticket in tickets:
            ticket.state = "rendering"
            ticket.tell(started)
        self._recent_batches.append(count)

        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        def tell_all(event: WorkerEvent) -> None:
            for ticket in tickets:
                ticket.tell(event)

        def on_step(step: int, total_steps: int) -> None:
            # Runs wherever the backend renders (a worker thread for diffusers).
            if all(ticket.abandoned for ticket in tickets):
                raise RenderCancelled(f"every caller of this {spec.id} batch went away (step {step})")
            if threading.get_ident() == loop_thread:
                tell_all(Stepped(step, total_steps))
            else:
                loop.call_soon_threadsafe(tell_all, Stepped(step, total_steps))

        backend = self._backends.get(spec.backend)
        work = asyncio.ensure_future(backend.generate_batch([ticket.job for ticket in tickets], on_step))
        # Steps reported from the render's thread reach the tickets first: their callbacks were queued
        # on this loop before the render's end.
        await asyncio.wait({work})
        for ticket, outcome in zip(tickets, self._outcomes(tickets, work), strict=True):
            ticket.tell(outcome)

    def _outcomes(self, tickets: list[_Ticket], work: asyncio.Future[Any]) -> list[Rendered | WorkerFailure]:
        spec = tickets[0].job.spec
        try:
            results = work.result()
        except RenderCancelled:
            self._jobs_cancelled += len(tickets)
            log.info("cancelled a %s batch of %d jobs: nobody waits for it", spec.id, len(tickets))
            return [WorkerFailure(GenerationFailed.__name__, "cancelled: nobody waits for it", dropped=True)] * len(
                tickets)
        except ImagegateError as error:
            out_of_memory = _out_of_memory(error)
            log.warning("a %s batch of %d jobs failed%s: %s", spec.id, len(tickets),
                        " (out of accelerator memory)" if out_of_memory else "", error.message)
            return [WorkerFailure.from_error(error, out_of_memory=out_of_memory)] * len(tickets)
        except Exception as error:
            # Backends raise imagegate errors only; anything else is a bug, logged with its traceback
            # and reported as a failed generation rather than left to hang the batch's callers.
            log.exception("a %s batch failed unexpectedly", spec.id)
            failure = GenerationFailed(f"Generation with model {spec.id!r} failed on a worker: "
                                       f"{type(error).__name__}", details={"model": spec.id})
            return [WorkerFailure.from_error(failure, out_of_memory=_out_of_memory(error))] * len(tickets)
        self._jobs_finished += len(tickets)
        self._recent_finished.extend(ticket.job_id for ticket in tickets)
        loaded = self._backends.loaded_model_bytes()
        return [Rendered(result.images, result.provider_cost_micros, self._replica, len(tickets), loaded)
                for result in results]

    async def availability(self, model_id: str) -> Availability:
        """Whether ``model_id`` can run on this worker (weights present, device, provider keys)."""
        spec = self._catalog.get(model_id)
        if spec is None:
            return Availability(False, f"the workers' catalog has no enabled model {model_id!r}; deploy the "
                                       "workers with the API's configuration")
        if not self._backends.known(spec.backend):
            return Availability(False, f"backend {spec.backend!r} is not installed on the workers")
        return await self._backends.get(spec.backend).availability(spec)

    def stats(self) -> ReplicaStats:
        return ReplicaStats(
            replica=self._replica,
            pid=self._pid,
            active=[ActiveJob(ticket.job_id, ticket.job.spec.id, ticket.state) for ticket in self._tickets.values()],
            recent_batches=list(self._recent_batches),
            jobs_finished=self._jobs_finished,
            jobs_cancelled=self._jobs_cancelled,
            recent_finished=list(self._recent_finished),
            loaded_models=self._backends.loaded_model_bytes(),
            multiplexed_models=list(self._hosted),
        )


def deployment_options(settings: Settings, cluster_gpus: float) -> dict[str, Any]:
    """Serve options of the model-host deployment, from ``[workers]`` and the cluster's GPU count."""
    workers = settings.workers
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_gpus": workers.gpus_per_replica, "num_cpus": workers.cpus_per_replica},
        "max_ongoing_requests": workers.max_ongoing_requests or 2 * jobs_per_batch(workers),
    }
    if workers.autoscaling is not None:
        options["autoscaling_config"] = workers.autoscaling
    else:
        options["num_replicas"] = workers.replicas or replicas_for(cluster_gpus, workers.gpus_per_replica)
    options.update(workers.deployment_options)
    return options


def replicas_for(cluster_gpus: float, gpus_per_replica: float) -> int:
    """One replica per GPU (or per ``gpus_per_replica`` share of one) of the cluster."""
    if gpus_per_replica == 0:
        raise ValueError("[workers] gpus_per_replica = 0 (workers on CPUs) needs an explicit [workers] replicas")
    replicas = int(cluster_gpus // gpus_per_replica)
    if replicas < 1:
        raise ValueError(f"the Ray cluster has {cluster_gpus:g} GPUs, fewer than one replica's "
                         f"{gpus_per_replica:g} ([workers] gpus_per_replica)")
    return replicas


def build_app(settings: Settings, cluster_gpus: float) -> Application:
    """The Serve application: the model host, bound to the operator's settings."""
    return serve.deployment(**deployment_options(settings, cluster_gpus))(ModelHost).bind(settings)
