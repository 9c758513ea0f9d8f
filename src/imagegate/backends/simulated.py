"""A simulated GPU, for benchmarks and tests of the machinery around generation: never a default.

It holds its render for ``batch_ms`` per pipeline call plus ``image_ms`` per image, as a GPU would
(without using the CPU: the time passes in ``asyncio.sleep``), reports each denoising step, stops
at the next step when cancelled, and returns plain images whose colour comes from each image's seed
(the same seed gives the same pixels). With both times at 0 it renders in negligible time, which
measures the payment gate and the HTTP path on their own.

The catalog lists it as ``bench-simulated``, disabled: an operator turns it on with
``[models.bench-simulated] enabled = true`` (and may set ``options``), or adds another entry with
``backend = "simulated"``.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import ClassVar

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imagegate.backends.base import (
    Availability,
    Backend,
    GenerationJob,
    GenerationResult,
    RenderedImage,
    StepCallback,
)
from imagegate.catalog import ModelSpec
from imagegate.config import Settings


class SimulatedOptions(BaseModel):
    """The ``options`` table of a simulated model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fixed cost of one pipeline call, whatever its size (kernel launches, text encoding, VAE setup).
    batch_ms: float = Field(default=0.0, ge=0)
    # Cost of each image in the call.
    image_ms: float = Field(default=0.0, ge=0)


def plain_image(seed: int, width: int, height: int) -> Image.Image:
    """One flat colour, a function of the seed alone."""
    red, green, blue = hashlib.sha256(str(seed).encode()).digest()[:3]
    return Image.new("RGB", (width, height), (red, green, blue))


class SimulatedBackend(Backend):
    name: ClassVar[str] = "simulated"

    def __init__(self, settings: Settings) -> None:
        self.calls = 0

    async def availability(self, spec: ModelSpec) -> Availability:
        try:
            SimulatedOptions.model_validate(spec.options)
        except ValidationError as exc:
            return Availability(False, f"invalid simulated options in the catalog entry: {exc.errors()[0]['msg']}")
        return Availability(True)

    async def generate(self, job: GenerationJob, on_step: StepCallback | None = None) -> GenerationResult:
        return (await self.generate_batch([job], on_step))[0]

    async def generate_batch(self, jobs: list[GenerationJob],
                             on_step: StepCallback | None = None) -> list[GenerationResult]:
        """One simulated pipeline call for several compatible jobs (same model, size, steps)."""
        options = SimulatedOptions.model_validate(jobs[0].spec.options)
        images = sum(len(job.seeds) for job in jobs)
        self.calls += 1
        total_s = (options.batch_ms + options.image_ms * images) / 1000
        steps = max(1, jobs[0].steps)
        for step in range(1, steps + 1):
            if total_s > 0:
                await asyncio.sleep(total_s / steps)
            if on_step is not None:
                on_step(step, steps)
        return [
            GenerationResult([RenderedImage(plain_image(seed, job.width, job.height), seed) for seed in job.seeds])
            for job in jobs
        ]
