"""Tiny random-weight pipelines on disk, shared by the whole test session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imagegate.tiny_pipelines import build_tiny_flux, build_tiny_sd, build_tiny_sdxl


def build_tiny_models(root: Path) -> dict[str, Path]:
    return {
        "flux": build_tiny_flux(root / "tiny-flux"),
        "sd": build_tiny_sd(root / "tiny-sd"),
        "sdxl": build_tiny_sdxl(root / "tiny-sdxl"),
    }


def tiny_catalog_overrides(paths: dict[str, Path], missing_dir: Path) -> dict[str, dict[str, Any]]:
    """Built-in ids pointed at tiny local pipelines (the real loader and catalog, tiny weights)."""
    cpu = {"requires_cuda": False, "dtype": "float32", "memory_gb": 0.05}
    return {
        "flux-schnell": {"source": str(paths["flux"]), **cpu, "max_concurrency": 2},
        "sdxl": {"source": str(paths["sdxl"]), **cpu},
        "sd-1.5": {"source": str(paths["sd"]), **cpu},
        "sd-turbo": {"source": str(missing_dir), **cpu},
    }
