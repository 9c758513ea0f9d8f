"""The embedded default: render in the API process, with the backends themselves.

Per model, renders take one of ``spec.max_concurrency`` run slots in arrival order; up to
``[workers] max_queue`` more wait for one. Admission happens before payment, so a full queue is a
503 MODEL_BUSY that costs the client nothing. A render past its deadline is cancelled at its next
denoising step (the backend's step callback raises), not left running on the machine.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from imagegate.backends import Backends
from imagegate.backends.base import Availability, Backend, GenerationJob, GenerationResult, RenderCancelled
from imagegate.catalog import ModelSpec
from imagegate.errors import GenerationTimedOut, ModelBusy, ModelUnavailable
from imagegate.types import ImageRequest
from imagegate.workers.base import Admission, Engine, ProgressSink, RenderProgress

# Retry-After before any render of the model was timed, and its upper bound, in seconds.
DEFAULT_RETRY_AFTER_S = 5
MAX_RETRY_AFTER_S = 300
# Weight of the newest render in the moving average of render times.
RUN_TIME_SMOOTHING = 0.3


@dataclass(eq=False)
class _Waiter:
    granted: asyncio.Future[None]
    progress: ProgressSink | None


@dataclass
class _ModelLine:
    """One model's run slots and the renders waiting for them, first come first served."""

    concurrency: int
    admitted: int = 0
    running: int = 0
    waiting: deque[_Waiter] = field(default_factory=deque)
    seconds_per_render: float | None = None

    async def take_slot(self, progress: ProgressSink | None) -> None:
        if self.running < self.concurrency and not self.waiting:
            self.running += 1
            return
        waiter = _Waiter(asyncio.get_running_loop().create_future(), progress)
        self.waiting.append(waiter)
        if progress is not None:
            progress(RenderProgress.queued(len(self.waiting) - 1))
        try:
            await waiter.granted
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self.give_slot()  # granted just as it was cancelled: pass it on
            else:
                self.waiting.remove(waiter)
                self._tell_positions()
            raise

    def give_slot(self) -> None:
        self.running -= 1
        while self.waiting and self.running < self.concurrency:
            waiter = self.waiting.popleft()
            if waiter.granted.done():
                continue
            self.running += 1
            waiter.granted.set_result(None)
        self._tell_positions()

    def _tell_positions(self) -> None:
        for position, waiter in enumerate(self.waiting):
            if waiter.progress is not None:
                waiter.progress(RenderProgress.queued(position))

    def observe(self, seconds: float) -> None:
        previous = self.seconds_per_render
        self.seconds_per_render = seconds if previous is None else (
            RUN_TIME_SMOOTHING * seconds + (1 - RUN_TIME_SMOOTHING) * previous)

    def retry_after(self) -> int:
        if self.seconds_per_render is None:
            return DEFAULT_RETRY_AFTER_S
        # Roughly when the renders admitted ahead would have drained through the run slots.
        rounds = self.admitted / self.concurrency
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self.seconds_per_render * rounds)))


class LocalEngine(Engine):
    """Renders in this process through ``backends``."""

    def __init__(self, backends: Backends, *, max_queue: int):
        self.backends = backends
        self.max_queue = max_queue
        self._lines: dict[str, _ModelLine] = {}

    def check_request(self, spec: ModelSpec, request: ImageRequest) -> None:
        self._backend(spec).check_request(spec, request)

    async def availability(self, spec: ModelSpec) -> Availability:
        if not self.backends.known(spec.backend):
            return Availability(False, f"backend {spec.backend!r} is not installed")
        return await self.backends.get(spec.backend).availability(spec)

    def admit(self, spec: ModelSpec) -> Admission:
        line = self._line(spec)
        if line.admitted >= spec.max_concurrency + self.max_queue:
            raise ModelBusy(
                f"Model {spec.id!r} is busy: {line.admitted - line.running} requests are already waiting; "
                "nothing was charged, try again shortly",
                retry_after=line.retry_after(),
                details={"model": spec.id, "queued": line.admitted - line.running},
            )
        line.admitted += 1

        def release() -> None:
            line.admitted -= 1

        return Admission(spec.id, release)

    async def render(
        self,
        job: GenerationJob,
        admission: Admission,
        *,
        progress: ProgressSink | None = None,
        timeout_s: float | None = None,
    ) -> GenerationResult:
        try:
            backend = self._backend(job.spec)
            line = self._line(job.spec)
            cancelled = threading.Event()
            try:
                async with asyncio.timeout(timeout_s):
                    await line.take_slot(progress)
                    try:
                        return await self._run(backend, line, job, progress, cancelled)
                    finally:
                        line.give_slot()
            except TimeoutError as exc:
                cancelled.set()
                raise GenerationTimedOut(
                    f"Generation with model {job.spec.id!r} did not finish within {timeout_s:.0f} s and was "
                    "cancelled; nothing was charged. Try again later or with fewer or smaller images.",
                    retry_after=line.retry_after(),
                    details={"model": job.spec.id},
                ) from exc
            except asyncio.CancelledError:
                cancelled.set()
                raise
        finally:
            admission.release()

    async def _run(self, backend: Backend, line: _ModelLine, job: GenerationJob, progress: ProgressSink | None,
                   cancelled: threading.Event) -> GenerationResult:
        loop = asyncio.get_running_loop()

        def on_step(step: int, total_steps: int) -> None:
            # Runs in the backend's worker thread: the only place a running pipeline can be stopped.
            if cancelled.is_set():
                raise RenderCancelled(f"render of {job.spec.id} cancelled at step {step}")
            if progress is not None:
                loop.call_soon_threadsafe(progress, RenderProgress.stepped(step, total_steps))

        if progress is not None:
            progress(RenderProgress.running())
        started = time.perf_counter()
        result = await backend.generate(job, on_step=on_step)
        line.observe(time.perf_counter() - started)
        return result

    def queue_depth(self, model_id: str) -> int:
        line = self._lines.get(model_id)
        return 0 if line is None else line.admitted

    def loaded_models(self) -> dict[str, int]:
        return self.backends.loaded_model_bytes()

    def typical_render_s(self, model_id: str) -> float | None:
        line = self._lines.get(model_id)
        return None if line is None else line.seconds_per_render

    async def aclose(self) -> None:
        await self.backends.aclose()

    def _backend(self, spec: ModelSpec) -> Backend:
        if not self.backends.known(spec.backend):
            raise ModelUnavailable(
                f"Model {spec.id!r} needs the {spec.backend!r} backend, which is not installed on this server."
            )
        return self.backends.get(spec.backend)

    def _line(self, spec: ModelSpec) -> _ModelLine:
        line = self._lines.get(spec.id)
        if line is None:
            line = self._lines[spec.id] = _ModelLine(concurrency=spec.max_concurrency)
        return line
