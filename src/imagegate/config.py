"""Settings, built once (``load_settings``) and injected; nothing here is read at import time.

Sources, lowest priority first: built-in defaults, the TOML config file, then environment
variables ``IMAGEGATE_<SECTION>__<FIELD>`` (e.g. ``IMAGEGATE_SERVER__PORT=9000``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
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
    # Graceful shutdown (SIGTERM): paid work in flight gets this long to finish and settle; what still
    # renders then is cancelled and its payment released. Keep an orchestrator's kill timeout above it
    # (plus ~20 s: cancelled work answering, connections closing).
    drain_timeout_s: float = Field(default=30.0, ge=0)


class S3StorageSettings(_Section):
    """Images in an S3-compatible bucket (AWS S3, R2, MinIO, ...): ``[storage] kind = "s3"``.

    Staged images live under ``<prefix>staging/`` (keep it private), published ones under
    ``<prefix>images/`` (what a CDN or a public-read bucket policy exposes).
    """

    bucket: str = ""
    prefix: str = ""
    # None: AWS itself; set it for any other S3-compatible service (e.g. http://minio:9000).
    endpoint_url: str | None = None
    region: str = "us-east-1"
    # Credentials follow the AWS chain: $AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY(/$AWS_SESSION_TOKEN),
    # then the shared credentials file (``credentials_file``, default ~/.aws/credentials) under ``profile``,
    # then the instance/container role. They never go in this file.
    profile: str | None = None
    credentials_file: Path | None = None
    # Where clients fetch published images: ``<public_base_url>/<uuid>.<ext>`` must serve
    # ``s3://<bucket>/<prefix>images/<uuid>.<ext>`` (a CDN in front of the bucket). None: the API serves them.
    public_base_url: str | None = None
    # "virtual" (bucket.host) or "path" (host/bucket); None: the client's default for the endpoint.
    addressing_style: Literal["virtual", "path"] | None = None
    max_pool_connections: int = Field(default=32, ge=1)


class StorageSettings(_Section):
    # "local": files under ``directory`` (the embedded default); "s3": the bucket of ``[storage.s3]``.
    kind: Literal["local", "s3"] = Field(default="local", validation_alias=AliasChoices("kind", "backend"))
    directory: Path = Path("data/images")
    format: OutputFormat = OutputFormat.PNG
    quality: int = Field(default=92, ge=1, le=100, description="webp/jpeg quality")
    s3: S3StorageSettings = S3StorageSettings()


class DiffusersSettings(_Section):
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # Models are evicted (least recently used first) to keep loaded weights under this budget.
    memory_budget_gb: float | None = None
    # CPU threads torch may use; pinning it makes seeds reproduce bit for bit.
    cpu_threads: int | None = None
    # Fetch missing weights from the Hugging Face hub on first use.
    allow_downloads: bool = True
    # Models whose weights would be downloaded are listed available only while the hub (HF_ENDPOINT)
    # answers: probed at startup, after a failed load, and every hub_probe_interval_s.
    hub_probe_timeout_s: float = Field(default=3.0, gt=0)
    hub_probe_interval_s: float = Field(default=300.0, gt=0)


class WorkersSettings(_Section):
    """Where generation runs: in this process (``local``, the embedded default) or on Ray Serve workers."""

    engine: Literal["local", "ray"] = "local"
    # Requests allowed to wait per model, beyond those rendering, before new ones get 503 MODEL_BUSY
    # (checked before payment, so a busy model costs the client nothing). Counted per API process.
    max_queue: int = Field(default=16, ge=0)
    # Longest a render may take (queueing included) before it is cancelled where it runs and the payment
    # is given back; it is also cut short to leave time to settle before the payment's authorization expires.
    render_timeout_s: float = Field(default=600.0, gt=0)

    # --- engine = "ray": GPU workers on Ray Serve (the imagegate[ray] extra; README "GPU workers") ---
    # The Ray cluster: its head's "host:port", or "auto" for the cluster this machine's Ray node belongs to
    # (the API process connects as a Ray driver, so its host must be a Ray node).
    address: str = "auto"
    # The Serve application that `imagegate workers deploy` creates and this API process calls.
    app_name: str = "imagegate"
    # Model-host replicas; None: one per GPU of the cluster (its GPUs / gpus_per_replica) at deploy time.
    replicas: int | None = Field(default=None, ge=1)
    # GPUs each replica reserves: 1 for one replica per GPU, fractions to share a GPU between small models'
    # replicas (without memory isolation), 0 for workers on CPUs.
    gpus_per_replica: float = Field(default=1.0, ge=0)
    cpus_per_replica: float = Field(default=1.0, ge=0)
    # Catalog models one replica serves at once; Serve routes a model's requests to replicas already holding
    # it and forgets the least recently used beyond this. Memory stays under [diffusers] memory_budget_gb on
    # each replica (the backend evicts its least recently used idle pipelines).
    models_per_replica: int = Field(default=3, ge=1)
    # Dynamic batching: compatible requests (same model, size, steps, guidance, negative prompt or not) from
    # any clients that reach a replica within batch_wait_s share one pipeline call of at most
    # batch_max_images images; each image keeps its own seed.
    batching: bool = True
    batch_max_images: int = Field(default=8, ge=4)
    batch_wait_s: float = Field(default=0.05, ge=0)
    # Requests one replica holds at once (rendering or waiting for their batch); more wait in the caller.
    # It is also where Serve starts sending a model's requests to replicas that do not hold it yet, so
    # keep it near what a replica renders: None means two batches (one running, one filling).
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    # Serve's autoscaling_config, passed through as is (min_replicas, max_replicas, target_ongoing_requests,
    # upscale_delay_s, ...); it replaces `replicas`.
    autoscaling: dict[str, Any] | None = None
    # Other Serve deployment options, passed through (health_check_period_s, max_replicas_per_node, ...).
    deployment_options: dict[str, Any] = {}
    # Tries of one job when its replica dies or runs out of GPU memory mid-job (same job id every time);
    # past them the client gets 503 and nothing is charged.
    max_attempts: int = Field(default=3, ge=1)
    # A job that no replica has accepted within this long gets 503; nothing is charged.
    accept_timeout_s: float = Field(default=30.0, gt=0)
    # How long the app's replica count, and each model's availability on the workers, are reused.
    status_ttl_s: float = Field(default=2.0, ge=0)
    model_check_ttl_s: float = Field(default=30.0, ge=0)


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
    # Most blocks one eth_getLogs request may span when looking for a settlement's transfer; public
    # Base RPC endpoints refuse longer ranges (lower it for stricter providers).
    reconcile_log_range: int = Field(default=1000, ge=1)
    # A payment untouched this long belongs to a request whose process died; reconcile it (release it,
    # or ask the chain). Live requests touch theirs every quarter of it, however long they queue, render
    # or settle, so it bounds how long a client whose server crashed waits before its resend works.
    stale_after_s: float = Field(default=120.0, gt=0)
    # A request carrying a payment that another request is using waits this long for its outcome.
    in_flight_wait_s: float = 300.0


class LedgerSettings(_Section):
    # SQLAlchemy async URL; None: SQLite at <data_dir>/ledger.sqlite3. PostgreSQL: postgresql+asyncpg://...
    url: str | None = None
    # Apply pending schema migrations at startup, under a lock (PostgreSQL advisory lock, a file lock
    # beside a SQLite file) so replicas starting together upgrade once. false: run `imagegate db upgrade`
    # yourself; a server then refuses to start on an out-of-date schema.
    upgrade_on_start: bool = True
    # Connection pool (PostgreSQL; SQLite keeps SQLAlchemy's defaults): connections kept open per process,
    # extra ones allowed under bursts, how long a request waits for one, and their maximum age (drops
    # connections before a proxy or firewall silently does).
    pool_size: int = Field(default=5, ge=1)
    max_overflow: int = Field(default=10, ge=0)
    pool_timeout_s: float = Field(default=30.0, gt=0)
    pool_recycle_s: float | None = Field(default=1800.0, gt=0)
    # Test each connection with a round trip before use: no request fails on a connection the server
    # dropped (failover, restart), at the cost of one round trip per ledger operation.
    pool_pre_ping: bool = False
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # PostgreSQL cancels a statement running longer than this, and a wait for a lock longer than that
    # (None: no limit). On SQLite the lock timeout is the busy timeout (waiting for the write lock).
    statement_timeout_s: float | None = Field(default=30.0, gt=0)
    lock_timeout_s: float | None = Field(default=30.0, gt=0)


class MetricsSettings(_Section):
    """``GET /metrics`` in Prometheus text format."""

    enabled: bool = True
    # A bearer token scrapers must send (``Authorization: Bearer <token>``), read from this env var or
    # file; neither set: /metrics is open (keep it off the public network then).
    token_env: str = "IMAGEGATE_METRICS_TOKEN"
    token_file: Path | None = None


class LoggingSettings(_Section):
    # text: readable lines for a terminal; json: one JSON object per line, for log shippers.
    format: Literal["text", "json"] = "text"
    # One line per HTTP request (request id, route, status, duration and what the flow learned:
    # model, generation id, payer, amount, transaction, step durations).
    access_log: bool = True


class RateLimit(_Section):
    """A token bucket per client: ``burst`` requests at once, refilled at ``rate`` per second."""

    rate: float = Field(gt=0)
    burst: int = Field(ge=1)


class LimitsSettings(_Section):
    """Per-client token buckets on the unpaid surface (429 RATE_LIMITED with Retry-After).

    Buckets live in each API process: with N processes behind a balancer a client gets up to N times
    these rates. Paid requests never spend from them; a request whose payment is refused spends from
    ``refused_payment`` instead, so a bogus payment header is no way around the limits.
    """

    enabled: bool = True
    # Peers whose X-Forwarded-For (and X-Forwarded-Proto) is believed: addresses or CIDR ranges.
    trusted_proxies: list[str] = ["127.0.0.1", "::1"]
    # Clients (after X-Forwarded-For) never limited: local tools, health checks, benchmarks.
    exempt_clients: list[str] = ["127.0.0.0/8", "::1"]
    # Route classes: the 402 challenge (a paid route without a payment header), estimates, the model
    # list, image downloads, job status/cancel/event streams, the manifest and OpenAPI document.
    challenge: RateLimit = RateLimit(rate=10, burst=50)
    estimate: RateLimit = RateLimit(rate=10, burst=50)
    models: RateLimit = RateLimit(rate=5, burst=20)
    images: RateLimit = RateLimit(rate=50, burst=200)
    # A client following a job polls its status or reconnects its event stream now and then.
    jobs: RateLimit = RateLimit(rate=10, burst=60)
    manifest: RateLimit = RateLimit(rate=5, burst=20)
    refused_payment: RateLimit = RateLimit(rate=2, burst=20)
    # Clients remembered at once per process (idle ones are forgotten first).
    max_clients: int = Field(default=100_000, ge=100)


# A job must end its render this long before its payment's authorization expires: the client's own delay
# between the 402 and its signature, storing the images and settling on chain.
JOB_VALIDITY_MARGIN_S = 60


class JobsSettings(_Section):
    """Asynchronous generation (``Prefer: respond-async``): jobs, their events, their recovery."""

    enabled: bool = True
    # Longest a job may queue and render before it is expired and its payment released. None: the
    # payment's validity ([payments] max_timeout_seconds) less JOB_VALIDITY_MARGIN_S. An explicit value
    # must fit in it: the 402 promises the payment stays valid that long.
    max_wait_s: float | None = Field(default=None, gt=0)
    # Upper bound of ``Prefer: wait=N``.
    max_prefer_wait_s: int = Field(default=60, ge=0, le=600)
    # A job's owner renews its claim this often; another process takes over one unrenewed for lease_s.
    lease_s: float = Field(default=60.0, gt=0)
    # How often a process looks for jobs to recover and for events written by other processes.
    poll_interval_s: float = Field(default=1.0, gt=0)
    # Heartbeat comment on event streams (proxies drop idle connections).
    sse_ping_s: float = Field(default=15.0, gt=0)
    # A request-id stream (synchronous requests) that has no events yet is kept open this long.
    request_stream_wait_s: float = Field(default=300.0, gt=0)
    # Step events of finished jobs and request-id streams are deleted after this long.
    events_retention_s: float = Field(default=86_400.0, gt=0)


class WebhooksSettings(_Section):
    """Standard Webhooks deliveries of job events to a ``webhookUrl`` given with the job."""

    # The operator's signing secret ("whsec_" + base64 of 24-64 bytes), read from this variable or file;
    # a job may bring its own ``webhookSecret`` instead.
    secret_env: str = "IMAGEGATE_WEBHOOK_SECRET"
    secret_file: Path | None = None
    # SSRF guard: targets resolving to private, loopback or link-local addresses are refused unless allowed.
    allow_private_targets: bool = False
    # Plain http targets are refused unless allowed.
    allow_http: bool = False
    timeout_s: float = Field(default=15.0, gt=0)
    # Seconds after the previous attempt, per the Standard Webhooks example schedule (the first attempt is
    # immediate); each wait gets +-``jitter`` of random spread.
    retry_schedule_s: list[float] = [5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400]
    jitter: float = Field(default=0.1, ge=0, le=0.5)
    # Deliveries in flight at once per process.
    concurrency: int = Field(default=8, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEGATE_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Path("data")
    server: ServerSettings = ServerSettings()
    storage: StorageSettings = StorageSettings()
    diffusers: DiffusersSettings = DiffusersSettings()
    workers: WorkersSettings = WorkersSettings()
    catalog: CatalogSettings = CatalogSettings()
    ledger: LedgerSettings = LedgerSettings()
    payments: PaymentSettings = PaymentSettings()
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()
    limits: LimitsSettings = LimitsSettings()
    jobs: JobsSettings = JobsSettings()
    webhooks: WebhooksSettings = WebhooksSettings()
    # [models.<id>] tables: overrides of built-in entries or new models (see catalog.ModelSpec).
    models: dict[str, dict[str, Any]] = {}
    # [providers.<name>] tables: each hosted-provider backend validates its own options (keys come
    # from environment variables or files named there, never from this file).
    providers: dict[str, dict[str, Any]] = {}
    # Where the config file was read from; relative paths in it resolve against its folder.
    config_file: Path | None = None

    @model_validator(mode="after")
    def _jobs_fit_in_payment_validity(self) -> Settings:
        longest = self.payments.max_timeout_seconds - JOB_VALIDITY_MARGIN_S
        if self.jobs.enabled and longest <= 0:
            raise ValueError(f"[payments] max_timeout_seconds must exceed {JOB_VALIDITY_MARGIN_S} s for jobs "
                             "(or set [jobs] enabled = false)")
        if self.jobs.max_wait_s is not None and self.jobs.max_wait_s > longest:
            raise ValueError(
                f"[jobs] max_wait_s = {self.jobs.max_wait_s:g} does not fit in the payment's validity: "
                f"[payments] max_timeout_seconds ({self.payments.max_timeout_seconds}) must be at least "
                f"max_wait_s + {JOB_VALIDITY_MARGIN_S} s, or lower max_wait_s"
            )
        return self

    def job_max_wait_s(self) -> float:
        """How long a job may queue and render (see ``JobsSettings.max_wait_s``)."""
        if self.jobs.max_wait_s is not None:
            return self.jobs.max_wait_s
        return float(self.payments.max_timeout_seconds - JOB_VALIDITY_MARGIN_S)


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
