from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagegate.app import app_from_settings
from imagegate.config import Settings, load_settings
from tests.support.models import tiny_catalog_overrides
from tests.support.server import live_server


def tiny_settings(root: Path, tiny_model_paths: dict[str, Path], **overrides: Any) -> Settings:
    """Embedded defaults on a temp data dir, the built-in ids pointed at tiny local pipelines."""
    models = tiny_catalog_overrides(tiny_model_paths, root / "no-such-pipeline")
    models.update(overrides.pop("models", {}))
    return load_settings(
        data_dir=root,
        storage={"directory": str(root / "images")},
        diffusers={"cpu_threads": 1, "allow_downloads": False},
        models=models,
        catalog={"default_model": "flux-schnell"},
        **overrides,
    )


@pytest.fixture(scope="session")
def free_api(tmp_path_factory: pytest.TempPathFactory, tiny_model_paths: dict[str, Path]) -> Iterator[str]:
    """A real server with payments switched off: the core API on its own."""
    root = tmp_path_factory.mktemp("free-api")
    settings = tiny_settings(root, tiny_model_paths, payments={"enabled": False})
    with live_server(app_from_settings(settings)) as base_url:
        yield base_url
