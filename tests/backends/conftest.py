"""Tiny real pipelines behind the real catalog and the real diffusers backend (offline, CPU)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL.Image import Image

from imagegate.backends.base import GenerationJob
from imagegate.catalog import Catalog, ModelSpec, build_catalog
from imagegate.config import Settings, load_settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Bit-exact comparisons need one fixed intra-op thread count (results differ between counts).
CPU_THREADS = 1
ON_CPU: dict[str, Any] = {"requires_cuda": False, "device": "cpu", "memory_gb": None}


@pytest.fixture(scope="session")
def tiny_dirs(tiny_model_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """flux (schnell-like), flux-dev (guidance input), sd, sdxl: built once per session."""
    from imagegate.tiny_pipelines import build_tiny_flux

    flux_dev = build_tiny_flux(tmp_path_factory.mktemp("tiny-flux-dev") / "flux-dev", guidance_embeds=True)
    return {**tiny_model_paths, "flux-dev": flux_dev}


def tiny_catalog_tables(dirs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The built-in ids (their real guidance and negative-prompt modes) pointed at tiny pipelines."""
    return {
        "flux-schnell": {"source": str(dirs["flux"]), **ON_CPU},
        "flux-dev": {"source": str(dirs["flux-dev"]), **ON_CPU},
        "sdxl": {"source": str(dirs["sdxl"]), **ON_CPU},
        "sdxl-turbo": {"source": str(dirs["sdxl"]), **ON_CPU},
        "sd-1.5": {"source": str(dirs["sd"]), **ON_CPU},
        "sd-turbo": {"source": str(dirs["sd"]), **ON_CPU},
    }


def make_catalog(
    dirs: dict[str, Path], models: dict[str, dict[str, Any]] | None = None, **diffusers: Any
) -> tuple[Catalog, Settings]:
    """The real catalog and settings: tiny tables, then ``models`` on top of them."""
    tables = tiny_catalog_tables(dirs)
    for model_id, table in (models or {}).items():
        tables[model_id] = {**tables.get(model_id, {}), **table}
    workers = {"max_queue": diffusers.pop("max_queue")} if "max_queue" in diffusers else {}
    settings = load_settings(
        models=tables,
        catalog={"default_model": "flux-schnell"},
        diffusers={"cpu_threads": CPU_THREADS, **diffusers},
        workers=workers,
    )
    return build_catalog(settings), settings


def job(spec: ModelSpec, seeds: tuple[int, ...] = (1,), **fields: Any) -> GenerationJob:
    """A small, fast job: 128 px, 2 steps, unless ``fields`` say otherwise."""
    values: dict[str, Any] = {
        "spec": spec,
        "prompt": "a red cat",
        "negative_prompt": None,
        "width": 128,
        "height": 128,
        "steps": 2,
        "guidance": None,
        "seeds": seeds,
        "seed_requested": True,
    }
    values.update(fields)
    return GenerationJob(**values)


def png_sha256(image: Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return hashlib.sha256(buffer.getvalue()).hexdigest()


BackendFactory = Callable[..., Awaitable[tuple[Catalog, Any]]]


@pytest.fixture(scope="module")
async def shared(tiny_dirs: dict[str, Path]) -> AsyncIterator[tuple[Catalog, Any]]:
    """One backend with default settings for a whole module: each tiny pipeline loads once."""
    from imagegate.backends.diffusers import DiffusersBackend

    torch.set_num_threads(CPU_THREADS)
    catalog, settings = make_catalog(tiny_dirs)
    backend = DiffusersBackend(settings)
    yield catalog, backend
    await backend.aclose()


@pytest.fixture
async def make_backend(tiny_dirs: dict[str, Path]) -> AsyncIterator[BackendFactory]:
    """``await make_backend(models=..., backend_class=..., **diffusers_settings)`` -> (catalog, backend)."""
    from imagegate.backends.diffusers import DiffusersBackend

    torch.set_num_threads(CPU_THREADS)
    created: list[DiffusersBackend] = []

    async def factory(
        models: dict[str, dict[str, Any]] | None = None,
        backend_class: type[DiffusersBackend] = DiffusersBackend,
        **diffusers: Any,
    ) -> tuple[Catalog, DiffusersBackend]:
        catalog, settings = make_catalog(tiny_dirs, models, **diffusers)
        backend = backend_class(settings)
        created.append(backend)
        return catalog, backend

    yield factory
    for backend in created:
        await backend.aclose()
