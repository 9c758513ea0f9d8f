"""Local generation with diffusers pipelines: any catalog model whose source is a pipeline directory
or a Hugging Face repo id.

A generation goes through the numbered steps of ``DiffusersBackend.generate``:

1. Check that the model can run here at all (device, memory budget, weights present).
2. Admission: wait for one of the model's ``max_concurrency`` run slots, in a queue of at most
   ``workers.max_queue`` requests; beyond it, 503 MODEL_BUSY with Retry-After. (The engine admits
   requests before payment against the same bound; this one guards direct use of the backend.)
3. Load the pipeline on first use (once, however many requests arrive together) and keep it,
   evicting least recently used idle pipelines to stay within the memory budget.
4. Map the request onto the pipeline's ``__call__`` parameters, by the catalog's guidance and
   negative-prompt modes.
5. Render in a worker thread: one batched call for all images (or one call per image, with
   ``options.batch_images = false``), one CPU generator per image; each denoising step is reported
   through the pipeline's ``callback_on_step_end``, which can also stop the render there.
   ``generate_batch`` puts compatible jobs of different clients (Ray workers' dynamic batching)
   into that one call, with one prompt, negative prompt and generator per image.
6. Return the images in seed order.

Reproducibility: image i's initial noise comes only from ``seeds[i]`` (its own generator). The same
request (same seeds, same numberResults, same parameters) gives the same pixels on the same machine,
thread count and library versions. Batched kernels round differently for different batch sizes,
so a batch image re-rendered alone can differ in the last bit; ``options.batch_images = false``
renders each image in its own call and makes that re-render bit-exact, at the cost of batching.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import inspect
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Literal

import httpx
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # exported lazily
from PIL.Image import Image
from pydantic import BaseModel, ConfigDict, ValidationError

from imagegate.backends.base import (
    Availability,
    Backend,
    GenerationJob,
    GenerationResult,
    RenderCancelled,
    RenderedImage,
    StepCallback,
)
from imagegate.catalog import ModelSpec
from imagegate.config import Settings
from imagegate.errors import GenerationFailed, ModelBusy, ModelUnavailable

log = logging.getLogger(__name__)

GIB = 1024**3
MODEL_INDEX = "model_index.json"
# Share of the device's memory that loaded weights may take when no budget is configured; the rest
# is for activations (GPU) or for the rest of the machine (CPU).
DEFAULT_CUDA_BUDGET_FRACTION = 0.8
DEFAULT_CPU_BUDGET_FRACTION = 0.5
# Retry-After bounds, in seconds: before any run was timed, and after running out of GPU memory.
DEFAULT_RETRY_AFTER_S = 5
MAX_RETRY_AFTER_S = 300
OUT_OF_MEMORY_RETRY_AFTER_S = 30
# Weight of the newest run in the moving average of run times (for Retry-After estimates).
RUN_TIME_SMOOTHING = 0.3
# Threads start on demand; the per-model run slots are what limits concurrent work.
MAX_WORKER_THREADS = 32
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
MAX_ERROR_TEXT = 300
_TRUE_STRINGS = {"1", "on", "yes", "true"}


class DiffusersOptions(BaseModel):
    """The ``options`` table of a diffusers catalog entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # False: one pipeline call per image, so any image re-renders bit for bit from its seed alone
    # (numberResults=1); batched kernels round differently per batch size. Costs GPU throughput.
    batch_images: bool = True
    # Speed settings of the denoiser (the transformer or UNet), applied at load; bench/bench_gpu.py
    # measures them. Attention kernels from diffusers' dispatcher ("native", "flash", "_flash_3",
    # "sage", ...; None: PyTorch's scaled_dot_product_attention).
    attention_backend: str | None = None
    # torch.compile of the denoiser's repeated blocks ("default", "max-autotune-no-cudagraphs";
    # "reduce-overhead" also replays CUDA graphs). Each new size compiles again on first use.
    compile: Literal["off", "default", "max-autotune-no-cudagraphs", "reduce-overhead"] = "off"
    # FP8 weights and matmuls in the denoiser (torchao's float8 dynamic quantization; CUDA GPUs of
    # compute capability 8.9 or newer, e.g. L40S, H100, H200).
    fp8: bool = False
    # Decode images larger than the VAE's own size (1024 px for FLUX and SDXL) in overlapping tiles:
    # 2048x2048 then decodes in a fraction of the memory.
    vae_tiling: bool = False


def apply_speed_options(pipeline: Any, options: DiffusersOptions, device: torch.device) -> None:
    """Apply ``options``' speed settings to a loaded pipeline's denoiser (raises ValueError when the
    machine cannot honour one)."""
    if options.vae_tiling:
        pipeline.vae.enable_tiling()
    denoiser = getattr(pipeline, "transformer", None) or getattr(pipeline, "unet", None)
    if denoiser is None:
        if options.attention_backend or options.compile != "off" or options.fp8:
            raise ValueError(f"{type(pipeline).__name__} has no transformer or UNet to speed up")
        return
    if options.fp8:
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError("fp8 needs a CUDA GPU of compute capability 8.9 or newer")
        try:
            from torchao.quantization import (  # type: ignore[import-not-found]
                Float8DynamicActivationFloat8WeightConfig,
                quantize_,
            )
        except ImportError as exc:
            raise ValueError("fp8 needs torchao (pip install torchao)") from exc
        quantize_(denoiser, Float8DynamicActivationFloat8WeightConfig())
    if options.attention_backend:
        denoiser.set_attention_backend(options.attention_backend)
    if options.compile != "off":
        # Regional compilation: the repeated blocks compile once and are reused, minutes faster
        # to compile than the whole model for the same speed; falls back to the whole model.
        if getattr(denoiser, "_repeated_blocks", None):
            denoiser.compile_repeated_blocks(mode=options.compile, fullgraph=True)
        else:
            denoiser.compile(mode=options.compile)


@dataclass
class LoadedPipeline:
    """A pipeline in memory, pinned against eviction while ``in_use`` > 0."""

    pipeline: Any
    device: torch.device
    dtype: torch.dtype
    nbytes: int
    # Names ``__call__`` accepts: how the parameter mapping adapts to each pipeline class.
    call_parameters: frozenset[str]
    in_use: int = 0
    # Pipelines that share ``pipeline``'s modules but own a scheduler: schedulers keep per-run state
    # (timesteps, step index), so concurrent runs must not share one.
    idle_views: list[Any] = field(default_factory=list)

    def take_view(self) -> Any:
        if self.idle_views:
            return self.idle_views.pop()
        view = type(self.pipeline).from_pipe(self.pipeline, scheduler=copy.deepcopy(self.pipeline.scheduler))
        view.set_progress_bar_config(disable=True)
        return view

    def return_view(self, view: Any) -> None:
        self.idle_views.append(view)

    def unpin(self) -> None:
        self.in_use -= 1


@dataclass
class _ModelState:
    """Admission and loading state of one catalog model, loaded or not."""

    slots: asyncio.Semaphore
    waiting: int = 0
    # The single in-flight load of this model; every request that needs it awaits this task.
    loading: asyncio.Task[None] | None = None
    # Moving average of run durations, for Retry-After.
    seconds_per_run: float | None = None

    def observe_run(self, seconds: float) -> None:
        previous = self.seconds_per_run
        self.seconds_per_run = (
            seconds if previous is None else RUN_TIME_SMOOTHING * seconds + (1 - RUN_TIME_SMOOTHING) * previous
        )


@dataclass
class _HubProbe:
    """What the hub said about one repo, and when; the probe under way, and the next one's timer."""

    result: Availability | None = None
    checked_at: float = 0.0
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None

    def stale(self, interval_s: float) -> bool:
        return time.monotonic() - self.checked_at >= interval_s


class _RunLease:
    """What a run holds (slot, pin, view), released once, and never while its thread still runs.

    A cancelled request cannot stop a torch call already running in a worker thread; releasing its
    view or slot then would let a second run share a scheduler, or exceed ``max_concurrency``.
    """

    def __init__(self) -> None:
        self._releases: list[Callable[[], None]] = []
        self._work: asyncio.Future[Any] | None = None

    def on_release(self, release: Callable[[], None]) -> None:
        self._releases.append(release)

    def hold_until_done(self, work: asyncio.Future[Any]) -> None:
        self._work = work

    def release(self) -> None:
        if self._work is not None and not self._work.done():
            self._work.add_done_callback(self._release_after_work)
        else:
            self._release_now()

    def _release_after_work(self, work: asyncio.Future[Any]) -> None:
        if not work.cancelled() and work.exception() is not None and not isinstance(work.exception(), RenderCancelled):
            log.warning("a cancelled generation failed in its worker thread: %r", work.exception())
        self._release_now()

    def _release_now(self) -> None:
        for release in reversed(self._releases):
            release()
        self._releases.clear()


class DiffusersBackend(Backend):
    name: ClassVar[str] = "diffusers"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings.diffusers
        self._max_queue = settings.workers.max_queue
        # Pinning the thread count makes seeds reproduce bit for bit (results differ between counts).
        if self._settings.cpu_threads is not None:
            torch.set_num_threads(self._settings.cpu_threads)
        self._executor = ThreadPoolExecutor(max_workers=MAX_WORKER_THREADS, thread_name_prefix="diffusers")
        self._states: dict[str, _ModelState] = {}
        # Model id -> pipeline, least recently used first.
        self._loaded: OrderedDict[str, LoadedPipeline] = OrderedDict()
        # Serialises loads and evictions, so two loads never both count on the same free memory.
        self._memory_lock = asyncio.Lock()
        self._budgets: dict[str, int] = {}
        # Repo id -> whether the hub serves it now, for models whose weights would be downloaded.
        self._hub_probes: dict[str, _HubProbe] = {}

    # ---------------------------------------------------------------------------------------------
    # 1. Can the model run here at all?
    # ---------------------------------------------------------------------------------------------

    async def availability(self, spec: ModelSpec) -> Availability:
        # A full queue is not unavailability: the engine answers it with MODEL_BUSY at admission.
        static = self._static_availability(spec)
        if not static.available or not self._downloads_from_hub(spec):
            return static
        # Weights that would come from the hub are only as available as the hub is, right now.
        return await self._hub_probe(spec.source)

    def _static_availability(self, spec: ModelSpec) -> Availability:
        """Everything but load: options, device, memory budget and weights on disk (no loading)."""
        try:
            self._options(spec)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors())
            return Availability(False, f"invalid diffusers options in the catalog entry ({problems})")
        device_problem = self._device_problem(spec)
        if device_problem is not None:
            return Availability(False, device_problem)
        device = self._device(spec)
        budget = self._memory_budget(device)
        if spec.memory_gb is not None and spec.memory_gb * GIB > budget:
            return Availability(
                False,
                f"needs about {spec.memory_gb:g} GB of {device.type} memory; the memory budget is "
                f"{budget / GIB:.1f} GB (diffusers.memory_budget_gb)",
            )
        local = spec.local_path()
        if local is not None:
            if (local / MODEL_INDEX).is_file():
                return Availability(True)
            return Availability(False, f"no diffusers pipeline at {local} ({MODEL_INDEX} is missing)")
        return self._hub_availability(spec.source)

    def _downloads_from_hub(self, spec: ModelSpec) -> bool:
        """The spec's weights are neither a local directory nor in the local hub cache."""
        if spec.local_path() is not None:
            return False
        try:
            return not isinstance(try_to_load_from_cache(spec.source, MODEL_INDEX), str)
        except HFValidationError:
            return False

    def _hub_availability(self, repo_id: str) -> Availability:
        try:
            cached = try_to_load_from_cache(repo_id, MODEL_INDEX)
        except HFValidationError:
            return Availability(False, f"{repo_id!r} is neither a local pipeline directory nor a Hugging Face repo id")
        if isinstance(cached, str):
            return Availability(True)
        if not self._settings.allow_downloads:
            return Availability(
                False, f"{repo_id} is not in the local Hugging Face cache and downloads are off (allow_downloads)"
            )
        if _hub_offline():
            return Availability(False, f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
        return Availability(True, f"{repo_id} downloads from the Hugging Face hub on first use")

    async def _hub_probe(self, repo_id: str) -> Availability:
        """The last probe of ``repo_id`` on the hub; the first one is awaited (its timeout is short)."""
        probe = self._hub_probes.get(repo_id)
        if probe is None:
            probe = self._hub_probes[repo_id] = _HubProbe()
        if probe.task is None and (probe.result is None or probe.stale(self._settings.hub_probe_interval_s)):
            self._start_probe(repo_id, probe)
        if probe.result is None:
            assert probe.task is not None
            await asyncio.shield(probe.task)
        assert probe.result is not None
        return probe.result

    def _start_probe(self, repo_id: str, probe: _HubProbe) -> None:
        if probe.timer is not None:
            probe.timer.cancel()
            probe.timer = None
        probe.task = asyncio.get_running_loop().create_task(self._run_probe(repo_id, probe), name=f"probe {repo_id}")

    async def _run_probe(self, repo_id: str, probe: _HubProbe) -> None:
        try:
            previous, probe.result = probe.result, await self._probe_hub(repo_id)
            probe.checked_at = time.monotonic()
            if previous is None or previous.available != probe.result.available:
                log.log(logging.INFO if probe.result.available else logging.WARNING, "%s", probe.result.reason)
        finally:
            probe.task = None
        # Re-probed periodically, so the listing follows the hub even when nobody asks.
        probe.timer = asyncio.get_running_loop().call_later(
            self._settings.hub_probe_interval_s, self._start_probe, repo_id, probe)

    def _reprobe(self, repo_id: str) -> None:
        """After a failed load: ask the hub again now (the model may have just become unavailable)."""
        probe = self._hub_probes.get(repo_id)
        if probe is not None and probe.task is None:
            self._start_probe(repo_id, probe)

    async def _probe_hub(self, repo_id: str) -> Availability:
        """Whether the hub at ``HF_ENDPOINT`` would serve ``repo_id``'s pipeline now: one HEAD request
        for its model_index.json, with the credentials a download would use, and a short timeout."""
        endpoint = (os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT).rstrip("/")
        url = hf_hub_url(repo_id, MODEL_INDEX, endpoint=endpoint)
        unavailable = f"{repo_id} is not in the local Hugging Face cache and"
        retry_after = math.ceil(min(self._settings.hub_probe_interval_s, MAX_RETRY_AFTER_S))
        # httpx rather than huggingface_hub's own HEAD helper: its transport errors come from the
        # hub library's private HTTP client, and a probe must tell them from the hub's answers.
        try:
            async with httpx.AsyncClient(timeout=self._settings.hub_probe_timeout_s) as http:
                response = await http.head(url, headers=build_hf_headers())
        except httpx.HTTPError as exc:
            return Availability(False, f"{unavailable} the hub at {endpoint} is unreachable ({_brief(exc)})",
                                retry_after=retry_after)
        if response.status_code < 400:  # 200, or a redirect to where the file is stored
            return Availability(True, f"{repo_id} downloads from the Hugging Face hub ({endpoint}) on first use")
        if response.status_code in (401, 403):
            reason = "the hub refuses access to it (a gated model needs an HF_TOKEN with access)"
        elif response.status_code == 404:
            reason = "the hub has no such pipeline"
        else:
            reason = f"the hub at {endpoint} answered {response.status_code}"
        return Availability(False, f"{unavailable} {reason}", retry_after=retry_after)

    def _device_problem(self, spec: ModelSpec) -> str | None:
        if spec.requires_cuda and not torch.cuda.is_available():
            return "needs a CUDA GPU; none detected"
        if spec.requires_cuda and self._device(spec).type != "cuda":
            return "needs a CUDA GPU, but this model is configured to run on the CPU"
        if self._device(spec).type == "cuda" and not torch.cuda.is_available():
            return "configured for device cuda; no CUDA GPU detected"
        return None

    def _device(self, spec: ModelSpec) -> torch.device:
        """The spec's device, else the server's, else CUDA when present."""
        chosen = spec.device if spec.device != "auto" else self._settings.device
        if chosen == "auto":
            chosen = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(chosen)

    @staticmethod
    def _dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
        # Half precision on CPU is slow and poorly supported by many kernels.
        if device.type != "cuda":
            return torch.float32
        if spec.dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        dtype: torch.dtype = getattr(torch, spec.dtype)
        return dtype

    @staticmethod
    def _options(spec: ModelSpec) -> DiffusersOptions:
        return DiffusersOptions.model_validate(spec.options)

    def _memory_budget(self, device: torch.device) -> int:
        """Bytes of weights that may stay loaded on ``device``'s kind of memory."""
        if device.type not in self._budgets:
            configured = self._settings.memory_budget_gb
            if configured is not None:
                budget = configured * GIB
            elif device.type == "cuda":
                budget = DEFAULT_CUDA_BUDGET_FRACTION * torch.cuda.get_device_properties(device).total_memory
            else:
                budget = DEFAULT_CPU_BUDGET_FRACTION * _physical_memory()
            self._budgets[device.type] = int(budget)
        return self._budgets[device.type]

    # ---------------------------------------------------------------------------------------------
    # The generation, step by step.
    # ---------------------------------------------------------------------------------------------

    async def generate(self, job: GenerationJob, on_step: StepCallback | None = None) -> GenerationResult:
        images = await self._generate(job.spec, [job], partial(self._pipeline_calls, job), on_step)
        return GenerationResult(
            images=[RenderedImage(image, seed) for image, seed in zip(images, job.seeds, strict=True)]
        )

    async def generate_batch(self, jobs: list[GenerationJob],
                             on_step: StepCallback | None = None) -> list[GenerationResult]:
        """Compatible jobs from different clients in one pipeline call (per-image prompts, negative
        prompts and generators), so image i of job j still comes from its own seed alone."""
        if len(jobs) == 1:
            return [await self.generate(jobs[0], on_step)]
        images = iter(await self._generate(jobs[0].spec, jobs, partial(self._batch_calls, jobs), on_step))
        return [
            GenerationResult(images=[RenderedImage(next(images), seed) for seed in job.seeds])
            for job in jobs
        ]

    async def _generate(self, spec: ModelSpec, jobs: list[GenerationJob],
                        pipeline_calls: Callable[[LoadedPipeline], list[dict[str, Any]]],
                        on_step: StepCallback | None) -> list[Image]:
        """Steps 1-6 for the images of ``jobs`` (one job, or a compatible batch), in seed order."""
        # 1. Refuse what cannot run here (no loading yet).
        static = self._static_availability(spec)
        if not static.available:
            raise ModelUnavailable(
                f"Model {spec.id!r} is not available on this server: {static.reason}",
                retry_after=static.retry_after,
                details={"model": spec.id},
            )
        state = self._state(spec)

        # 2. Admission: a run slot, or a place in the bounded queue, or MODEL_BUSY.
        await self._admit(spec, state)
        lease = _RunLease()
        lease.on_release(state.slots.release)
        try:
            # 3. The pipeline, loaded once and pinned against eviction while it runs.
            loaded = await self._pinned_pipeline(spec, state)
            lease.on_release(loaded.unpin)
            view = loaded.take_view()
            lease.on_release(partial(loaded.return_view, view))

            # 4. The request as the pipeline's keyword arguments.
            calls = pipeline_calls(loaded)
            if on_step is not None and "callback_on_step_end" in loaded.call_parameters:
                calls = _with_step_callbacks(calls, jobs[0].steps, on_step)

            # 5. Render in a worker thread; the event loop keeps serving.
            started = time.perf_counter()
            work = asyncio.get_running_loop().run_in_executor(self._executor, self._render, view, calls)
            lease.hold_until_done(work)
            images = await self._await_render(spec, work)
            state.observe_run(time.perf_counter() - started)
        finally:
            lease.release()

        # 6. One image per seed, in seed order.
        seeds = sum(len(job.seeds) for job in jobs)
        if len(images) != seeds:
            raise GenerationFailed(
                f"Model {spec.id!r} returned {len(images)} images for {seeds} seeds",
                details={"model": spec.id},
            )
        return images

    # 2. Admission -------------------------------------------------------------------------------

    def _state(self, spec: ModelSpec) -> _ModelState:
        if spec.id not in self._states:
            self._states[spec.id] = _ModelState(slots=asyncio.Semaphore(spec.max_concurrency))
        return self._states[spec.id]

    def _queue_full(self, state: _ModelState) -> bool:
        return state.slots.locked() and state.waiting >= self._max_queue

    def _retry_after(self, spec: ModelSpec, state: _ModelState) -> int:
        if state.seconds_per_run is None:
            return DEFAULT_RETRY_AFTER_S
        # Roughly when the queue ahead would have drained through the model's run slots.
        rounds = (state.waiting + spec.max_concurrency) / spec.max_concurrency
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(state.seconds_per_run * rounds)))

    async def _admit(self, spec: ModelSpec, state: _ModelState) -> None:
        if self._queue_full(state):
            raise ModelBusy(
                f"Model {spec.id!r} is busy: {state.waiting} requests are already waiting; try again shortly",
                retry_after=self._retry_after(spec, state),
                details={"model": spec.id},
            )
        state.waiting += 1
        try:
            await state.slots.acquire()
        finally:
            state.waiting -= 1

    # 3. Loading and the memory budget -----------------------------------------------------------

    async def _pinned_pipeline(self, spec: ModelSpec, state: _ModelState) -> LoadedPipeline:
        while True:
            loaded = self._loaded.get(spec.id)
            if loaded is not None:
                # No await between finding and pinning: nothing can evict it in between.
                self._loaded.move_to_end(spec.id)
                loaded.in_use += 1
                return loaded
            if state.loading is None:
                state.loading = asyncio.create_task(self._load(spec), name=f"load {spec.id}")
                state.loading.add_done_callback(partial(_forget_load, state))
            # Shielded: a cancelled request must not abort a load that others may be waiting for.
            await asyncio.shield(state.loading)
            # Loaded now, unless evicted again before this request resumed: then the loop reloads.

    async def _load(self, spec: ModelSpec) -> None:
        device = self._device(spec)
        dtype = self._dtype(spec, device)
        async with self._memory_lock:
            self._make_room(spec, device, self._estimated_bytes(spec), refuse_if_busy=True)
            started = time.perf_counter()
            try:
                pipeline = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._load_blocking, spec.source, device, dtype
                )
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, apply_speed_options, pipeline, self._options(spec), device
                )
            except torch.OutOfMemoryError as exc:
                _release_cached_memory()
                raise ModelUnavailable(
                    f"Model {spec.id!r} does not fit in GPU memory right now; try again later",
                    retry_after=OUT_OF_MEMORY_RETRY_AFTER_S,
                    details={"model": spec.id},
                ) from exc
            # from_pretrained reads operator-supplied files through half a dozen libraries, each
            # with its own exceptions (OSError, ValueError, ImportError, AttributeError for unknown
            # classes, safetensors and hub errors): all of them mean the model cannot load here.
            except Exception as exc:
                log.exception("loading %s from %s failed", spec.id, spec.source)
                self._reprobe(spec.source)
                raise ModelUnavailable(
                    f"Model {spec.id!r} could not be loaded from {spec.source}: {_brief(exc)}",
                    details={"model": spec.id},
                ) from exc
            loaded = LoadedPipeline(
                pipeline=pipeline,
                device=device,
                dtype=dtype,
                nbytes=_weight_bytes(pipeline),
                call_parameters=frozenset(inspect.signature(pipeline.__call__).parameters),
                idle_views=[pipeline],
            )
            self._loaded[spec.id] = loaded
            log.info(
                "loaded %s (%s, %.1f MB on %s, %s) in %.2f s",
                spec.id,
                type(pipeline).__name__,
                loaded.nbytes / 1024**2,
                device,
                str(dtype).removeprefix("torch."),
                time.perf_counter() - started,
            )
            # The real size is known now; it may exceed the estimate.
            self._make_room(spec, device, 0, refuse_if_busy=False)

    def _load_blocking(self, source: str, device: torch.device, dtype: torch.dtype) -> Any:
        self._apply_cpu_threads()
        local_only = not self._settings.allow_downloads or _hub_offline()
        # Any: each pipeline class has its own __call__ signature, read at run time.
        pipeline: Any = DiffusionPipeline.from_pretrained(source, dtype=dtype, local_files_only=local_only)
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _estimated_bytes(self, spec: ModelSpec) -> int:
        """Before loading: the catalog's figure, else the weight files' size (0 when unknown)."""
        if spec.memory_gb is not None:
            return int(spec.memory_gb * GIB)
        local = spec.local_path()
        if local is None or not local.is_dir():
            return 0
        return sum(path.stat().st_size for path in local.rglob("*") if path.suffix in WEIGHT_FILE_SUFFIXES)

    def _make_room(self, spec: ModelSpec, device: torch.device, incoming: int, *, refuse_if_busy: bool) -> None:
        """Evict idle pipelines on ``device``'s kind of memory, least recently used first."""
        budget = self._memory_budget(device)

        def others() -> list[tuple[str, LoadedPipeline]]:
            return [
                (model_id, loaded)
                for model_id, loaded in self._loaded.items()
                if model_id != spec.id and loaded.device.type == device.type
            ]

        def used() -> int:
            return sum(loaded.nbytes for _, loaded in others()) + (
                self._loaded[spec.id].nbytes if spec.id in self._loaded else 0
            )

        while used() + incoming > budget:
            idle = [model_id for model_id, loaded in others() if loaded.in_use == 0]
            if not idle:
                break
            self._evict(idle[0])
        if used() + incoming <= budget:
            return
        busy = [model_id for model_id, _ in others()]
        if busy and refuse_if_busy:
            # Loading anyway could exhaust GPU memory under models that are generating right now.
            raise ModelBusy(
                f"Model {spec.id!r} needs memory that models in use ({', '.join(busy)}) hold; try again shortly",
                retry_after=DEFAULT_RETRY_AFTER_S,
                details={"model": spec.id},
            )
        log.warning(
            "%s: loaded weights (%.1f MB) exceed the %s memory budget (%.1f MB)",
            spec.id,
            (used() + incoming) / 1024**2,
            device.type,
            budget / 1024**2,
        )

    def _evict(self, model_id: str, *, collect: bool = True) -> None:
        loaded = self._loaded.pop(model_id)
        log.info("evicting %s (%.1f MB) from %s", model_id, loaded.nbytes / 1024**2, loaded.device)
        loaded.idle_views.clear()
        del loaded
        if collect:
            _free_memory()

    def loaded_models(self) -> list[str]:
        """Model ids in memory, least recently used first."""
        return list(self._loaded)

    def loaded_model_bytes(self) -> dict[str, int]:
        return {model_id: loaded.nbytes for model_id, loaded in self._loaded.items()}

    # 4. Parameter mapping -----------------------------------------------------------------------

    def _pipeline_calls(self, job: GenerationJob, loaded: LoadedPipeline) -> list[dict[str, Any]]:
        """The keyword arguments of each pipeline call: one call for the batch, or one per image."""
        base = _call_arguments(job, loaded.call_parameters)
        if self._options(job.spec).batch_images:
            return [{**base, "num_images_per_prompt": len(job.seeds), "generator": _generators(job.seeds)}]
        return [{**base, "num_images_per_prompt": 1, "generator": _generators((seed,))} for seed in job.seeds]

    def _batch_calls(self, jobs: list[GenerationJob], loaded: LoadedPipeline) -> list[dict[str, Any]]:
        """Several jobs' images as pipeline calls: one call per image with ``batch_images = false``
        (each bit-exact with its solo render), else one call with one prompt, negative prompt and
        generator per image, when the jobs agree on every other argument (as compatible jobs do)."""
        solo_calls = [call for job in jobs for call in self._pipeline_calls(job, loaded)]
        if not self._options(jobs[0].spec).batch_images:
            return solo_calls
        batched: dict[str, Any] | None = None
        shared_arguments: tuple[tuple[str, Any], ...] | None = None
        for job in jobs:
            arguments = _call_arguments(job, loaded.call_parameters)
            prompt, negative = arguments.pop("prompt"), arguments.pop("negative_prompt", None)
            shared = (*sorted(arguments.items()), ("has_negative_prompt", negative is not None))
            if batched is None:
                shared_arguments = shared
                batched = {**arguments, "prompt": [], "generator": [], "num_images_per_prompt": 1}
                if negative is not None:
                    batched["negative_prompt"] = []
            elif shared != shared_arguments:
                return solo_calls  # not compatible after all: still right, only slower
            batched["prompt"].extend([prompt] * len(job.seeds))
            batched["generator"].extend(_generators(job.seeds))
            if negative is not None:
                batched["negative_prompt"].extend([negative] * len(job.seeds))
        assert batched is not None
        return [batched]

    async def pipeline_calls(self, job: GenerationJob) -> tuple[Any, list[dict[str, Any]]]:
        """For benchmarks: the loaded pipeline and the exact keyword arguments ``generate`` would pass.

        Each call's generators are fresh and are used up by one call; ask again for another run.
        Call the pipeline while the backend is idle: it is the backend's own instance (its scheduler
        is shared with the backend's runs), and it is not pinned against eviction.
        """
        static = self._static_availability(job.spec)
        if not static.available:
            raise ModelUnavailable(f"Model {job.spec.id!r} is not available on this server: {static.reason}")
        loaded = await self._pinned_pipeline(job.spec, self._state(job.spec))
        loaded.unpin()
        return loaded.pipeline, self._pipeline_calls(job, loaded)

    # 5. Rendering -------------------------------------------------------------------------------

    def _render(self, pipeline: Any, calls: list[dict[str, Any]]) -> list[Image]:
        """Blocking: runs the pipeline calls in a worker thread."""
        self._apply_cpu_threads()
        images: list[Image] = []
        for kwargs in calls:
            images.extend(pipeline(**kwargs).images)
        return images

    async def _await_render(self, spec: ModelSpec, work: asyncio.Future[list[Image]]) -> list[Image]:
        try:
            # Shielded so that cancelling the request leaves ``work`` pending until its thread ends.
            return await asyncio.shield(work)
        except RenderCancelled:
            raise
        except torch.OutOfMemoryError as exc:
            _release_cached_memory()
            raise ModelBusy(
                f"Model {spec.id!r} ran out of GPU memory; try again shortly or with fewer or smaller images",
                retry_after=OUT_OF_MEMORY_RETRY_AFTER_S,
                details={"model": spec.id},
            ) from exc
        # The pipeline is third-party code running arbitrary kernels on arbitrary weights; whatever
        # it raises is a failed generation, reported without its traceback (which goes to the log).
        except Exception as exc:
            log.exception("generation with %s failed", spec.id)
            raise GenerationFailed(f"Generation with model {spec.id!r} failed: {_brief(exc)}") from exc

    def _apply_cpu_threads(self) -> None:
        # Worker threads take torch's thread count when they first compute; setting it here keeps
        # them in step with the configuration whichever thread runs.
        if self._settings.cpu_threads is not None and torch.get_num_threads() != self._settings.cpu_threads:
            torch.set_num_threads(self._settings.cpu_threads)

    # ---------------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        probes = [probe.task for probe in self._hub_probes.values() if probe.task is not None]
        for probe in self._hub_probes.values():
            if probe.timer is not None:
                probe.timer.cancel()
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        loads = [state.loading for state in self._states.values() if state.loading is not None]
        for load in loads:
            load.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        for model_id in list(self._loaded):
            self._evict(model_id, collect=False)
        _free_memory()
        # Waits for runs already in their threads; torch calls cannot be interrupted.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)


def _call_arguments(job: GenerationJob, accepted: frozenset[str]) -> dict[str, Any]:
    """``job`` as pipeline keyword arguments, by the spec's guidance and negative-prompt modes."""
    spec = job.spec
    negative = job.negative_prompt or None
    kwargs: dict[str, Any] = {
        "prompt": job.prompt,
        "width": job.width,
        "height": job.height,
        "num_inference_steps": job.steps,
        "output_type": "pil",
    }
    match spec.guidance.mode:
        case "cfg":
            # Turbo-style models default to no guidance; a negative prompt needs CFG to mean anything.
            scale = job.guidance
            if scale is None and negative is not None and (spec.guidance.default or 0.0) <= 1.0:
                scale = spec.guidance.default_with_negative_prompt
            if scale is None:
                scale = spec.guidance.default
            if scale is not None:
                kwargs["guidance_scale"] = scale
        case "embedded":
            scale = job.guidance if job.guidance is not None else spec.guidance.default
            if scale is not None:
                kwargs["guidance_scale"] = scale
        case "true_cfg":
            # No guidance input: guidance_scale must not be passed; guidance becomes true CFG.
            scale = job.guidance
            if scale is None and negative is not None:
                scale = spec.guidance.default_with_negative_prompt
            if scale is not None:
                kwargs["true_cfg_scale"] = scale
                # diffusers runs true CFG only when a negative prompt is given.
                kwargs["negative_prompt"] = negative or ""
        case "none":
            pass
    if negative is not None:
        match spec.negative_prompt:
            case "cfg":
                kwargs["negative_prompt"] = negative
            case "true_cfg":
                kwargs["negative_prompt"] = negative
                if "true_cfg_scale" not in kwargs:
                    true_scale = spec.true_cfg_scale or spec.guidance.default_with_negative_prompt
                    if true_scale is not None:
                        kwargs["true_cfg_scale"] = true_scale
            case "none":
                pass
    if spec.max_sequence_length is not None and "max_sequence_length" in accepted:
        kwargs["max_sequence_length"] = spec.max_sequence_length
    unsupported = sorted(set(kwargs) - accepted)
    if unsupported:
        # A catalog entry whose modes do not match its pipeline class: a server configuration error.
        raise GenerationFailed(
            f"Model {spec.id!r} is misconfigured: its pipeline takes no {', '.join(unsupported)} "
            f"(guidance mode {spec.guidance.mode!r}, negative prompt mode {spec.negative_prompt!r})"
        )
    return kwargs


def _with_step_callbacks(calls: list[dict[str, Any]], steps: int, on_step: StepCallback) -> list[dict[str, Any]]:
    """``calls`` reporting their denoising steps, counted across the calls of one generation."""
    total = steps * len(calls)
    wrapped = []
    for index, kwargs in enumerate(calls):

        def callback(pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any],
                     done_before: int = index * steps) -> dict[str, Any]:
            on_step(min(done_before + step_index + 1, total), total)
            return callback_kwargs

        wrapped.append({**kwargs, "callback_on_step_end": callback})
    return wrapped


def _generators(seeds: tuple[int, ...]) -> list[torch.Generator]:
    # One CPU generator per image: image i's noise depends on seeds[i] only, on every device.
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def _weight_bytes(pipeline: Any) -> int:
    """Bytes of every parameter and buffer of the pipeline's modules, shared tensors once."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for component in pipeline.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in (*component.parameters(), *component.buffers()):
            key = (str(tensor.device), tensor.data_ptr())
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
    return total


def _forget_load(state: _ModelState, task: asyncio.Task[None]) -> None:
    state.loading = None
    # Retrieve the outcome, so a load whose requesters all went away does not log "never retrieved".
    if not task.cancelled():
        task.exception()


def _release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _free_memory() -> None:
    # Pipelines hold reference cycles; collect them before handing cached GPU blocks back.
    gc.collect()
    _release_cached_memory()


def _hub_offline() -> bool:
    # The environment is read at call time too: huggingface_hub fixes its constant at import.
    return hf_constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE_STRINGS


def _physical_memory() -> int:
    import psutil  # type: ignore[import-untyped]  # a dependency of accelerate

    return int(psutil.virtual_memory().total)


def _brief(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first_line = text.splitlines()[0] if text else type(exc).__name__
    return first_line if len(first_line) <= MAX_ERROR_TEXT else first_line[: MAX_ERROR_TEXT - 1] + "…"


__all__ = ["DiffusersBackend", "DiffusersOptions", "LoadedPipeline"]
