"""Hosted-provider backends against local fakes of Runware, fal, Replicate, Together and OpenAI.

Every fake runs under uvicorn on 127.0.0.1 and implements its provider's documented request and
reply shapes, error bodies, rate limiting and job flow; nothing here reaches the network.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from imagegate.backends import load_backend_factories
from imagegate.backends.base import GenerationJob, GenerationResult
from imagegate.backends.fal import FalBackend
from imagegate.backends.openai import OpenAIBackend
from imagegate.backends.provider import ApiKey, ProviderBackend, retry_after_seconds, usd_to_micros
from imagegate.backends.replicate import ReplicateBackend
from imagegate.backends.runware import RunwareBackend
from imagegate.backends.together import TogetherBackend
from imagegate.catalog import ModelSpec, build_catalog
from imagegate.config import Settings, load_settings
from imagegate.errors import (
    GenerationFailed,
    InvalidParameter,
    ModelUnavailable,
    UpstreamUnavailable,
)
from imagegate.types import ImageRequest
from tests.backends.fakes import (
    FakeFal,
    FakeOpenAI,
    FakeProvider,
    FakeReplicate,
    FakeRunware,
    FakeTogether,
    color_of,
    served,
)
from tests.backends.fakes.replicate import NSFW_ERROR, VERSION

KEY = "sk-live-7f3a9c1e5b2d4680-TOPSECRET"
WRONG_KEY = "sk-wrong-0a1b2c3d4e5f-ALSOSECRET"
PROMPT = "a red fox in fresh snow"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "providers.md"

# Quick retries so failure paths take milliseconds; sleeps are recorded, not slept.
FAST = {"max_retries": 2, "backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5, "retry_after_s": 7}


@dataclass(frozen=True)
class Case:
    name: str
    fake: type[FakeProvider]
    backend: Callable[..., ProviderBackend]  # (Settings, *, sleep=...) -> the backend
    env: str
    source: str
    width: int
    height: int
    settings: Callable[[str], dict[str, Any]]


CASES = {
    "runware": Case(
        "runware", FakeRunware, RunwareBackend, "RUNWARE_API_KEY", "runware:100@1", 192, 128,
        lambda url: {"base_url": f"{url}/v1"},
    ),
    "fal": Case(
        "fal", FakeFal, FalBackend, "FAL_KEY", "fal-ai/flux/schnell", 192, 128,
        lambda url: {"base_url": f"{url}/run", "queue_base_url": f"{url}/queue", "poll_interval_s": 0.01},
    ),
    "replicate": Case(
        "replicate", FakeReplicate, ReplicateBackend, "REPLICATE_API_TOKEN", "black-forest-labs/flux-schnell",
        512, 512, lambda url: {"base_url": f"{url}/v1", "poll_interval_s": 0.01},
    ),
    "together": Case(
        "together", FakeTogether, TogetherBackend, "TOGETHER_API_KEY", "black-forest-labs/FLUX.1-schnell", 192, 128,
        lambda url: {"base_url": f"{url}/v1"},
    ),
    "openai": Case(
        "openai", FakeOpenAI, OpenAIBackend, "OPENAI_API_KEY", "dall-e-2", 256, 256,
        lambda url: {"base_url": f"{url}/v1"},
    ),
}  # fmt: skip
NAMES = list(CASES)


class Sleeps:
    """Stands in for asyncio.sleep: records each delay and yields without waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


@dataclass
class Rig:
    case: Case
    backend: ProviderBackend
    fake: Any  # the case's FakeProvider subclass
    sleeps: Sleeps = field(default_factory=Sleeps)

    def spec(self, *, guidance: str = "true_cfg", negative: str = "true_cfg", **changes: Any) -> ModelSpec:
        # Defaults mirror the built-in flux-schnell entry: no guidance input, negative prompt via true CFG.
        table: dict[str, Any] = {
            "id": "m",
            "name": "M",
            "backend": self.case.name,
            "source": self.case.source,
            "default_width": self.case.width,
            "default_height": self.case.height,
            "steps": {"default": 4},
            "guidance": {"mode": guidance},
            "negative_prompt": negative,
            "price": {"unit": 1000},
            **changes,
        }
        return ModelSpec.model_validate(table)

    def request(self, **changes: Any) -> ImageRequest:
        base = ImageRequest(
            model="m",
            prompt=PROMPT,
            width=self.case.width,
            height=self.case.height,
            number_results=1,
            steps=4,
            steps_sent=False,
        )
        return replace(base, **changes)

    async def generate(
        self, request: ImageRequest | None = None, spec: ModelSpec | None = None, *, check: bool = True
    ) -> GenerationResult:
        spec = spec or self.spec()
        request = request or self.request()
        if check:
            self.backend.check_request(spec, request)
        first = request.seed if request.seed is not None else 1000
        seeds = tuple(first + index for index in range(request.number_results))
        return await self.backend.generate(GenerationJob.from_request(spec, request, seeds))


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeProvider]]:
    with ExitStack() as stack:
        yield {name: stack.enter_context(served(case.fake(KEY))) for name, case in CASES.items()}


@pytest.fixture(autouse=True)
def _fresh(fakes: dict[str, FakeProvider], monkeypatch: pytest.MonkeyPatch) -> None:
    for fake in fakes.values():
        fake.reset()
    for case in CASES.values():
        monkeypatch.setenv(case.env, KEY)


@pytest.fixture
async def rig(fakes: dict[str, FakeProvider]) -> AsyncIterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def build(name: str, **settings: Any) -> Rig:
        case, fake, sleeps = CASES[name], fakes[name], Sleeps()
        table = {**FAST, **case.settings(fake.url), **settings}
        backend = case.backend(Settings(providers={name: table}), sleep=sleeps)
        made.append(Rig(case, backend, fake, sleeps))
        return made[-1]

    yield build
    for made_rig in made:
        await made_rig.backend.aclose()


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert KEY not in text
        assert WRONG_KEY not in text


def sizes(result: GenerationResult) -> list[tuple[int, int]]:
    return [rendered.image.size for rendered in result.images]


# --- the exact request each provider receives, and what we make of its reply -----------------


async def test_runware_task_fields_seeds_and_exact_cost(rig: Callable[..., Rig]) -> None:
    r = rig("runware")
    spec = r.spec(source="civitai:101055@128078", guidance="cfg", negative="cfg")
    request = r.request(number_results=3, steps=20, steps_sent=True, guidance=7.5, negative_prompt="blurry", seed=42)

    result = await r.generate(request, spec)

    [call] = r.fake.requests
    assert (call.method, call.path) == ("POST", "/v1")
    assert call.headers["authorization"] == f"Bearer {KEY}"
    [task] = call.body
    assert uuid.UUID(task.pop("taskUUID")).version == 4
    assert task == {
        "taskType": "imageInference",
        "positivePrompt": PROMPT,
        "negativePrompt": "blurry",
        "model": "civitai:101055@128078",
        "width": 192,
        "height": 128,
        "numberResults": 3,
        "steps": 20,
        "CFGScale": 7.5,
        "seed": 42,
        "outputType": "URL",
        "outputFormat": "PNG",
        "includeCost": True,
    }
    assert sizes(result) == [(192, 128)] * 3
    assert [rendered.seed for rendered in result.images] == [42, 43, 44]
    # 3 x $0.0006: exactly 1800 micro-USD (binary floats would give 0.0018000000000000002 -> 1801).
    assert result.provider_cost_micros == 1800
    assert len(r.fake.downloads) == 3
    assert all("authorization" not in download.headers for download in r.fake.downloads)


@pytest.mark.parametrize("output_type", ["base64Data", "dataURI"])
async def test_runware_inline_images(rig: Callable[..., Rig], output_type: str) -> None:
    r = rig("runware")
    result = await r.generate(spec=r.spec(options={"output_type": output_type, "output_format": "WEBP"}))
    assert r.fake.requests[0].body[0]["outputType"] == output_type
    assert r.fake.requests[0].body[0]["outputFormat"] == "WEBP"
    assert sizes(result) == [(192, 128)]
    assert r.fake.downloads == []


async def test_runware_leaves_a_drawn_zero_seed_to_runware(rig: Callable[..., Rig]) -> None:
    # Runware seeds start at 1; a server-drawn 0 is not sent and Runware's own seed is reported.
    r = rig("runware")
    spec, request = r.spec(), r.request()
    result = await r.backend.generate(GenerationJob.from_request(spec, request, (0,)))
    assert "seed" not in r.fake.requests[0].body[0]
    assert result.images[0].seed is not None and result.images[0].seed >= 1


async def test_fal_queue_one_job_per_image(rig: Callable[..., Rig]) -> None:
    r = rig("fal")
    result = await r.generate(r.request(number_results=2, seed=7))

    # fal reports one seed per request: one job per image, seeded 7 and 8.
    submits = [call for call in r.fake.requests if call.method == "POST"]
    assert [call.path for call in submits] == ["/queue/fal-ai/flux/schnell"] * 2
    assert sorted((call.body for call in submits), key=lambda body: body["seed"]) == [
        {
            "prompt": PROMPT,
            "image_size": {"width": 192, "height": 128},
            "num_inference_steps": 4,
            "num_images": 1,
            "seed": seed,
            "output_format": "png",
            "enable_safety_checker": True,
        }
        for seed in (7, 8)
    ]
    assert len(r.fake.jobs) == 2
    for rid in r.fake.jobs:
        status = f"GET /queue/fal-ai/flux/requests/{rid}/status"
        # Each job: queued, in progress, completed, then its result.
        assert r.fake.api_calls.count(status) == 3
        assert r.fake.api_calls.count(f"GET /queue/fal-ai/flux/requests/{rid}") == 1
    assert len(r.fake.requests) == 10
    assert all(call.headers["authorization"] == f"Key {KEY}" for call in r.fake.requests)
    assert r.sleeps.delays == [0.01] * 4  # two polls per job found it queued / in progress
    assert sizes(result) == [(192, 128)] * 2
    # Each image is reported with the seed that made it.
    assert [rendered.seed for rendered in result.images] == [7, 8]
    assert [rendered.image.getpixel((0, 0)) for rendered in result.images] == [color_of(7), color_of(8)]
    assert result.provider_cost_micros is None
    assert all("authorization" not in download.headers for download in r.fake.downloads)


async def test_fal_sync_endpoint(rig: Callable[..., Rig]) -> None:
    r = rig("fal", mode="sync")
    spec = r.spec(source="fal-ai/flux/schnell", options={"acceleration": "high", "enable_safety_checker": False})
    result = await r.generate(r.request(seed=3, steps=8, steps_sent=True), spec)
    assert r.fake.api_calls == ["POST /run/fal-ai/flux/schnell"]
    assert r.fake.requests[0].body == {
        "prompt": PROMPT,
        "image_size": {"width": 192, "height": 128},
        "num_inference_steps": 8,
        "num_images": 1,
        "seed": 3,
        "output_format": "png",
        "enable_safety_checker": False,
        "acceleration": "high",
    }
    assert [rendered.seed for rendered in result.images] == [3]


async def test_replicate_one_prediction_per_image(rig: Callable[..., Rig]) -> None:
    r = rig("replicate")
    result = await r.generate(r.request(number_results=2, seed=5))

    # Replicate reports no seeds: one prediction per image, seeded 5 and 6.
    assert len(r.fake.predictions) == 2
    creates = [call for call in r.fake.requests if call.method == "POST"]
    assert [call.path for call in creates] == ["/v1/models/black-forest-labs/flux-schnell/predictions"] * 2
    assert all(call.headers["authorization"] == f"Bearer {KEY}" for call in r.fake.requests)
    assert sorted((call.body for call in creates), key=lambda body: body["input"]["seed"]) == [
        {
            "input": {
                "prompt": PROMPT,
                "aspect_ratio": "1:1",
                "megapixels": "0.25",
                "num_outputs": 1,
                "num_inference_steps": 4,
                "seed": seed,
                "output_format": "png",
                "go_fast": False,
                "disable_safety_checker": False,
            }
        }
        for seed in (5, 6)
    ]
    for pid in r.fake.predictions:
        assert r.fake.api_calls.count(f"GET /v1/predictions/{pid}") == 2
    assert sizes(result) == [(512, 512)] * 2
    assert [rendered.seed for rendered in result.images] == [5, 6]
    assert [rendered.image.getpixel((0, 0)) for rendered in result.images] == [color_of(5), color_of(6)]
    assert result.provider_cost_micros is None


async def test_replicate_go_fast_reports_no_seeds(rig: Callable[..., Rig]) -> None:
    r = rig("replicate")
    result = await r.generate(r.request(number_results=2), r.spec(options={"go_fast": True}))
    assert sorted(call.body["input"]["go_fast"] for call in r.fake.requests if call.method == "POST") == [True, True]
    assert [rendered.seed for rendered in result.images] == [None, None]


async def test_replicate_pinned_version(rig: Callable[..., Rig]) -> None:
    r = rig("replicate")
    await r.generate(spec=r.spec(source=f"black-forest-labs/flux-schnell:{VERSION}"))
    assert r.fake.api_calls[0] == "POST /v1/predictions"
    assert r.fake.requests[0].body["version"] == VERSION
    assert r.fake.requests[0].body["input"]["megapixels"] == "0.25"


async def test_together_one_request_per_image(rig: Callable[..., Rig]) -> None:
    r = rig("together")
    spec = r.spec(source="stabilityai/stable-diffusion-xl-base-1.0", guidance="cfg", negative="cfg")
    request = r.request(number_results=2, steps=30, steps_sent=True, guidance=6.0, negative_prompt="text", seed=9)

    result = await r.generate(request, spec)

    # Together reports no seeds: one request per image, seeded 9 and 10.
    assert [(call.path, call.headers["authorization"]) for call in r.fake.requests] == [
        ("/v1/images/generations", f"Bearer {KEY}")
    ] * 2
    assert sorted((call.body for call in r.fake.requests), key=lambda body: body["seed"]) == [
        {
            "model": "stabilityai/stable-diffusion-xl-base-1.0",
            "prompt": PROMPT,
            "width": 192,
            "height": 128,
            "n": 1,
            "steps": 30,
            "seed": seed,
            "response_format": "base64",
            "output_format": "png",
            "negative_prompt": "text",
            "guidance_scale": 6.0,
        }
        for seed in (9, 10)
    ]
    assert [rendered.image.getpixel((0, 0)) for rendered in result.images] == [color_of(9), color_of(10)]
    assert [rendered.seed for rendered in result.images] == [9, 10]
    assert r.fake.downloads == []


async def test_together_url_images_are_downloaded(rig: Callable[..., Rig]) -> None:
    r = rig("together")
    result = await r.generate(spec=r.spec(options={"response_format": "url"}))
    assert r.fake.requests[0].body["response_format"] == "url"
    assert sizes(result) == [(192, 128)]
    assert len(r.fake.downloads) == 1


async def test_openai_gpt_image_fields(rig: Callable[..., Rig]) -> None:
    r = rig("openai")
    spec = r.spec(source="gpt-image-1", options={"quality": "low", "moderation": "low"})
    result = await r.generate(r.request(width=1024, height=1024), spec)
    assert r.fake.requests[0].body == {
        "model": "gpt-image-1",
        "prompt": PROMPT,
        "n": 1,
        "size": "1024x1024",
        "output_format": "png",
        "moderation": "low",
        "quality": "low",
    }
    assert sizes(result) == [(1024, 1024)]
    assert [rendered.seed for rendered in result.images] == [None]
    assert result.provider_cost_micros is None


async def test_openai_dalle_asks_for_base64(rig: Callable[..., Rig]) -> None:
    r = rig("openai")
    result = await r.generate(r.request(number_results=2))
    assert r.fake.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert r.fake.requests[0].body == {
        "model": "dall-e-2",
        "prompt": PROMPT,
        "n": 2,
        "size": "256x256",
        "response_format": "b64_json",
    }
    assert sizes(result) == [(256, 256)] * 2
    assert r.fake.downloads == []


# --- every image's reported seed reproduces it ------------------------------------------------

SEEDED = ["runware", "fal", "replicate", "together"]


@pytest.mark.parametrize("name", SEEDED)
async def test_every_image_is_reproduced_by_its_reported_seed(rig: Callable[..., Rig], name: str) -> None:
    """The fakes derive a batch's later images from seeds they do not report (as real batches do), so
    only per-image seeds (Runware's report, or one request per image elsewhere) pass this."""
    r = rig(name)
    batch = await r.generate(r.request(number_results=3, seed=40))
    assert [rendered.seed for rendered in batch.images] == [40, 41, 42]
    sent = sorted(seed for call in r.fake.requests if call.method == "POST" for seed in _seeds_sent(name, call.body))
    assert sent == ([40] if name == "runware" else [40, 41, 42])
    for index, rendered in enumerate(batch.images):
        again = await r.generate(r.request(seed=rendered.seed))
        assert again.images[0].image.tobytes() == rendered.image.tobytes(), index
        assert rendered.image.getpixel((0, 0)) == color_of(40 + index)


def _seeds_sent(name: str, body: Any) -> list[int]:
    if name == "runware":
        return [task["seed"] for task in body]
    return [body["input"]["seed"] if name == "replicate" else body["seed"]]


# --- an image the provider's safety checker flags is never returned ---------------------------

SAFETY_CHECKED = ["runware", "fal", "replicate"]


@pytest.mark.parametrize("name", SAFETY_CHECKED)
async def test_a_flagged_image_fails_the_generation(
    rig: Callable[..., Rig], name: str, caplog: pytest.LogCaptureFixture
) -> None:
    r = rig(name)
    r.fake.nsfw_seeds = {21}
    with caplog.at_level(logging.WARNING, logger="imagegate.providers"), pytest.raises(GenerationFailed) as caught:
        await r.generate(r.request(number_results=2, seed=20))
    error = caught.value
    assert (error.status, error.code) == (500, "INTERNAL_ERROR")
    assert error.details == {"reason": "provider_safety_checker"}
    assert "safety checker flagged a generated image" in error.message and "nothing is charged" in error.message
    assert f"{name}: the provider's safety checker flagged the image(s) of seed(s) [21]" in caplog.text
    # The other seed alone passes.
    result = await r.generate(r.request(seed=20))
    assert [rendered.seed for rendered in result.images] == [20]


@pytest.mark.parametrize(
    ("name", "options"),
    [("fal", {"enable_safety_checker": False}), ("replicate", {"disable_safety_checker": True})],
)
async def test_a_disabled_safety_checker_flags_nothing(
    rig: Callable[..., Rig], name: str, options: dict[str, Any]
) -> None:
    r = rig(name)
    r.fake.nsfw_seeds = {20}
    result = await r.generate(r.request(seed=20), r.spec(options=options))
    assert [rendered.seed for rendered in result.images] == [20]


async def test_replicate_nsfw_failure_is_the_safety_error(rig: Callable[..., Rig]) -> None:
    r = rig("replicate")
    r.fake.prediction_error = NSFW_ERROR
    with pytest.raises(GenerationFailed) as caught:
        await r.generate()
    assert caught.value.details == {"reason": "provider_safety_checker"}


@pytest.mark.parametrize("name", ["fal", "replicate"])
async def test_a_failed_image_cancels_the_jobs_of_the_others(rig: Callable[..., Rig], name: str) -> None:
    # Seed 30 is flagged; seed 31's job never finishes and must not be left running (and billed).
    r = rig(name)
    r.fake.nsfw_seeds, r.fake.stalled_seeds = {30}, {31}
    with pytest.raises(GenerationFailed):
        await r.generate(r.request(number_results=2, seed=30))
    if name == "fal":
        [stalled] = [rid for rid, job in r.fake.jobs.items() if job.payload["seed"] == 31]
        assert r.fake.jobs[stalled].canceled
        assert f"PUT /queue/fal-ai/flux/requests/{stalled}/cancel" in r.fake.api_calls
    else:
        [stalled] = [pid for pid, p in r.fake.predictions.items() if p.input["seed"] == 31]
        assert r.fake.predictions[stalled].status == "canceled"
        assert f"POST /v1/predictions/{stalled}/cancel" in r.fake.api_calls


# --- what each provider's model cannot honour is refused before payment, without any HTTP -----

REJECTIONS = [
    ("runware", {}, {"seed": 0}, "seed"),
    ("runware", {"guidance": "cfg", "negative": "cfg"}, {"negative_prompt": "x"}, "negativePrompt"),
    ("runware", {}, {"guidance": 3.0}, "guidance"),  # FLUX schnell has no guidance input
    ("runware", {}, {"negative_prompt": "blurry"}, "negativePrompt"),  # schnell: only via true CFG
    ("fal", {}, {"steps": 13, "steps_sent": True}, "steps"),
    ("fal", {"guidance": "cfg", "negative": "cfg"}, {"negative_prompt": "blurry"}, "negativePrompt"),
    ("fal", {"guidance": "embedded", "source": "fal-ai/flux/dev"}, {"guidance": 25.0}, "guidance"),
    ("replicate", {}, {"steps": 5, "steps_sent": True}, "steps"),
    ("replicate", {"guidance": "cfg"}, {"guidance": 3.5}, "guidance"),
    ("replicate", {}, {"width": 768, "height": 512}, "width"),
    ("replicate", {"options": {"go_fast": True}}, {"seed": 1}, "seed"),
    ("together", {"options": {"max_steps": 12}}, {"steps": 20, "steps_sent": True}, "steps"),
    ("together", {}, {"guidance": 2.0}, "guidance"),
    ("openai", {}, {"seed": 1}, "seed"),
    ("openai", {"guidance": "cfg", "negative": "cfg"}, {"negative_prompt": "blurry"}, "negativePrompt"),
    ("openai", {"guidance": "cfg"}, {"guidance": 5.0}, "guidance"),
    ("openai", {}, {"steps_sent": True}, "steps"),
    ("openai", {}, {"width": 512, "height": 768}, "width"),
    ("openai", {"source": "dall-e-3"}, {"width": 1024, "height": 1024, "number_results": 2}, "numberResults"),
    ("openai", {}, {"prompt": "x" * 1001}, "prompt"),
]


@pytest.mark.parametrize(("name", "spec_changes", "request_changes", "field"), REJECTIONS)
async def test_unsupported_parameters_are_invalid_before_any_call(
    rig: Callable[..., Rig], name: str, spec_changes: dict[str, Any], request_changes: dict[str, Any], field: str
) -> None:
    r = rig(name)
    with pytest.raises(InvalidParameter) as caught:
        r.backend.check_request(r.spec(**spec_changes), r.request(**request_changes))
    assert caught.value.field == field
    assert caught.value.status == 400 and caught.value.code == "INVALID_PARAMETER"
    assert r.fake.requests == []


@pytest.mark.parametrize("name", NAMES)
async def test_defaults_pass_the_checks(rig: Callable[..., Rig], name: str) -> None:
    r = rig(name)
    r.backend.check_request(r.spec(), r.request())
    assert (await r.backend.availability(r.spec())).available


async def test_invalid_catalog_options_make_the_model_unavailable(rig: Callable[..., Rig]) -> None:
    r = rig("fal")
    spec = r.spec(options={"output_format": "tiff"})
    availability = await r.backend.availability(spec)
    assert not availability.available and "invalid options" in (availability.reason or "")
    with pytest.raises(ModelUnavailable):
        r.backend.check_request(spec, r.request())
    openai = rig("openai")
    assert not (await openai.backend.availability(openai.spec(source="dall-e-9"))).available


# --- provider failures map to our errors ------------------------------------------------------

INPUT_STATUS = {"runware": 400, "fal": 422, "replicate": 422, "together": 400, "openai": 400}


@pytest.mark.parametrize("name", NAMES)
async def test_provider_rejection_is_invalid_parameter_with_its_message(rig: Callable[..., Rig], name: str) -> None:
    r = rig(name)
    r.fake.fail_next(INPUT_STATUS[name], "Your prompt was flagged by the content filter")
    with pytest.raises(InvalidParameter) as caught:
        await r.generate()
    assert "Your prompt was flagged by the content filter" in caught.value.message
    assert caught.value.details["upstreamStatus"] == INPUT_STATUS[name]
    assert len(r.fake.requests) == 1  # the client's input is not retried


@pytest.mark.parametrize(
    ("name", "bad_request", "message"),
    [
        ("runware", {"negative_prompt": "x"}, "negativePrompt must be a string of 2 to 3000 characters"),
        ("fal", {"steps": 20, "steps_sent": True}, "num_inference_steps: num_inference_steps must be between 1 and 12"),
        ("replicate", {"steps": 9, "steps_sent": True}, "input.num_inference_steps: num_inference_steps must be"),
    ],
)
async def test_provider_validation_errors_reach_the_client(
    rig: Callable[..., Rig], name: str, bad_request: dict[str, Any], message: str
) -> None:
    # Past our own checks (as with a misconfigured catalog), the provider's documented error body is read.
    r = rig(name)
    spec = r.spec(guidance="cfg", negative="cfg")
    with pytest.raises(InvalidParameter) as caught:
        await r.generate(r.request(**bad_request), spec, check=False)
    assert message in caught.value.message


@pytest.mark.parametrize("status", [401, 402, 403])
@pytest.mark.parametrize("name", NAMES)
async def test_auth_and_balance_errors_are_503_and_logged_without_the_key(
    rig: Callable[..., Rig],
    name: str,
    status: int,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r = rig(name)
    if status == 401:
        monkeypatch.setenv(CASES[name].env, WRONG_KEY)
    else:
        r.fake.fail_next(status, f"Insufficient balance for this key {KEY}", code="insufficientCredits")
    with caplog.at_level(logging.WARNING, logger="imagegate.providers"), pytest.raises(UpstreamUnavailable) as caught:
        await r.generate()
    error = caught.value
    assert (error.status, error.code, error.retry_after) == (503, "UPSTREAM_UNAVAILABLE", 7)
    assert error.headers == {"Retry-After": "7"}
    assert len(r.fake.requests) == 1
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.startswith(f"{name}:") and f"HTTP {status}" in line for line in lines), lines
    assert_no_secret(error.message, repr(error.details), *lines)
    if status != 401:
        assert any("<redacted>" in line for line in lines)  # the provider's echo of the key was scrubbed


async def test_openai_echo_of_a_wrong_key_is_redacted(
    rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", WRONG_KEY)
    r = rig("openai")
    with caplog.at_level(logging.WARNING, logger="imagegate.providers"), pytest.raises(UpstreamUnavailable):
        await r.generate()
    [line] = [record.getMessage() for record in caplog.records]
    assert "Incorrect API key provided: <redacted>" in line
    assert_no_secret(line)


async def test_openai_exhausted_quota_is_not_retried(rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture) -> None:
    r = rig("openai")
    r.fake.fail_next(429, "You exceeded your current quota, please check your plan.", code="insufficient_quota")
    with caplog.at_level(logging.WARNING, logger="imagegate.providers"), pytest.raises(UpstreamUnavailable):
        await r.generate()
    assert len(r.fake.requests) == 1 and r.sleeps.delays == []
    assert "exceeded your current quota" in caplog.text


@pytest.mark.parametrize("name", NAMES)
async def test_rate_limit_is_retried_after_retry_after(rig: Callable[..., Rig], name: str) -> None:
    r = rig(name)
    r.fake.fail_next(429, "Too many requests", times=2, retry_after=3)
    result = await r.generate()
    assert sizes(result) == [(CASES[name].width, CASES[name].height)]
    assert r.sleeps.delays[:2] == [3.0, 3.0]  # Retry-After outranks the shorter backoff
    assert r.fake.api_calls[0] == r.fake.api_calls[1] == r.fake.api_calls[2]


@pytest.mark.parametrize("name", NAMES)
async def test_persistent_server_errors_end_in_503_with_retry_after(
    rig: Callable[..., Rig], name: str, caplog: pytest.LogCaptureFixture
) -> None:
    r = rig(name)
    r.fake.fail_next(503, "Service overloaded", times=10)
    with caplog.at_level(logging.WARNING, logger="imagegate.providers"), pytest.raises(UpstreamUnavailable) as caught:
        await r.generate()
    assert caught.value.retry_after == 7
    assert len(r.fake.requests) == 3  # 1 + max_retries
    assert r.sleeps.delays == [0.01, 0.02]  # exponential backoff
    assert "failed after 3 attempt(s)" in caplog.text


async def test_a_long_retry_after_is_passed_to_the_client_not_waited(rig: Callable[..., Rig]) -> None:
    r = rig("runware")
    r.fake.fail_next(503, "Queue full", times=3, retry_after=120)
    with pytest.raises(UpstreamUnavailable) as caught:
        await r.generate()
    assert caught.value.retry_after == 120
    assert len(r.fake.requests) == 1 and r.sleeps.delays == []


@pytest.mark.parametrize("name", NAMES)
async def test_timeouts_are_retried_then_503(rig: Callable[..., Rig], name: str) -> None:
    r = rig(name, timeout_s=0.1, max_retries=1)
    r.fake.delay_s = 0.4
    with pytest.raises(UpstreamUnavailable) as caught:
        await r.generate()
    assert caught.value.retry_after == 7
    assert len(r.fake.requests) == 2


async def test_unreachable_provider_is_503(rig: Callable[..., Rig]) -> None:
    from tests.support.server import free_port

    r = rig("together", base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1)
    with pytest.raises(UpstreamUnavailable):
        await r.generate()
    assert r.sleeps.delays == [0.01]


# --- keys -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
async def test_missing_key_makes_models_unavailable_with_the_reason(
    rig: Callable[..., Rig], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CASES[name].env)
    r = rig(name)
    availability = await r.backend.availability(r.spec())
    assert not availability.available
    assert CASES[name].env in (availability.reason or "")
    with pytest.raises(ModelUnavailable):
        await r.generate()
    assert r.fake.requests == []


async def test_key_file_relative_to_the_config_file(
    rig: Callable[..., Rig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUNWARE_API_KEY")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "runware.key").write_text(f"{KEY}\n")
    fake = rig("runware").fake
    settings = Settings(
        config_file=tmp_path / "imagegate.toml",
        providers={"runware": {**FAST, "base_url": f"{fake.url}/v1", "api_key_file": "keys/runware.key"}},
    )
    backend = RunwareBackend(settings)
    try:
        assert (await backend.availability(Rig(CASES["runware"], backend, fake).spec())).available
        await Rig(CASES["runware"], backend, fake).generate()
        assert fake.requests[0].headers["authorization"] == f"Bearer {KEY}"
        (tmp_path / "keys" / "runware.key").write_text("\n")
        reason = (await backend.availability(Rig(CASES["runware"], backend, fake).spec())).reason or ""
        assert "runware.key is empty" in reason
        (tmp_path / "keys" / "runware.key").unlink()
        reason = (await backend.availability(Rig(CASES["runware"], backend, fake).spec())).reason or ""
        assert "cannot be read" in reason
    finally:
        await backend.aclose()


def test_api_key_never_prints() -> None:
    key = ApiKey(KEY)
    assert_no_secret(str(key), repr(key), f"{key}", key.redact(f"echo {KEY}!"))


# --- what comes back is checked before anything is stored ------------------------------------


@pytest.mark.parametrize("name", NAMES)
async def test_an_image_of_another_size_is_an_error(
    rig: Callable[..., Rig], name: str, caplog: pytest.LogCaptureFixture
) -> None:
    r = rig(name)
    width, height = CASES[name].width, CASES[name].height
    r.fake.size_override = (width + 64, height)
    with caplog.at_level(logging.ERROR, logger="imagegate.providers"), pytest.raises(GenerationFailed):
        await r.generate()
    assert f"a {width + 64}x{height} image where {width}x{height} was requested" in caplog.text


@pytest.mark.parametrize("name", ["runware", "fal", "replicate"])
async def test_an_expired_image_url_is_503_not_the_clients_fault(
    rig: Callable[..., Rig], name: str, caplog: pytest.LogCaptureFixture
) -> None:
    r = rig(name)
    r.fake.expired_images = True
    with caplog.at_level(logging.WARNING, logger="imagegate.providers"), pytest.raises(UpstreamUnavailable):
        await r.generate()
    assert "failed (HTTP 403): <Error><Code>AccessDenied" in caplog.text
    assert "credentials" not in caplog.text


async def test_a_long_provider_message_cannot_leak_part_of_the_key(
    rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    r = rig("together")
    r.fake.fail_next(402, "x" * 490 + KEY)  # the key straddles the 500-character cut
    with caplog.at_level(logging.WARNING, logger="imagegate.providers"), pytest.raises(UpstreamUnavailable):
        await r.generate()
    assert KEY[:8] not in caplog.text


@pytest.mark.parametrize("name", ["runware", "openai"])
async def test_bytes_that_are_not_an_image_are_an_error(rig: Callable[..., Rig], name: str) -> None:
    r = rig(name)
    r.fake.corrupt_images = True
    with pytest.raises(GenerationFailed):
        await r.generate()


# --- job flows ------------------------------------------------------------------------------------


async def test_fal_gives_up_on_a_stuck_job_and_cancels_it(rig: Callable[..., Rig]) -> None:
    r = rig("fal", max_wait_s=0.05)
    r.fake.never_completes = True
    with pytest.raises(UpstreamUnavailable) as caught:
        await r.generate()
    assert caught.value.retry_after == 7
    [rid] = r.fake.jobs
    assert r.fake.api_calls.count(f"GET /queue/fal-ai/flux/requests/{rid}/status") == 5  # 0.05 s / 0.01 s
    assert r.fake.api_calls[-1] == f"PUT /queue/fal-ai/flux/requests/{rid}/cancel"
    assert r.fake.jobs[rid].canceled


async def test_fal_never_sends_the_key_to_another_host(rig: Callable[..., Rig]) -> None:
    r = rig("fal")
    r.fake.foreign_status_url = True
    with pytest.raises(GenerationFailed):
        await r.generate()
    assert r.fake.api_calls == ["POST /queue/fal-ai/flux/schnell"]


async def test_replicate_failed_prediction_is_503_with_its_reason(rig: Callable[..., Rig]) -> None:
    r = rig("replicate")
    r.fake.prediction_error = "CUDA error: out of memory"
    with pytest.raises(UpstreamUnavailable) as caught:
        await r.generate()
    assert "CUDA error: out of memory" in caught.value.message


async def test_replicate_gives_up_on_a_stuck_prediction_and_cancels_it(rig: Callable[..., Rig]) -> None:
    r = rig("replicate", max_wait_s=0.03)
    r.fake.never_completes = True
    with pytest.raises(UpstreamUnavailable):
        await r.generate()
    [pid] = r.fake.predictions
    assert r.fake.api_calls[-1] == f"POST /v1/predictions/{pid}/cancel"
    assert r.fake.predictions[pid].status == "canceled"


# --- registration, documented configuration, helpers -------------------------------------------


def test_provider_backends_are_registered() -> None:
    factories = load_backend_factories()
    assert set(NAMES) <= set(factories)


def _docs_configs() -> list[tuple[str, str]]:
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.S)
    configs = [(tomllib.loads(block), block) for block in blocks]
    return [(next(iter(data["providers"])), block) for data, block in configs if "providers" in data]


@pytest.mark.parametrize(("name", "block"), [pytest.param(*config, id=config[0]) for config in _docs_configs()])
async def test_documented_configuration_sells_the_model(name: str, block: str, tmp_path: Path) -> None:
    """Each provider's snippet in docs/providers.md loads, passes a default request and is available."""
    config = tmp_path / "imagegate.toml"
    config.write_text(block)
    settings = load_settings(config)
    catalog = build_catalog(settings)
    [model_id] = settings.models
    spec = catalog[model_id]
    assert spec.backend == name
    backend = load_backend_factories()[name](settings)
    try:
        backend.check_request(spec, ImageRequest(model_id, PROMPT, spec.default_width, spec.default_height, 1,
                                                 spec.steps.default, False))  # fmt: skip
        assert (await backend.availability(spec)).available
    finally:
        await backend.aclose()


def test_docs_cover_every_provider() -> None:
    assert {name for name, _ in _docs_configs()} == set(NAMES)


def test_retry_after_forms() -> None:
    assert retry_after_seconds("3") == 3
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    assert 85 <= (retry_after_seconds(later) or 0) <= 91
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


def test_usd_to_micros_is_exact_and_rounds_up() -> None:
    assert usd_to_micros(Decimal("0.0006") * 3) == 1800
    assert usd_to_micros(Decimal("0.0013")) == 1300
    assert usd_to_micros(Decimal("0.00000001")) == 1
