"""The generation seam: every way of making images (local diffusers, hosted providers) is a ``Backend``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from PIL.Image import Image

from imagegate.catalog import ModelSpec
from imagegate.types import ImageRequest

# ``on_step(steps_done, total_steps)``: called from whichever thread renders, after each denoising step.
# It may raise ``RenderCancelled`` to stop the render there.
StepCallback = Callable[[int, int], None]


class RenderCancelled(Exception):
    """Raised by a step callback to stop a render whose result nobody waits for any more."""


@dataclass(frozen=True)
class GenerationJob:
    """One validated, priced request, ready to run: one seed per image."""

    spec: ModelSpec
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    # As sent by the client; None means the model's own default applies.
    guidance: float | None
    seeds: tuple[int, ...]
    # False when the server drew the seeds; providers that cannot take a seed may then proceed.
    seed_requested: bool

    @classmethod
    def from_request(cls, spec: ModelSpec, request: ImageRequest, seeds: tuple[int, ...]) -> GenerationJob:
        if request.prompt is None:
            raise ValueError("a generation needs a prompt")
        return cls(
            spec=spec,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width,
            height=request.height,
            steps=request.steps,
            guidance=request.guidance,
            seeds=seeds,
            seed_requested=request.seed is not None,
        )


@dataclass(frozen=True)
class RenderedImage:
    image: Image
    # The seed that reproduces this image (the provider's own report where it gives one).
    seed: int | None


@dataclass(frozen=True)
class GenerationResult:
    images: list[RenderedImage]
    # What the generation cost the operator, in micro-USD, where the provider reports it.
    provider_cost_micros: int | None = None


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str | None = None
    # Seconds after which trying again makes sense (503 Retry-After), when known.
    retry_after: int | None = None


class Backend(ABC):
    """Makes images for catalog models whose ``backend`` is ``name``.

    ``generate`` raises ``imagegate.errors`` exceptions only: ``InvalidParameter`` for input the
    model cannot honour, ``ModelUnavailable``/``UpstreamUnavailable`` (503) for capacity or
    configuration problems, ``GenerationFailed`` (500) for everything else that went wrong.
    """

    name: ClassVar[str]

    def check_request(self, spec: ModelSpec, request: ImageRequest) -> None:
        """Reject (``InvalidParameter``) what this backend cannot honour for ``spec``; runs before payment."""

    @abstractmethod
    async def availability(self, spec: ModelSpec) -> Availability:
        """Whether ``spec`` can run here right now, and why not; cheap, no model loading."""

    @abstractmethod
    async def generate(self, job: GenerationJob, on_step: StepCallback | None = None) -> GenerationResult:
        """Render ``len(job.seeds)`` images, in seed order, reporting denoising steps to ``on_step``
        where the backend can see them."""

    async def generate_batch(self, jobs: list[GenerationJob],
                             on_step: StepCallback | None = None) -> list[GenerationResult]:
        """Render several compatible jobs (same model, size, steps, guidance, and all or none with a
        negative prompt), one result per job in order; each image still comes from its own seed.

        Backends that can put them in one pipeline call override this; by default they run one after
        the other, their steps counted together.
        """
        total_steps = sum(job.steps for job in jobs)
        results: list[GenerationResult] = []
        done_before = 0
        for job in jobs:
            results.append(await self.generate(job, on_step=_offset_steps(on_step, done_before, total_steps)))
            done_before += job.steps
        return results

    def loaded_model_bytes(self) -> dict[str, int]:
        """Model ids held in memory by this backend, with their bytes."""
        return {}

    async def aclose(self) -> None:
        """Release models, connections and threads."""


def _offset_steps(on_step: StepCallback | None, done_before: int, total_steps: int) -> StepCallback | None:
    """``on_step`` for one job of several run in turn: steps counted across all of them."""
    if on_step is None:
        return None
    report = on_step

    def offset_step(step: int, steps: int) -> None:
        report(done_before + step, total_steps)

    return offset_step
