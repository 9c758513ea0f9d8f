"""DiffusersBackend on real (tiny) FLUX / SD / SDXL pipelines through the real catalog."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL.Image import Image

from imagegate.backends.base import Availability, GenerationJob
from imagegate.backends.diffusers import DiffusersBackend
from imagegate.catalog import Catalog
from imagegate.config import Settings
from imagegate.errors import GenerationFailed, ModelBusy, ModelUnavailable
from tests.backends.conftest import BackendFactory, job, png_sha256

Shared = tuple[Catalog, DiffusersBackend]


class GatedBackend(DiffusersBackend):
    """Counts loads and concurrent renders, and holds every render until the test opens ``gate``."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.gate = threading.Event()
        self._counter_lock = threading.Lock()
        self.rendering = 0
        self.max_rendering = 0
        self.renders_started = 0
        self.loads = 0

    def _render(self, pipeline: Any, calls: list[dict[str, Any]]) -> list[Image]:
        with self._counter_lock:
            self.rendering += 1
            self.renders_started += 1
            self.max_rendering = max(self.max_rendering, self.rendering)
        try:
            if not self.gate.wait(timeout=30):
                raise TimeoutError("the test never opened the gate")
            return super()._render(pipeline, calls)
        finally:
            with self._counter_lock:
                self.rendering -= 1

    def _load_blocking(self, source: str, device: torch.device, dtype: torch.dtype) -> Any:
        with self._counter_lock:
            self.loads += 1
        return super()._load_blocking(source, device, dtype)


async def wait_until(condition: Callable[[], bool], within_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)


async def hashes(backend: DiffusersBackend, generation: GenerationJob) -> list[str]:
    result = await backend.generate(generation)
    return [png_sha256(image.image) for image in result.images]


# Each kind renders the right size and count ---------------------------------------------------


@pytest.mark.parametrize("model_id", ["flux-schnell", "flux-dev", "sdxl", "sd-1.5"])
async def test_renders_requested_size_count_and_seed_order(shared: Shared, model_id: str) -> None:
    catalog, backend = shared
    result = await backend.generate(job(catalog[model_id], seeds=(5, 6), width=192, height=128))
    assert [rendered.seed for rendered in result.images] == [5, 6]
    assert [rendered.image.size for rendered in result.images] == [(192, 128), (192, 128)]
    assert all(rendered.image.mode == "RGB" for rendered in result.images)


async def test_four_results_are_four_distinct_images(shared: Shared) -> None:
    catalog, backend = shared
    digests = await hashes(backend, job(catalog["flux-schnell"], seeds=(10, 11, 12, 13)))
    assert len(digests) == 4 and len(set(digests)) == 4


# Seeds ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["flux-schnell", "sd-1.5"])
async def test_same_request_gives_the_same_png_bytes(shared: Shared, model_id: str) -> None:
    catalog, backend = shared
    spec = catalog[model_id]
    first = await hashes(backend, job(spec, seeds=(42, 43)))
    again = await hashes(backend, job(spec, seeds=(42, 43)))
    other = await hashes(backend, job(spec, seeds=(44, 45)))
    assert first == again
    assert set(first).isdisjoint(other)


async def test_unbatched_mode_reproduces_a_batch_image_alone(make_backend: BackendFactory) -> None:
    catalog, backend = await make_backend(models={"sd-1.5": {"options": {"batch_images": False}}})
    spec = catalog["sd-1.5"]
    batch = await hashes(backend, job(spec, seeds=(7, 8, 9)))
    alone = await hashes(backend, job(spec, seeds=(8,)))
    assert alone == [batch[1]]
    assert len(set(batch)) == 3


async def test_pipeline_calls_are_exactly_what_generate_runs(shared: Shared) -> None:
    catalog, backend = shared
    generation = job(catalog["flux-schnell"], seeds=(3, 4), negative_prompt="blue")
    pipeline, calls = await backend.pipeline_calls(generation)
    assert len(calls) == 1 and calls[0]["num_images_per_prompt"] == 2 and len(calls[0]["generator"]) == 2
    direct = [png_sha256(image) for image in pipeline(**calls[0]).images]
    assert direct == await hashes(backend, generation)


# Guidance and negative prompts, by the catalog's modes -----------------------------------------


async def call_arguments(backend: DiffusersBackend, generation: GenerationJob) -> dict[str, Any]:
    _, calls = await backend.pipeline_calls(generation)
    (kwargs,) = calls
    return {key: value for key, value in kwargs.items() if key != "generator"}


GUIDANCE_CASES = [
    # true_cfg (schnell): no guidance input, so never guidance_scale; a negative prompt turns true CFG on.
    ("flux-schnell", None, None, {"max_sequence_length": 256}, {"guidance_scale", "true_cfg_scale", "negative_prompt"}),
    ("flux-schnell", None, "blue", {"negative_prompt": "blue", "true_cfg_scale": 4.0}, {"guidance_scale"}),
    ("flux-schnell", 2.5, None, {"negative_prompt": "", "true_cfg_scale": 2.5}, {"guidance_scale"}),
    ("flux-schnell", 6.0, "blue", {"negative_prompt": "blue", "true_cfg_scale": 6.0}, {"guidance_scale"}),
    # embedded (dev): guidance is the distilled input; a negative prompt adds true CFG at the spec's scale.
    ("flux-dev", None, None, {"guidance_scale": 3.5, "max_sequence_length": 512}, {"true_cfg_scale"}),
    ("flux-dev", 5.0, "blue", {"guidance_scale": 5.0, "negative_prompt": "blue", "true_cfg_scale": 4.0}, set()),
    # cfg with a guidance-free default (turbo): a negative prompt switches CFG on at 1.5.
    ("sd-turbo", None, None, {"guidance_scale": 0.0}, {"negative_prompt", "true_cfg_scale"}),
    ("sd-turbo", None, "blue", {"guidance_scale": 1.5, "negative_prompt": "blue"}, set()),
    ("sd-turbo", 3.0, "blue", {"guidance_scale": 3.0, "negative_prompt": "blue"}, set()),
    # classic cfg
    ("sd-1.5", None, "blue", {"guidance_scale": 7.5, "negative_prompt": "blue"}, {"max_sequence_length"}),
    ("sdxl", 2.0, None, {"guidance_scale": 2.0}, {"negative_prompt", "max_sequence_length"}),
]


@pytest.mark.parametrize(("model_id", "guidance", "negative", "expected", "absent"), GUIDANCE_CASES)
async def test_parameter_mapping(
    shared: Shared,
    model_id: str,
    guidance: float | None,
    negative: str | None,
    expected: dict[str, Any],
    absent: set[str],
) -> None:
    catalog, backend = shared
    kwargs = await call_arguments(
        backend, job(catalog[model_id], seeds=(1, 2, 3), guidance=guidance, negative_prompt=negative, steps=3)
    )
    assert kwargs.items() >= expected.items()
    assert not absent & kwargs.keys()
    assert kwargs["num_images_per_prompt"] == 3 and kwargs["num_inference_steps"] == 3
    assert (kwargs["width"], kwargs["height"], kwargs["output_type"]) == (128, 128, "pil")


@pytest.mark.parametrize(
    ("model_id", "baseline", "variant"),
    [
        ("flux-schnell", {}, {"negative_prompt": "blue"}),
        ("flux-schnell", {}, {"guidance": 3.0}),
        ("flux-dev", {"guidance": 2.0}, {"guidance": 6.0}),
        ("flux-dev", {}, {"negative_prompt": "blue"}),
        ("sd-1.5", {"guidance": 1.0}, {"guidance": 7.0}),
        ("sd-1.5", {}, {"negative_prompt": "blue"}),
        ("sd-turbo", {}, {"negative_prompt": "blue"}),
        ("sdxl", {}, {"negative_prompt": "blue"}),
    ],
)
async def test_guidance_and_negative_prompt_change_the_image(
    shared: Shared, model_id: str, baseline: dict[str, Any], variant: dict[str, Any]
) -> None:
    catalog, backend = shared
    spec = catalog[model_id]
    assert await hashes(backend, job(spec, **baseline)) != await hashes(backend, job(spec, **variant))


async def test_mode_the_pipeline_cannot_honour_is_a_generation_failure(make_backend: BackendFactory) -> None:
    misconfigured = {"guidance": {"mode": "true_cfg", "default_with_negative_prompt": 3.0}}
    catalog, backend = await make_backend(models={"sd-1.5": misconfigured})
    with pytest.raises(GenerationFailed, match="true_cfg_scale"):
        await backend.generate(job(catalog["sd-1.5"], negative_prompt="blue"))


# Availability ----------------------------------------------------------------------------------


async def test_missing_directory_is_unavailable(make_backend: BackendFactory, tmp_path: Path) -> None:
    catalog, backend = await make_backend(models={"sd-turbo": {"source": str(tmp_path / "nowhere")}})
    availability = await backend.availability(catalog["sd-turbo"])
    assert not availability.available and "model_index.json" in (availability.reason or "")
    with pytest.raises(ModelUnavailable) as raised:
        await backend.generate(job(catalog["sd-turbo"]))
    assert raised.value.status == 503


async def test_broken_pipeline_fails_to_load_as_unavailable(make_backend: BackendFactory, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    catalog, backend = await make_backend(models={"sd-turbo": {"source": str(broken)}})
    assert (await backend.availability(catalog["sd-turbo"])).available
    with pytest.raises(ModelUnavailable, match="could not be loaded"):
        await backend.generate(job(catalog["sd-turbo"]))
    assert backend.loaded_models() == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
async def test_requires_cuda_without_a_gpu_is_unavailable(make_backend: BackendFactory) -> None:
    catalog, backend = await make_backend(models={"sdxl": {"requires_cuda": True}})
    availability = await backend.availability(catalog["sdxl"])
    assert availability == Availability(False, "needs a CUDA GPU; none detected")
    with pytest.raises(ModelUnavailable, match="needs a CUDA GPU"):
        await backend.generate(job(catalog["sdxl"]))


UNCACHED_REPO = "imagegate-tests/never-downloaded-pipeline"


async def test_uncached_hub_model_without_downloads_is_unavailable(make_backend: BackendFactory) -> None:
    catalog, backend = await make_backend(models={"sd-turbo": {"source": UNCACHED_REPO}}, allow_downloads=False)
    availability = await backend.availability(catalog["sd-turbo"])
    assert not availability.available and "allow_downloads" in (availability.reason or "")
    with pytest.raises(ModelUnavailable):
        await backend.generate(job(catalog["sd-turbo"]))


async def test_uncached_hub_model_offline_is_unavailable(
    make_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    catalog, backend = await make_backend(models={"sd-turbo": {"source": UNCACHED_REPO}}, allow_downloads=True)
    availability = await backend.availability(catalog["sd-turbo"])
    assert not availability.available and "HF_HUB_OFFLINE" in (availability.reason or "")


async def test_uncached_hub_model_with_downloads_is_available(
    make_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    from tests.support.fake_hub import fake_hub

    # Only the availability check runs, probing a loopback stand-in for the hub; nothing is downloaded.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with fake_hub("serving") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        catalog, backend = await make_backend(models={"sd-turbo": {"source": UNCACHED_REPO}}, allow_downloads=True)
        availability = await backend.availability(catalog["sd-turbo"])
    assert availability.available and "first use" in (availability.reason or "")
    assert hub.requests == [("HEAD", f"/{UNCACHED_REPO}/resolve/main/model_index.json")]


@pytest.mark.parametrize(
    ("table", "reason"),
    [
        ({"source": "not a repo id!"}, "neither a local pipeline directory"),
        ({"memory_gb": 1.0}, "memory budget"),
        ({"options": {"no_such_option": 1}}, "invalid diffusers options"),
    ],
)
async def test_other_unavailable_reasons(make_backend: BackendFactory, table: dict[str, Any], reason: str) -> None:
    catalog, backend = await make_backend(models={"sd-turbo": table}, memory_budget_gb=0.5)
    availability = await backend.availability(catalog["sd-turbo"])
    assert not availability.available and reason in (availability.reason or "")


# Memory budget ---------------------------------------------------------------------------------


async def test_lru_eviction_under_a_tiny_budget(make_backend: BackendFactory) -> None:
    # A few kilobytes: any second pipeline pushes the first one out.
    catalog, backend = await make_backend(memory_budget_gb=1e-6)
    first = await hashes(backend, job(catalog["flux-schnell"], seeds=(1, 2)))
    assert backend.loaded_models() == ["flux-schnell"]
    await hashes(backend, job(catalog["sd-1.5"]))
    assert backend.loaded_models() == ["sd-1.5"]
    assert await hashes(backend, job(catalog["flux-schnell"], seeds=(1, 2))) == first
    assert backend.loaded_models() == ["flux-schnell"]


async def test_models_stay_loaded_within_the_budget(make_backend: BackendFactory) -> None:
    catalog, backend = await make_backend(memory_budget_gb=1.0)
    for model_id in ("flux-schnell", "sd-1.5", "flux-schnell"):
        await backend.generate(job(catalog[model_id]))
    assert backend.loaded_models() == ["sd-1.5", "flux-schnell"]


async def test_a_model_in_use_is_not_evicted(make_backend: BackendFactory) -> None:
    catalog, backend = await make_backend(backend_class=GatedBackend, memory_budget_gb=1e-6)
    assert isinstance(backend, GatedBackend)
    running = asyncio.create_task(backend.generate(job(catalog["flux-schnell"])))
    await wait_until(lambda: backend.rendering == 1)
    with pytest.raises(ModelBusy) as raised:
        await backend.generate(job(catalog["sd-1.5"]))
    assert raised.value.retry_after is not None and "flux-schnell" in raised.value.message
    backend.gate.set()
    await running
    await backend.generate(job(catalog["sd-1.5"]))
    assert backend.loaded_models() == ["sd-1.5"]


# Loading once, concurrency, queueing ----------------------------------------------------------


async def test_concurrent_first_requests_load_once(make_backend: BackendFactory) -> None:
    catalog, backend = await make_backend(backend_class=GatedBackend, models={"sd-1.5": {"max_concurrency": 3}})
    assert isinstance(backend, GatedBackend)
    backend.gate.set()
    results = await asyncio.gather(*(backend.generate(job(catalog["sd-1.5"], seeds=(9,))) for _ in range(3)))
    assert backend.loads == 1
    assert len({png_sha256(result.images[0].image) for result in results}) == 1


@pytest.mark.parametrize("max_concurrency", [1, 2])
async def test_concurrency_limit_is_never_exceeded(make_backend: BackendFactory, max_concurrency: int) -> None:
    catalog, backend = await make_backend(
        backend_class=GatedBackend, models={"flux-schnell": {"max_concurrency": max_concurrency}}
    )
    assert isinstance(backend, GatedBackend)
    spec = catalog["flux-schnell"]
    tasks = [asyncio.create_task(backend.generate(job(spec, seeds=(seed,)))) for seed in range(4)]
    await wait_until(lambda: backend.rendering == max_concurrency)
    # The others stay queued however long they wait; give them every chance to slip through.
    for _ in range(20):
        await asyncio.sleep(0.005)
    assert backend.renders_started == max_concurrency
    backend.gate.set()
    results = await asyncio.gather(*tasks)
    assert backend.max_rendering == max_concurrency and backend.renders_started == 4
    assert [result.images[0].seed for result in results] == [0, 1, 2, 3]


async def test_queue_overflow_is_model_busy_with_retry_after(make_backend: BackendFactory) -> None:
    catalog, backend = await make_backend(backend_class=GatedBackend, max_queue=1)
    assert isinstance(backend, GatedBackend)
    spec = catalog["sd-1.5"]
    running = asyncio.create_task(backend.generate(job(spec)))
    await wait_until(lambda: backend.rendering == 1)
    queued = asyncio.create_task(backend.generate(job(spec)))
    await wait_until(lambda: backend._states["sd-1.5"].waiting == 1)
    with pytest.raises(ModelBusy) as raised:
        await backend.generate(job(spec))
    assert raised.value.status == 503 and raised.value.headers["Retry-After"].isdigit()
    # A full queue is busy, not unavailable: the model stays listed as available.
    assert (await backend.availability(spec)).available
    backend.gate.set()
    await asyncio.gather(running, queued)


async def test_cancelled_request_keeps_its_slot_until_its_thread_ends(make_backend: BackendFactory) -> None:
    catalog, backend = await make_backend(backend_class=GatedBackend)
    assert isinstance(backend, GatedBackend)
    spec = catalog["sd-1.5"]
    cancelled = asyncio.create_task(backend.generate(job(spec)))
    await wait_until(lambda: backend.rendering == 1)
    cancelled.cancel()
    follower = asyncio.create_task(backend.generate(job(spec)))
    for _ in range(20):
        await asyncio.sleep(0.005)
    # The torch call of the cancelled request is still running: the follower must still wait.
    assert backend.renders_started == 1
    backend.gate.set()
    await follower
    assert backend.max_rendering == 1
    with pytest.raises(asyncio.CancelledError):
        await cancelled


# Failures ----------------------------------------------------------------------------------


class FailingBackend(DiffusersBackend):
    failure: BaseException = RuntimeError("boom")

    def _render(self, pipeline: Any, calls: list[dict[str, Any]]) -> list[Image]:
        raise self.failure


async def test_pipeline_error_is_generation_failed_without_traceback(make_backend: BackendFactory) -> None:
    catalog, backend = await make_backend(backend_class=FailingBackend)
    with pytest.raises(GenerationFailed) as raised:
        await backend.generate(job(catalog["sd-1.5"]))
    assert raised.value.message == "Generation with model 'sd-1.5' failed: RuntimeError: boom"
    # The slot came back: the next request is admitted (and fails the same way, not with busy).
    with pytest.raises(GenerationFailed):
        await backend.generate(job(catalog["sd-1.5"]))


async def test_out_of_memory_is_model_busy(make_backend: BackendFactory) -> None:
    catalog, backend = await make_backend(backend_class=FailingBackend)
    assert isinstance(backend, FailingBackend)
    backend.failure = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(ModelBusy) as raised:
        await backend.generate(job(catalog["sd-1.5"]))
    assert raised.value.retry_after is not None


async def test_aclose_unloads_everything(make_backend: BackendFactory) -> None:
    catalog, backend = await make_backend()
    await backend.generate(job(catalog["sd-1.5"]))
    assert backend.loaded_models() == ["sd-1.5"]
    await backend.aclose()
    assert backend.loaded_models() == []
