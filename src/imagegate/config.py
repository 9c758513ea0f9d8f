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


PRODUCTION_DEFAULT_MODEL = "flux-schnell"
EMBEDDED_DEFAULT_MODEL = "imagegate-tiny"


class CatalogSettings(_Section):
    # None: the embedded tiny model on the embedded dev chain, flux-schnell (the spec's default) otherwise.
    default_model: str | None = None
    # Extra TOML files with [models.<id>] tables, applied after the built-ins and this file.
    files: list[Path] = []


class FacilitatorSettings(_Section):
    """Who verifies and settles payments.

    builtin: this process, against ``rpc_url``, paying gas with the key from ``private_key_env`` /
    ``private_key_file`` (the x402 SDK's facilitator). http: any facilitator speaking the standard
    API (POST /verify, POST /settle, GET /supported) at ``url``.
    """

    kind: Literal["builtin", "http"] = "builtin"
    url: str | None = None
    # Extra headers sent to an http facilitator (e.g. auth); values may name env vars as "env:NAME".
    headers: dict[str, str] = {}
    timeout_s: float = 60.0
    rpc_url: str | None = None
    private_key_env: str = "IMAGEGATE_FACILITATOR_KEY"
    private_key_file: Path | None = None
    confirmation_timeout_s: float = 60.0


class PaymentOptionSettings(_Section):
    """One way to pay: a network, an asset on it and the address receiving the money."""

    network: Literal["base", "base-sepolia"] = "base-sepolia"
    pay_to: str | None = None
    # None: the network's canonical USDC.
    asset: str | None = None
    # EIP-712 domain of the asset; None: the canonical USDC's ("USD Coin" on base, "USDC" on base-sepolia).
    asset_name: str | None = None
    asset_version: str | None = None


class PaymentSettings(_Section):
    enabled: bool = True
    # devchain: run the embedded local chain (anvil, chain id 84532) with a test USDC; network: real chains.
    mode: Literal["devchain", "network"] = "devchain"
    options: list[PaymentOptionSettings] = [PaymentOptionSettings()]
    facilitator: FacilitatorSettings = FacilitatorSettings()
    # How long a signed authorization must stay valid: client delay + queue + generation + settlement.
    max_timeout_seconds: int = Field(default=300, ge=60, le=3600)
    # Chain RPC used to reconcile settlements whose outcome is unknown (builtin: rpc_url above).
    reconcile_rpc_url: str | None = None
    reconcile_interval_s: float = 15.0
    # A payment or generation untouched this long belongs to a request whose process died; reconcile it.
    # Keep it above queueing + generation + facilitator timeouts.
    stale_after_s: float = 900.0
    # A request carrying a payment that another request is using waits this long for its outcome.
    in_flight_wait_s: float = 300.0


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
    payments: PaymentSettings = PaymentSettings()
    # [models.<id>] tables: overrides of built-in entries or new models (see catalog.ModelSpec).
    models: dict[str, dict[str, Any]] = {}
    # [providers.<name>] tables: each hosted-provider backend validates its own options (keys come
    # from environment variables or files named there, never from this file).
    providers: dict[str, dict[str, Any]] = {}
    # Where the config file was read from; relative paths in it resolve against its folder.
    config_file: Path | None = None


def default_model_id(settings: Settings) -> str:
    if settings.catalog.default_model is not None:
        return settings.catalog.default_model
    embedded = settings.payments.mode == "devchain"
    return EMBEDDED_DEFAULT_MODEL if embedded else PRODUCTION_DEFAULT_MODEL


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
