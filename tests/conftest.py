from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Session-wide servers any test directory may use (one each per session): PostgreSQL, moto's S3, a Ray head.
pytest_plugins = ["tests.support.postgres", "tests.support.s3", "tests.support.ray"]

# No test may reach a model hub; the tiny pipelines are built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    import torch

    from tests.support.models import build_tiny_models

    torch.set_num_threads(1)
    yield build_tiny_models(tmp_path_factory.mktemp("tiny-models"))
