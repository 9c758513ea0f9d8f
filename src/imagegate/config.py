"""Settings, built once (``load_settings``) and injected; nothing here is read at import time.

Sources, lowest priority first: built-in defaults, the TOML config file, then environment
variables ``IMAGEGATE_<SECTION>__<FIELD>`` (e.g. ``IMAGEGATE_SERVER__PORT=9000``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from imagegate.types import OutputFormat

CONFIG_ENV_VAR = "IMAGEGATE_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = 8402
    # Where clients reach us (a CDN or reverse proxy in front); None: the request's own base URL.
    public_base_url: str | None = None
    max_body_bytes: int = 65_536
    cors_allow_origins: list[str] = ["*"]


class StorageSettings(_Section):
    backend: Literal["local"] = "local"
    directory: Path = Path("data/images")
    format: OutputFormat = OutputFormat.PNG
    quality: int = Field(default=92, ge=1, le=100, description="webp/jpeg quality")


class DiffusersSettings(_Section):
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # Models are evicted (least recently used first) to keep loaded weights under this budget.
    memory_budget_gb: float | None = None
    # CPU threads torch may use; pinning it makes seeds reproduce bit for bit.
    cpu_threads: int | None = None
    # Fetch missing weights from the Hugging Face hub on first use.
    allow_downloads: bool = True
    # Requests allowed to wait per model before new ones get 503 MODEL_BUSY.
    max_queue: int = 16


class CatalogSettings(_Section):
    default_model: str = "flux-schnell"
    # Extra TOML files with [models.<id>] tables, applied after the built-ins and this file.
    files: list[Path] = []


class LedgerSettings(_Section):
    # SQLAlchemy async URL; None: SQLite at <data_dir>/ledger.sqlite3. PostgreSQL: postgresql+asyncpg://...
    url: str | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEGATE_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Path("data")
    server: ServerSettings = ServerSettings()
    storage: StorageSettings = StorageSettings()
    diffusers: DiffusersSettings = DiffusersSettings()
    catalog: CatalogSettings = CatalogSettings()
    ledger: LedgerSettings = LedgerSettings()
    # [models.<id>] tables: overrides of built-in entries or new models (see catalog.ModelSpec).
    models: dict[str, dict[str, Any]] = {}
    # [providers.<name>] tables: each hosted-provider backend validates its own options (keys come
    # from environment variables or files named there, never from this file).
    providers: dict[str, dict[str, Any]] = {}
    # Where the config file was read from; relative paths in it resolve against its folder.
    config_file: Path | None = None


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read the config file (argument, else ``$IMAGEGATE_CONFIG``), then the environment."""
    if config_file is None and os.environ.get(CONFIG_ENV_VAR):
        config_file = Path(os.environ[CONFIG_ENV_VAR])
    data: dict[str, Any] = {}
    if config_file is not None:
        data = tomllib.loads(config_file.read_text(encoding="utf-8"))
        data["config_file"] = config_file.resolve()
    env_values = EnvSettingsSource(Settings)()
    data = _deep_merge(_deep_merge(data, env_values), overrides)
    return Settings(**data)
