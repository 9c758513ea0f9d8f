"""What the API process and the Ray Serve model hosts say to each other (no Ray import here).

The API calls ``ModelHost.render(job_id, job)`` as a stream; the replica answers with, in order:

1. ``Accepted``: the replica holds the job (it may still wait for its batch);
2. ``Started``: the pipeline call that carries the job began, with how many jobs share it;
3. ``Stepped``: one per denoising step of that call, to every job in it;
4. ``Rendered`` or ``WorkerFailure``: the end.

Errors travel as data (``WorkerFailure``) rather than as exceptions, so the API can tell a worker's
out-of-memory (worth trying again elsewhere) from a bad request or a broken model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from imagegate.backends.base import GenerationJob, RenderedImage
from imagegate.config import WorkersSettings
from imagegate.errors import (
    GenerationFailed,
    ImagegateError,
    InvalidParameter,
    ModelBusy,
    ModelUnavailable,
    ServiceUnavailable,
    UpstreamUnavailable,
)

# The errors a worker may report, by class name; anything else arrives as GenerationFailed.
_REPORTABLE: dict[str, type[ImagegateError]] = {
    cls.__name__: cls
    for cls in (InvalidParameter, ModelBusy, ModelUnavailable, UpstreamUnavailable, GenerationFailed)
}


@dataclass(frozen=True)
class Accepted:
    replica: str
    pid: int


@dataclass(frozen=True)
class Started:
    # Jobs and images in the one pipeline call that renders this job.
    batch_jobs: int
    batch_images: int


@dataclass(frozen=True)
class Stepped:
    step: int
    total_steps: int


@dataclass(frozen=True)
class Rendered:
    images: list[RenderedImage]
    provider_cost_micros: int | None
    replica: str
    batch_jobs: int
    # What the replica holds in memory now (model id -> bytes), for the API's view of loaded models.
    loaded_models: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerFailure:
    error_type: str
    message: str
    retry_after: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # The worker ran out of accelerator memory: another replica (or a later try) may well succeed.
    out_of_memory: bool = False
    # The job was dropped without running (its only caller went away first): try it again.
    dropped: bool = False

    @classmethod
    def from_error(cls, error: ImagegateError, *, out_of_memory: bool = False) -> WorkerFailure:
        error_type = type(error).__name__ if type(error).__name__ in _REPORTABLE else GenerationFailed.__name__
        retry_after = error.retry_after if isinstance(error, ServiceUnavailable) else None
        return cls(error_type, error.message, retry_after, dict(error.details), out_of_memory=out_of_memory)

    def to_error(self) -> ImagegateError:
        error_class = _REPORTABLE.get(self.error_type, GenerationFailed)
        if issubclass(error_class, ServiceUnavailable):
            return error_class(self.message, retry_after=self.retry_after, details=self.details)
        return error_class(self.message, details=self.details)


WorkerEvent = Accepted | Started | Stepped | Rendered | WorkerFailure


def jobs_per_batch(workers: WorkersSettings) -> int:
    """Jobs one replica renders in one pipeline call at most (counting one image each)."""
    return workers.batch_max_images if workers.batching else 1


@dataclass(frozen=True)
class BatchKey:
    """What jobs must share to ride in one pipeline call: one batcher per key on every replica."""

    model: str
    width: int
    height: int
    steps: int
    guidance: float | None
    negative_prompt: bool

    @classmethod
    def of(cls, job: GenerationJob) -> BatchKey:
        return cls(job.spec.id, job.width, job.height, job.steps, job.guidance, bool(job.negative_prompt))


@dataclass(frozen=True)
class ActiveJob:
    job_id: str
    model: str
    # Waiting for its batch, or in a pipeline call.
    state: Literal["waiting", "rendering"]


@dataclass(frozen=True)
class ReplicaStats:
    """One replica's view of itself (``imagegate workers status``, tests, benchmarks)."""

    replica: str
    pid: int
    active: list[ActiveJob]
    # Jobs per pipeline call, most recent last (bounded).
    recent_batches: list[int]
    jobs_finished: int
    jobs_cancelled: int
    # Job ids recently rendered to the end, most recent last (bounded).
    recent_finished: list[str]
    loaded_models: dict[str, int]
    multiplexed_models: list[str]
