"""The model catalog: built-in entries (``builtin_catalog.toml``) merged with the operator's tables."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from imagegate.config import EMBEDDED_DEFAULT_MODEL, PRODUCTION_DEFAULT_MODEL, Settings, default_model_id

GuidanceMode = Literal["cfg", "embedded", "true_cfg", "none"]
NegativePromptMode = Literal["cfg", "true_cfg", "none"]

SPEC_MIN_STEPS, SPEC_MAX_STEPS = 1, 50
SPEC_MIN_GUIDANCE, SPEC_MAX_GUIDANCE = 1.0, 30.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StepsSpec(_Strict):
    supported: bool = True
    default: int = Field(ge=1, le=SPEC_MAX_STEPS)
    min: int = Field(default=SPEC_MIN_STEPS, ge=SPEC_MIN_STEPS, le=SPEC_MAX_STEPS)
    max: int = Field(default=SPEC_MAX_STEPS, ge=SPEC_MIN_STEPS, le=SPEC_MAX_STEPS)

    @model_validator(mode="after")
    def _ordered(self) -> StepsSpec:
        if not self.min <= self.default <= self.max:
            raise ValueError(f"steps must satisfy min <= default <= max, got {self.min}/{self.default}/{self.max}")
        return self


class GuidanceSpec(_Strict):
    """How the request's ``guidance`` reaches the model.

    cfg: classic classifier-free guidance scale; embedded: FLUX-dev's distilled guidance input;
    true_cfg: a second, negative pass per step (FLUX schnell has no guidance input); none: ignored
    models reject it.
    """

    mode: GuidanceMode
    default: float | None = None
    # Used when a negative prompt arrives without guidance and the default would not apply it.
    default_with_negative_prompt: float | None = None


class PriceSpec(_Strict):
    # Atomic units (USDC: 1 = $0.000001) of one 1024x1024 image at the default step count.
    unit: int = Field(ge=0)
    # Floor per image, so tiny images still cover the request's fixed costs.
    minimum: int = Field(default=1, ge=0)


class ModelSpec(_Strict):
    id: str
    name: str
    description: str = ""
    backend: str
    # A Hugging Face repo id or a local pipeline directory (diffusers); the provider's model id (providers).
    source: str
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    requires_cuda: bool = False
    memory_gb: float | None = None
    max_concurrency: int = Field(default=1, ge=1)
    default_width: int = 1024
    default_height: int = 1024
    steps: StepsSpec
    guidance: GuidanceSpec
    negative_prompt: NegativePromptMode
    true_cfg_scale: float | None = None
    max_sequence_length: int | None = None
    price: PriceSpec
    enabled: bool = True
    # For benchmarks only (e.g. the simulated GPU): listed as such, and never the default model.
    benchmark_only: bool = False
    # Backend-specific options, validated by that backend's own Options model.
    options: dict[str, Any] = {}

    @property
    def supports_guidance(self) -> bool:
        return self.guidance.mode != "none"

    @property
    def supports_negative_prompt(self) -> bool:
        return self.negative_prompt != "none"

    def local_path(self) -> Path | None:
        """The source as a local directory (already resolved by ``build_catalog``), else None."""
        return Path(self.source) if Path(self.source).is_absolute() else None

    def parameter_notes(self) -> str:
        notes: list[str] = []
        if not self.steps.supported:
            notes.append("steps is fixed by the model; sending it is an INVALID_PARAMETER error")
        match self.guidance.mode:
            case "true_cfg":
                notes.append(
                    "guidance is applied as true classifier-free guidance (a second, negative pass per "
                    "step): the model has no guidance input"
                )
            case "embedded":
                notes.append("guidance is the model's distilled guidance input")
            case "cfg" if (self.guidance.default or 0) <= 1:
                notes.append("trained without guidance: off unless guidance (>1) or a negativePrompt is sent")
            case "none":
                notes.append("guidance is not supported; sending it is an INVALID_PARAMETER error")
        match self.negative_prompt:
            case "true_cfg":
                scale = self.true_cfg_scale or self.guidance.default_with_negative_prompt
                notes.append(f"negativePrompt runs true CFG (scale {scale} unless guidance says otherwise)")
            case "cfg":
                notes.append("negativePrompt is the unconditional branch of CFG (needs guidance > 1)")
            case "none":
                notes.append("negativePrompt is not supported; sending it is an INVALID_PARAMETER error")
        return "; ".join(notes)


class CatalogError(ValueError):
    pass


class Catalog(Mapping[str, ModelSpec]):
    """Model id -> spec, plus which id a request without ``model`` gets."""

    def __init__(self, models: Mapping[str, ModelSpec], default_model: str):
        self._models = {key: spec for key, spec in models.items() if spec.enabled}
        if default_model not in self._models:
            raise CatalogError(f"default model {default_model!r} is not an enabled catalog entry")
        if self._models[default_model].benchmark_only:
            raise CatalogError(f"{default_model!r} is a benchmark-only model and cannot be the default model")
        self.default_model = default_model

    def __getitem__(self, model_id: str) -> ModelSpec:
        return self._models[model_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)


def builtin_tables() -> dict[str, dict[str, Any]]:
    text = resources.files("imagegate").joinpath("builtin_catalog.toml").read_text(encoding="utf-8")
    models: dict[str, dict[str, Any]] = tomllib.loads(text)["models"]
    return models


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


BUILTIN_SOURCE_PREFIX = "builtin:"


def resolve_source(source: str, base_dir: Path) -> str:
    """Local sources become absolute paths; hub repo ids and provider model ids stay as they are.

    ``builtin:<name>`` names a pipeline shipped inside the package (``imagegate/models/<name>``);
    ``./x``, ``../x``, ``/x``, ``~/x`` and existing directories are local paths (relative to the
    config file's folder).
    """
    if source.startswith(BUILTIN_SOURCE_PREFIX):
        shipped = resources.files("imagegate").joinpath("models", source.removeprefix(BUILTIN_SOURCE_PREFIX))
        return str(Path(str(shipped)).resolve())
    path = Path(source).expanduser()
    if source.startswith((".", "/", "~")) or (base_dir / path).is_dir():
        return str((base_dir / path).resolve())
    return source


def build_catalog(settings: Settings) -> Catalog:
    tables = builtin_tables()
    overlays: list[Mapping[str, Any]] = []
    for file in settings.catalog.files:
        overlays.append(tomllib.loads(file.read_text(encoding="utf-8")).get("models", {}))
    overlays.append(settings.models)
    for overlay in overlays:
        for model_id, table in overlay.items():
            tables[model_id] = _merge(tables.get(model_id, {}), table)
    base_dir = settings.config_file.parent if settings.config_file else Path.cwd()
    specs: dict[str, ModelSpec] = {}
    for model_id, table in tables.items():
        if "source" in table:
            table = {**table, "source": resolve_source(str(table["source"]), base_dir)}
        try:
            specs[model_id] = ModelSpec(id=model_id, **table)
        except ValidationError as exc:
            raise CatalogError(f"catalog entry {model_id!r} is invalid: {exc}") from exc
    default = default_model_id(settings)
    if default == EMBEDDED_DEFAULT_MODEL and default not in specs:
        default = PRODUCTION_DEFAULT_MODEL  # the tiny model's weights are not shipped in this install
    return Catalog(specs, default)
