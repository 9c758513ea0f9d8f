"""GPU workers on Ray Serve: the engine an API process renders through (``[workers] engine = "ray"``)
and the cluster operations behind ``imagegate workers``.

The API process is a Ray driver (``ray.init(address=...)``; its host must run a Ray node) and calls
the model hosts of ``deployment.py`` through a deployment handle: one streaming call per job, routed
by model (``multiplexed_model_id``) to replicas that already hold it. What Serve leaves to the caller
(scale-out.md §1, §4) happens here:

- a deadline on every job, after which the call is cancelled on the replica (``cancel()``), not
  left running on a GPU nobody pays for;
- retries of the same job id, within ``max_attempts``, when its replica dies (``ActorDiedError``,
  ``ActorUnavailableError``) or reports running out of accelerator memory; Serve itself never
  retries a request a replica has accepted. One render call returns one result, so a paid job is
  delivered once whatever happened on the way;
- 503 when no replica takes the job (the service then gives the payment back: nothing is settled
  and the same signed payment works later);
- admission before payment, per model, against the replicas running now: their batch capacity plus
  ``[workers] max_queue`` waiting. The count is **per API process**: N API processes admit up to N
  times as much (Serve's own ``max_queued_requests`` is per caller too); size ``max_queue`` for that.

Ray is imported only here and in ``deployment.py``: the embedded default never loads it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from imagegate.backends import Backends
from imagegate.backends.base import Availability, GenerationJob, GenerationResult
from imagegate.catalog import ModelSpec
from imagegate.config import Settings
from imagegate.errors import GenerationFailed, GenerationTimedOut, ImagegateError, ModelBusy, ModelUnavailable
from imagegate.types import ImageRequest
from imagegate.workers.base import Admission, Engine, ProgressSink, RenderProgress
from imagegate.workers.protocol import (
    Accepted,
    Rendered,
    ReplicaStats,
    Started,
    Stepped,
    WorkerEvent,
    WorkerFailure,
    jobs_per_batch,
)

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

log = logging.getLogger(__name__)

# Ray binds and dials the machine's network address even for a head on 127.0.0.1, unless this is
# "0" before Ray is imported (then it keeps to loopback, single-node only; scale-out.md §9).
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Retry-After before any render was timed, its upper bound, and after the workers disappeared.
DEFAULT_RETRY_AFTER_S = 5
MAX_RETRY_AFTER_S = 300
NO_WORKERS_RETRY_AFTER_S = 10
RUN_TIME_SMOOTHING = 0.3
# Pause before trying a job again, doubled per try (with jitter), at most this long.
RETRY_BACKOFF_S = 0.25
MAX_RETRY_BACKOFF_S = 2.0
# How long a worker's answer about a model's availability may take before it counts as none.
MODEL_CHECK_TIMEOUT_S = 10.0
# A failed connection to the cluster is tried again after this long.
RECONNECT_AFTER_S = 5.0
RECENT_RENDERS = 256
# AppStatus.status when the controller could not be asked.
UNREACHABLE = "UNREACHABLE"


# --- the cluster -------------------------------------------------------------------------------


def _is_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def pin_loopback(address: str) -> None:
    """Keep Ray on loopback when the cluster is on loopback (must run before Ray is imported)."""
    if not _is_loopback(address):
        return
    os.environ.setdefault(RAY_LOOPBACK_ENV, "0")
    if "ray" in sys.modules:
        # Read once by Ray at import time; a process that imported Ray first would dial this
        # machine's network address instead of the loopback head.
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError(f"Ray was imported before {RAY_LOOPBACK_ENV}=0 was set; a loopback cluster "
                               f"({address}) needs it set before Ray's import")


_connect_lock = threading.Lock()


def connect(address: str) -> None:
    """Join the cluster at ``address`` as a driver, once per process; blocking (seconds).

    ``ray.init`` replaces the SIGTERM handler of the main thread (scale-out.md §1.8: uvicorn then dies
    mid-request instead of draining), so this process's own handlers are put back afterwards.
    """
    pin_loopback(address)
    with _connect_lock:
        import ray

        if ray.is_initialized():
            return
        on_main_thread = threading.current_thread() is threading.main_thread()
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if on_main_thread else {}
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        finally:
            for sig, handler in saved.items():
                if handler is not None and signal.getsignal(sig) is not handler:
                    signal.signal(sig, handler)


@dataclass(frozen=True)
class AppStatus:
    """The worker app as Serve's controller sees it."""

    deployed: bool
    # Serve's application status (RUNNING, DEPLOYING, UNHEALTHY, DEPLOY_FAILED, ...), or NOT_DEPLOYED.
    status: str
    running_replicas: int
    replicas: dict[str, int] = field(default_factory=dict)
    message: str = ""


def read_app_status(app_name: str) -> AppStatus:
    """Blocking: one call to Serve's controller (after ``connect``)."""
    from ray import serve

    application = serve.status().applications.get(app_name)
    if application is None:
        return AppStatus(False, "NOT_DEPLOYED", 0)
    replicas: dict[str, int] = {}
    for deployment in application.deployments.values():
        for state, count in deployment.replica_states.items():
            replicas[_name(state)] = replicas.get(_name(state), 0) + count
    messages = [application.message, *(d.message for d in application.deployments.values())]
    return AppStatus(True, _name(application.status), replicas.get("RUNNING", 0), replicas,
                     " ".join(message for message in messages if message))


def _name(state: Any) -> str:
    """Serve's status enums (str-valued) as their plain names."""
    return str(getattr(state, "value", state))


def deploy(settings: Settings, *, timeout_s: float = 900.0,
           on_status: Callable[[AppStatus], None] | None = None) -> AppStatus:
    """Deploy (or update) the worker app on the cluster of ``[workers] address``; wait until it runs.

    Blocking. ``on_status`` hears every change of status while waiting. Raises ``RuntimeError`` when
    the app fails to deploy or is not running within ``timeout_s`` (the app stays deployed then).
    """
    workers = settings.workers
    connect(workers.address)
    import ray
    from ray import serve

    from imagegate.workers.deployment import build_app

    # Handles only: no HTTP proxy on any node (it would listen on every interface).
    serve.start(proxy_location="Disabled")
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))  # type: ignore[no-untyped-call]
    application = build_app(settings, cluster_gpus)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            serve.run(application, name=workers.app_name, route_prefix=None)
            outcome.append(None)
        except BaseException as error:  # handed to the waiting thread below, which raises it
            outcome.append(error)

    runner = threading.Thread(target=run, name="serve-run", daemon=True)
    runner.start()
    deadline = time.monotonic() + timeout_s
    last: AppStatus | None = None
    while runner.is_alive() and time.monotonic() < deadline:
        runner.join(timeout=1.0)
        status = read_app_status(workers.app_name)
        if status != last and on_status is not None:
            on_status(status)
        last = status
    if runner.is_alive():
        raise RuntimeError(f"the worker app {workers.app_name!r} is not running after {timeout_s:.0f} s: "
                           f"{last.status if last else 'unknown'} {last.message if last else ''}".strip())
    if outcome and outcome[0] is not None:
        raise RuntimeError(f"the worker app {workers.app_name!r} failed to deploy: {outcome[0]}") from outcome[0]
    return read_app_status(workers.app_name)


def delete(settings: Settings) -> None:
    """Remove the worker app (its replicas stop); blocking."""
    connect(settings.workers.address)
    from ray import serve

    serve.delete(settings.workers.app_name)


def app_handle(app_name: str) -> DeploymentHandle[Any]:
    from ray import serve

    return serve.get_app_handle(app_name)


async def replica_stats(handle: DeploymentHandle[Any], replicas: int, *,
                        attempts_per_replica: int = 20) -> list[ReplicaStats]:
    """Every running replica's ``stats``, asked until ``replicas`` distinct ones have answered (or a
    bounded number of calls is spent).

    Serve routes a call to the candidate with the fewest ongoing requests, so calls made one after
    another all reach an idle replica while a busy one renders. Each round therefore sends several
    calls at once, twice as many as the round before: the router counts the calls it has sent, so
    once the idle replicas hold as many as the busy ones the rest spread over all of them."""
    seen: dict[str, ReplicaStats] = {}
    budget = max(1, replicas) * attempts_per_replica
    round_size = 2 * max(1, replicas)
    while budget > 0 and len(seen) < replicas:
        calls = min(round_size, budget)
        budget -= calls
        answers: list[ReplicaStats] = await asyncio.gather(*(handle.stats.remote() for _ in range(calls)))
        for stats in answers:
            seen[stats.replica] = stats
        round_size *= 2
    return list(seen.values())


# --- the engine --------------------------------------------------------------------------------


@dataclass
class _ModelLine:
    """This API process's admitted renders of one model, and how long they take."""

    admitted: int = 0
    seconds_per_render: float | None = None

    def observe(self, seconds: float) -> None:
        previous = self.seconds_per_render
        self.seconds_per_render = seconds if previous is None else (
            RUN_TIME_SMOOTHING * seconds + (1 - RUN_TIME_SMOOTHING) * previous)

    def retry_after(self, capacity: int) -> int:
        if self.seconds_per_render is None:
            return DEFAULT_RETRY_AFTER_S
        rounds = self.admitted / max(1, capacity)
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self.seconds_per_render * rounds)))


@dataclass(frozen=True)
class RenderReport:
    """How one render went, for logs, tests and benchmarks."""

    job_id: str
    model: str
    attempts: int
    # Replicas that held the job, in order (a died one first when it was retried).
    replicas: list[str]
    # Jobs in the pipeline call that rendered it.
    batch_jobs: int
    seconds: float


class _Retry(Exception):
    """This try failed in a way another try may not: the replica died or ran out of memory."""

    def __init__(self, reason: str, failure: WorkerFailure | None = None):
        super().__init__(reason)
        self.reason = reason
        self.failure = failure


class RayEngine(Engine):
    """Renders on the Serve app ``[workers] app_name`` of the cluster at ``[workers] address``."""

    def __init__(self, settings: Settings, backends: Backends | None = None):
        self._settings = settings
        self._workers = settings.workers
        # For check_request only (what a backend refuses before payment); nothing loads here.
        self._backends = backends or Backends(settings)
        self._lines: dict[str, _ModelLine] = {}
        self._connected = False
        self._connect_error: tuple[str, float] | None = None
        self._connecting: asyncio.Lock | None = None
        self._status: AppStatus | None = None
        self._status_read_at = -math.inf
        self._status_refresh: asyncio.Task[AppStatus] | None = None
        self._model_checks: dict[str, tuple[Availability, float]] = {}
        self._handle: DeploymentHandle[Any] | None = None
        # Per replica, the models it said it holds with its last result.
        self._replica_models: dict[str, dict[str, int]] = {}
        self.recent_renders: deque[RenderReport] = deque(maxlen=RECENT_RENDERS)

    # --- before payment ------------------------------------------------------------------------

    def check_request(self, spec: ModelSpec, request: ImageRequest) -> None:
        if self._backends.known(spec.backend):
            self._backends.get(spec.backend).check_request(spec, request)

    async def availability(self, spec: ModelSpec) -> Availability:
        problem = await self._connection_problem()
        if problem is not None:
            return Availability(False, problem, NO_WORKERS_RETRY_AFTER_S)
        status = await self._app_status()
        name, address = self._workers.app_name, self._workers.address
        if status.status == UNREACHABLE:
            return Availability(False, f"cannot read the worker app's status from the Ray cluster at {address} "
                                       f"({status.message})", NO_WORKERS_RETRY_AFTER_S)
        if not status.deployed:
            return Availability(False, f"no worker app {name!r} on the Ray cluster at {address} (deploy it with "
                                       "`imagegate workers deploy`)", NO_WORKERS_RETRY_AFTER_S)
        if status.running_replicas == 0:
            detail = f": {status.message}" if status.message else ""
            return Availability(False, f"the worker app {name!r} has no running replica ({status.status}{detail})",
                                NO_WORKERS_RETRY_AFTER_S)
        return await self._model_availability(spec)

    def admit(self, spec: ModelSpec) -> Admission:
        line = self._line(spec.id)
        capacity = self._capacity()
        if line.admitted >= capacity + self._workers.max_queue:
            waiting = max(0, line.admitted - capacity)
            raise ModelBusy(
                f"Model {spec.id!r} is busy: {line.admitted} requests are already rendering or waiting on its "
                "workers; nothing was charged, try again shortly",
                retry_after=line.retry_after(capacity),
                details={"model": spec.id, "queued": waiting},
            )
        line.admitted += 1

        def release() -> None:
            line.admitted -= 1

        return Admission(spec.id, release)

    def _capacity(self) -> int:
        """Jobs the running replicas render at once: one batch each (one job each without batching)."""
        replicas = self._status.running_replicas if self._status is not None else 0
        return replicas * jobs_per_batch(self._workers)

    # --- rendering -------------------------------------------------------------------------------

    async def render(
        self,
        job: GenerationJob,
        admission: Admission,
        *,
        progress: ProgressSink | None = None,
        timeout_s: float | None = None,
    ) -> GenerationResult:
        job_id = uuid.uuid4().hex
        line = self._line(job.spec.id)
        started = time.perf_counter()
        replicas: list[str] = []
        try:
            async with asyncio.timeout(timeout_s):
                handle = await self._ready_handle(job.spec)
                for attempt in range(1, self._workers.max_attempts + 1):
                    try:
                        rendered = await self._attempt(handle, job_id, job, progress, replicas)
                    except _Retry as retry:
                        if attempt == self._workers.max_attempts:
                            raise self._gave_up(job, attempt, retry) from retry
                        log.warning("job %s (%s): %s; trying again (%d of %d)", job_id, job.spec.id, retry.reason,
                                    attempt + 1, self._workers.max_attempts)
                        backoff = min(MAX_RETRY_BACKOFF_S, RETRY_BACKOFF_S * 2 ** (attempt - 1))
                        await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                        continue
                    seconds = time.perf_counter() - started
                    line.observe(seconds)
                    self.recent_renders.append(RenderReport(job_id, job.spec.id, attempt, replicas,
                                                            rendered.batch_jobs, seconds))
                    if attempt > 1:
                        log.warning("job %s (%s) delivered after %d tries (replicas %s)", job_id, job.spec.id,
                                    attempt, ", ".join(replicas))
                    return GenerationResult(rendered.images, rendered.provider_cost_micros)
                raise AssertionError("unreachable: the last try either returns or raises")
        except TimeoutError as exc:
            raise GenerationTimedOut(
                f"Generation with model {job.spec.id!r} did not finish within {timeout_s:.0f} s and was "
                "cancelled on its worker; nothing was charged. Try again later or with fewer or smaller images.",
                retry_after=line.retry_after(self._capacity()),
                details={"model": job.spec.id},
            ) from exc
        finally:
            admission.release()

    async def _attempt(self, handle: DeploymentHandle[Any], job_id: str, job: GenerationJob,
                       progress: ProgressSink | None, replicas: list[str]) -> Rendered:
        """One try on one replica: its events into ``progress``, and its images."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        model = job.spec.id
        stream = cast("DeploymentResponseGenerator[WorkerEvent]",
                      handle.options(stream=True, multiplexed_model_id=model).render.remote(job_id, job))
        replica: str | None = None
        finished = False
        try:
            try:
                async with asyncio.timeout(self._workers.accept_timeout_s):
                    accepted: WorkerEvent = await anext(stream)
            except TimeoutError as exc:
                raise ModelUnavailable(
                    f"No worker took the job for model {model!r} within {self._workers.accept_timeout_s:.0f} s; "
                    "nothing was charged, try again later",
                    retry_after=NO_WORKERS_RETRY_AFTER_S, details={"model": model}) from exc
            assert isinstance(accepted, Accepted), accepted
            replica = accepted.replica
            replicas.append(replica)
            async for event in stream:
                match event:
                    case Started():
                        if progress is not None:
                            progress(RenderProgress.running())
                    case Stepped(step=step, total_steps=total_steps):
                        if progress is not None:
                            progress(RenderProgress.stepped(step, total_steps))
                    case Rendered():
                        finished = True
                        self._replica_models[event.replica] = event.loaded_models
                        return event
                    case WorkerFailure(out_of_memory=True):
                        finished = True
                        raise _Retry(f"replica {replica} ran out of accelerator memory", event)
                    case WorkerFailure(dropped=True):
                        finished = True
                        raise _Retry(f"replica {replica} dropped the job", event)
                    case WorkerFailure():
                        finished = True
                        raise event.to_error()
            finished = True
            raise _Retry(f"replica {replica} ended the job without a result")
        except (ActorDiedError, ActorUnavailableError, ReplicaUnavailableError) as exc:
            finished = True  # nothing left to cancel there
            self._forget_replica(replica)
            raise _Retry(f"its replica {replica or '(not yet known)'} is gone ({type(exc).__name__})") from exc
        except BackPressureError as exc:
            finished = True
            raise ModelBusy(f"Model {model!r} is busy on every worker; nothing was charged, try again shortly",
                            retry_after=math.ceil(exc.retry_after_s or DEFAULT_RETRY_AFTER_S),
                            details={"model": model}) from exc
        except DeploymentUnavailableError as exc:
            finished = True
            raise ModelUnavailable(f"Model {model!r}: the worker app failed to deploy; nothing was charged",
                                   retry_after=NO_WORKERS_RETRY_AFTER_S, details={"model": model}) from exc
        except RayTaskError as exc:
            finished = True
            if isinstance(exc, ImagegateError):  # Ray re-raises a worker's exception as its own class too
                raise
            log.error("job %s (%s) failed on replica %s: %s", job_id, model, replica, exc)
            raise GenerationFailed(f"Generation with model {model!r} failed on a worker",
                                   details={"model": model}) from exc
        finally:
            if not finished:
                # Deadline, or the request itself went away: stop the work on the replica.
                stream.cancel()  # type: ignore[no-untyped-call]

    def _gave_up(self, job: GenerationJob, attempts: int, retry: _Retry) -> ImagegateError:
        if retry.failure is not None and retry.failure.out_of_memory:
            return retry.failure.to_error()
        return ModelUnavailable(
            f"Model {job.spec.id!r}: the job failed on {attempts} worker tries (last: {retry.reason}); nothing "
            "was charged, try again shortly", retry_after=NO_WORKERS_RETRY_AFTER_S,
            details={"model": job.spec.id, "attempts": attempts})

    def _forget_replica(self, replica: str | None) -> None:
        if replica is not None:
            self._replica_models.pop(replica, None)
        # Its replacement changes the replica count: read it again before the next admission.
        self._status_read_at = -math.inf

    # --- what the API can see ----------------------------------------------------------------------

    def queue_depth(self, model_id: str) -> int:
        line = self._lines.get(model_id)
        return 0 if line is None else line.admitted

    def loaded_models(self) -> dict[str, int]:
        """Models the replicas said they hold with their latest results (bytes summed over replicas)."""
        loaded: dict[str, int] = {}
        for models in self._replica_models.values():
            for model_id, size in models.items():
                loaded[model_id] = loaded.get(model_id, 0) + size
        return loaded

    async def replica_stats(self) -> list[ReplicaStats]:
        """Every running replica's own view (models, jobs, batches)."""
        status = await self._app_status(fresh=True)
        if status.running_replicas == 0:
            return []
        return await replica_stats(await self._app_handle(), status.running_replicas)

    async def aclose(self) -> None:
        # The driver connection lives as long as the process (other engines of it may share it).
        if self._status_refresh is not None:
            self._status_refresh.cancel()
            await asyncio.gather(self._status_refresh, return_exceptions=True)
        await self._backends.aclose()

    # --- internals -----------------------------------------------------------------------------------

    def _line(self, model_id: str) -> _ModelLine:
        line = self._lines.get(model_id)
        if line is None:
            line = self._lines[model_id] = _ModelLine()
        return line

    async def _connection_problem(self) -> str | None:
        if self._connected:
            return None
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._connected:
                return None
            if self._connect_error is not None and time.monotonic() - self._connect_error[1] < RECONNECT_AFTER_S:
                return self._connect_error[0]
            address = self._workers.address
            try:
                await asyncio.to_thread(connect, address)
            # ray.init raises ConnectionError, RuntimeError or ValueError by cause (no cluster, version
            # mismatch, bad address); each means the workers cannot be reached from here now.
            except (ConnectionError, RuntimeError, ValueError) as error:
                log.warning("cannot reach the Ray cluster at %s: %s", address, error)
                self._connect_error = (f"cannot reach the Ray cluster at {address}: {error}", time.monotonic())
                return self._connect_error[0]
            self._connected = True
            self._connect_error = None
            return None

    async def _app_status(self, *, fresh: bool = False) -> AppStatus:
        """The app's status. Once known it is answered at once and read again in the background when
        older than ``status_ttl_s`` (one read at a time), so no request waits for the controller."""
        current = self._status
        read_again = fresh or time.monotonic() - self._status_read_at >= self._workers.status_ttl_s
        if read_again and (self._status_refresh is None or self._status_refresh.done()):
            self._status_refresh = asyncio.create_task(self._read_status())
        if current is not None and not fresh:
            return current
        assert self._status_refresh is not None
        return await asyncio.shield(self._status_refresh)

    async def _read_status(self) -> AppStatus:
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        try:
            status = await asyncio.to_thread(read_app_status, self._workers.app_name)
        # The controller or the cluster's GCS is down or unreachable right now.
        except (RayError, RayServeException, ConnectionError, TimeoutError) as error:
            status = AppStatus(False, UNREACHABLE, 0, message=f"{type(error).__name__}: {error}")
        if status != self._status:
            log.info("worker app %s: %s, %d running replicas %s", self._workers.app_name, status.status,
                     status.running_replicas, status.message)
        if not status.deployed or status.running_replicas == 0:
            self._model_checks.clear()
        self._status, self._status_read_at = status, time.monotonic()
        return status

    async def _app_handle(self) -> DeploymentHandle[Any]:
        if self._handle is None:
            self._handle = await asyncio.to_thread(app_handle, self._workers.app_name)
        return self._handle

    async def _ready_handle(self, spec: ModelSpec) -> DeploymentHandle[Any]:
        """The handle, after the same checks as ``availability`` (the workers may have gone since)."""
        availability = await self.availability(spec)
        if not availability.available:
            raise ModelUnavailable(f"Model {spec.id!r} is not available on this server: {availability.reason}",
                                   retry_after=availability.retry_after, details={"model": spec.id})
        return await self._app_handle()

    async def _model_availability(self, spec: ModelSpec) -> Availability:
        """What a worker says about the model (its weights, device, keys), reused for ``model_check_ttl_s``."""
        cached = self._model_checks.get(spec.id)
        if cached is not None and time.monotonic() - cached[1] < self._workers.model_check_ttl_s:
            return cached[0]
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        try:
            handle = await self._app_handle()
            async with asyncio.timeout(MODEL_CHECK_TIMEOUT_S):
                availability: Availability = await handle.availability.remote(spec.id)
        except (TimeoutError, RayError, RayServeException) as error:
            # Not cached: the next request asks again.
            return Availability(False, f"the workers did not answer about {spec.id!r} ({type(error).__name__})",
                                NO_WORKERS_RETRY_AFTER_S)
        if availability.reason is not None:
            availability = Availability(availability.available, f"on the workers: {availability.reason}",
                                        availability.retry_after)
        self._model_checks[spec.id] = (availability, time.monotonic())
        return availability


__all__ = ["AppStatus", "RayEngine", "RenderReport", "app_handle", "connect", "delete", "deploy", "pin_loopback",
           "read_app_status", "replica_stats"]
