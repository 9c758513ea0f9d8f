"""The benchmark-only model: a simulated GPU at 0 ms, off unless configured, never a default."""

from __future__ import annotations

import time

import pytest

from imagegate.backends.base import GenerationJob
from imagegate.backends.simulated import SimulatedBackend
from imagegate.catalog import CatalogError, build_catalog
from imagegate.config import load_settings
from imagegate.validation import parse_image_request

ENABLED = {"bench-simulated": {"enabled": True, "options": {"batch_ms": 0, "image_ms": 0}}}


def test_it_is_off_unless_configured_and_marked_benchmark_only() -> None:
    assert "bench-simulated" not in build_catalog(load_settings(payments={"mode": "network"}))
    catalog = build_catalog(load_settings(payments={"mode": "network"}, models=ENABLED))
    assert catalog["bench-simulated"].benchmark_only
    assert catalog.default_model != "bench-simulated"
    assert not any(spec.benchmark_only for model_id, spec in catalog.items() if model_id != "bench-simulated")


def test_it_can_never_be_the_default_model() -> None:
    with pytest.raises(CatalogError, match="benchmark-only"):
        build_catalog(load_settings(payments={"mode": "network"}, models=ENABLED,
                                    catalog={"default_model": "bench-simulated"}))


async def test_at_zero_ms_it_renders_the_requested_size_in_negligible_time() -> None:
    settings = load_settings(payments={"mode": "network"}, models=ENABLED)
    catalog = build_catalog(settings)
    spec = catalog["bench-simulated"]
    request = parse_image_request({"prompt": "a red square", "model": "bench-simulated", "width": 128, "height": 192,
                                   "numberResults": 2, "steps": 1}, catalog, require_prompt=True)
    backend = SimulatedBackend(settings)
    started = time.perf_counter()
    result = await backend.generate(GenerationJob.from_request(spec, request, (7, 8)))
    assert time.perf_counter() - started < 0.5
    assert [(image.image.size, image.seed) for image in result.images] == [((128, 192), 7), ((128, 192), 8)]
    assert result.images[0].image.getpixel((0, 0)) != result.images[1].image.getpixel((0, 0))
