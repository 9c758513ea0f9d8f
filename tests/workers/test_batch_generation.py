"""``Backend.generate_batch``: compatible jobs of different clients in one pipeline call, each image
still its own seed's image (real diffusers pipelines, tiny weights, CPU)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest
from PIL.Image import Image

from imagegate.backends.base import Availability, Backend, GenerationJob, GenerationResult, RenderedImage, StepCallback
from imagegate.catalog import ModelSpec
from tests.backends.conftest import BackendFactory, job


def max_pixel_difference(first: Image, second: Image) -> int:
    return int(np.abs(np.asarray(first, dtype=np.int16) - np.asarray(second, dtype=np.int16)).max())


@pytest.mark.parametrize(("model", "negative"), [
    ("sd-1.5", None),
    ("sd-1.5", "blurry"),
    ("sdxl", "dark"),
    ("flux-schnell", None),
    ("flux-dev", None),
])
async def test_each_batched_image_equals_its_solo_render(make_backend: BackendFactory, model: str,
                                                          negative: str | None) -> None:
    catalog, backend = await make_backend()
    spec = catalog[model]
    jobs = [
        job(spec, (11,), prompt="a red cat", negative_prompt=negative),
        job(spec, (22, 23), prompt="a blue square on green grass", negative_prompt=negative and "noise"),
        job(spec, (33,), prompt="two yellow circles", negative_prompt=negative),
    ]
    steps: list[tuple[int, int]] = []
    batched = await backend.generate_batch(jobs, on_step=lambda step, total: steps.append((step, total)))
    # One pipeline call for the four images: its steps once, not once per job.
    assert steps == [(step, 2) for step in (1, 2)]
    assert [[image.seed for image in result.images] for result in batched] == [[11], [22, 23], [33]]
    for batch_job, result in zip(jobs, batched, strict=True):
        solo = await backend.generate(batch_job)
        for batched_image, solo_image in zip(result.images, solo.images, strict=True):
            assert max_pixel_difference(batched_image.image, solo_image.image) <= 1
    # And the images differ where the prompts and seeds do: the batch did not repeat one image.
    assert max_pixel_difference(batched[0].images[0].image, batched[2].images[0].image) > 1


async def test_batch_images_off_makes_each_call_one_image_bit_exact(make_backend: BackendFactory) -> None:
    catalog, backend = await make_backend(models={"sd-1.5": {"options": {"batch_images": False}}})
    spec = catalog["sd-1.5"]
    jobs = [job(spec, (5,), prompt="a red cat"), job(spec, (6,), prompt="a green dog")]
    batched = await backend.generate_batch(jobs)
    for batch_job, result in zip(jobs, batched, strict=True):
        solo = await backend.generate(batch_job)
        assert max_pixel_difference(result.images[0].image, solo.images[0].image) == 0


class OneAtATime(Backend):
    """A backend without its own batching: the seam's default runs the jobs in turn."""

    name: ClassVar[str] = "one-at-a-time"

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def availability(self, spec: ModelSpec) -> Availability:
        return Availability(True)

    async def generate(self, job: GenerationJob, on_step: StepCallback | None = None) -> GenerationResult:
        self.calls.append(job.prompt)
        for step in range(1, job.steps + 1):
            if on_step is not None:
                on_step(step, job.steps)
        from imagegate.backends.simulated import plain_image

        return GenerationResult([RenderedImage(plain_image(seed, job.width, job.height), seed) for seed in job.seeds])


async def test_the_default_batch_runs_jobs_in_turn_and_counts_steps_across_them(
        make_backend: BackendFactory) -> None:
    catalog, _ = await make_backend()
    spec = catalog["sd-1.5"]
    backend = OneAtATime()
    steps: list[tuple[int, int]] = []
    jobs: list[Any] = [job(spec, (1,), prompt="first", steps=2), job(spec, (2, 3), prompt="second", steps=2)]
    results = await backend.generate_batch(jobs, on_step=lambda step, total: steps.append((step, total)))
    assert backend.calls == ["first", "second"]
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [[image.seed for image in result.images] for result in results] == [[1], [2, 3]]
