"""The diffusers backend's speed options (what bench/bench_gpu.py measures on a GPU), on the CPU:
each one reaches the pipeline, renders the same image where it applies, and is refused plainly where
the machine cannot honour it. Compiling is only wired here (it takes minutes on a CPU); the GPU
benchmark runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from imagegate.backends.diffusers import DiffusersOptions, apply_speed_options


@pytest.fixture
def flux(tiny_model_paths: dict[str, Path]) -> DiffusionPipeline:
    pipeline = DiffusionPipeline.from_pretrained(tiny_model_paths["flux"])
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def render(pipeline: DiffusionPipeline) -> np.ndarray:
    image = pipeline(prompt="a red circle", num_inference_steps=2, width=64, height=64, guidance_scale=0.0,
                     generator=torch.Generator().manual_seed(3)).images[0]
    return np.asarray(image)


def test_an_attention_backend_renders_the_same_image(flux: DiffusionPipeline) -> None:
    before = render(flux)
    apply_speed_options(flux, DiffusersOptions(attention_backend="native"), torch.device("cpu"))
    assert np.array_equal(render(flux), before)


def test_compile_and_vae_tiling_reach_the_pipeline(flux: DiffusionPipeline) -> None:
    apply_speed_options(flux, DiffusersOptions(compile="default", vae_tiling=True), torch.device("cpu"))
    assert flux.vae.use_tiling
    blocks = [block for block in flux.transformer.modules()
              if type(block).__name__ in flux.transformer._repeated_blocks]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)


def test_fp8_is_refused_where_the_machine_has_none(flux: DiffusionPipeline) -> None:
    with pytest.raises(ValueError, match="fp8 needs"):
        apply_speed_options(flux, DiffusersOptions(fp8=True), torch.device("cpu"))


def test_unknown_options_are_refused() -> None:
    with pytest.raises(ValueError):
        DiffusersOptions.model_validate({"compile": "fastest"})


def test_the_gpu_benchmark_smoke_run_measures_every_cell() -> None:
    from bench.bench_gpu import main

    results = main(["--smoke"])
    assert len(results) == 2 * 3 * 3  # two models, three workloads, three variants without compiling
    assert all(result.seconds_per_image is not None and result.seconds_per_image > 0 for result in results), [
        (result.model, result.workload.name, result.variant, result.note) for result in results]


async def test_the_backend_applies_the_catalog_entrys_options(tiny_model_paths: dict[str, Path]) -> None:
    from imagegate.backends.base import GenerationJob
    from imagegate.backends.diffusers import DiffusersBackend
    from imagegate.catalog import build_catalog
    from imagegate.config import load_settings
    from imagegate.errors import ModelUnavailable
    from imagegate.validation import parse_image_request

    entry = {"source": str(tiny_model_paths["flux"]), "requires_cuda": False, "dtype": "float32", "memory_gb": 0.05}
    settings = load_settings(diffusers={"cpu_threads": 1, "allow_downloads": False},
                             catalog={"default_model": "flux-schnell"},
                             models={"flux-schnell": {**entry, "options": {"attention_backend": "native"}},
                                     "flux-dev": {**entry, "options": {"fp8": True}}})
    catalog = build_catalog(settings)
    backend = DiffusersBackend(settings)
    try:
        body = {"prompt": "a red circle", "width": 128, "height": 128, "steps": 2}
        request = parse_image_request({**body, "model": "flux-schnell"}, catalog, require_prompt=True)
        result = await backend.generate(GenerationJob.from_request(catalog["flux-schnell"], request, (1,)))
        assert result.images[0].image.size == (128, 128)
        request = parse_image_request({**body, "model": "flux-dev"}, catalog, require_prompt=True)
        with pytest.raises(ModelUnavailable, match="fp8 needs"):
            await backend.generate(GenerationJob.from_request(catalog["flux-dev"], request, (1,)))
    finally:
        await backend.aclose()
