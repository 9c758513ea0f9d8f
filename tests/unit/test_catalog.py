from __future__ import annotations

from pathlib import Path

import pytest

from imagegate.catalog import CatalogError, build_catalog
from imagegate.config import load_settings

BUILTIN_IDS = {"flux-schnell", "flux-dev", "sdxl", "sdxl-turbo", "sd-turbo", "sd-1.5"}


def test_builtin_entries() -> None:
    catalog = build_catalog(load_settings(payments={"mode": "network"}))
    assert set(catalog) >= BUILTIN_IDS
    assert catalog.default_model == "flux-schnell"
    schnell = catalog["flux-schnell"]
    assert schnell.steps.default == 4 and schnell.guidance.mode == "true_cfg" and schnell.negative_prompt == "true_cfg"
    assert catalog["flux-dev"].guidance.mode == "embedded"


def test_default_model_embedded_vs_production() -> None:
    embedded = build_catalog(load_settings())
    assert embedded.default_model in ("imagegate-tiny", "flux-schnell")
    if "imagegate-tiny" in embedded:
        assert embedded.default_model == "imagegate-tiny"
    assert build_catalog(load_settings(payments={"mode": "network"})).default_model == "flux-schnell"
    assert build_catalog(load_settings(catalog={"default_model": "sdxl"})).default_model == "sdxl"


def test_operator_overrides_and_additions_from_a_toml_file(tmp_path: Path) -> None:
    pipeline = tmp_path / "pipelines" / "mine"
    pipeline.mkdir(parents=True)
    config = tmp_path / "imagegate.toml"
    config.write_text("""
[catalog]
default_model = "my-model"

[models.sdxl]
price = { unit = 9999 }
source = "./pipelines/mine"

[models."sd-1.5"]  # ids with a dot need quotes in TOML
enabled = false

[models.my-model]
name = "Mine"
backend = "diffusers"
source = "pipelines/mine"
steps = { default = 8, min = 2, max = 12 }
guidance = { mode = "cfg", default = 3.0 }
negative_prompt = "cfg"
price = { unit = 500 }
""")
    catalog = build_catalog(load_settings(config))
    assert catalog.default_model == "my-model"
    assert catalog["sdxl"].price.unit == 9999 and catalog["sdxl"].steps.default == 30  # rest kept
    assert catalog["sdxl"].local_path() == pipeline.resolve()
    assert catalog["my-model"].local_path() == pipeline.resolve()
    assert "sd-1.5" not in catalog
    assert catalog["flux-schnell"].local_path() is None  # a hub repo id stays one


def test_invalid_entries_are_reported_by_id() -> None:
    with pytest.raises(CatalogError, match="broken"):
        build_catalog(load_settings(models={"broken": {"name": "x", "backend": "diffusers"}}))
    with pytest.raises(CatalogError, match="steps"):
        build_catalog(load_settings(models={"sdxl": {"steps": {"default": 60}}}))
    with pytest.raises(CatalogError, match="default model"):
        build_catalog(load_settings(catalog={"default_model": "nope"}))


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGATE_SERVER__PORT", "9123")
    monkeypatch.setenv("IMAGEGATE_CATALOG__DEFAULT_MODEL", "sdxl")
    settings = load_settings()
    assert settings.server.port == 9123
    assert build_catalog(settings).default_model == "sdxl"
