"""The ``imagegate`` command: serve the API, inspect the catalog, price requests, pay for images."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from imagegate import pricing
from imagegate.backends import Backends
from imagegate.catalog import build_catalog
from imagegate.config import Settings, load_settings
from imagegate.errors import ImagegateError
from imagegate.types import Price
from imagegate.validation import parse_image_request

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

cli = typer.Typer(
    name="imagegate",
    help="Self-hostable, pay-per-request text-to-image API server (x402, USDC on Base).",
    no_args_is_help=True,
    add_completion=False,
)
# Soft wrap: transaction hashes and URLs must stay copyable on one line.
console = Console(soft_wrap=True)
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (default: $IMAGEGATE_CONFIG, else built-in defaults)."),
]


# After the drain, how long uvicorn lets open connections finish (responses being written, idle
# keep-alives, image downloads) before it closes them.
AFTER_DRAIN_CLOSE_S = 5


def _settings(config: Path | None, **overrides: Any) -> Settings:
    return load_settings(config, **overrides)


@cli.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind (default from config: 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (default from config: 8402).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    workers: Annotated[int, typer.Option(min=1, help="Worker processes sharing the port (metrics add up "
                                                     "across them; needs [payments] mode = \"network\").")] = 1,
) -> None:
    """Serve the HTTP API (POST /v1/images/generate, /v1/images/estimate, GET /v1/images/models, ...)."""
    import uvicorn

    from imagegate import logs
    from imagegate.jobs.webhooks import operator_secret
    from imagegate.payments import PaymentConfigError, validate_payment_settings

    server_overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    try:
        settings = _settings(config, server=server_overrides) if server_overrides else _settings(config)
    except ValidationError as error:
        err_console.print(f"[red]Refusing to start[/red]: {error}")
        raise typer.Exit(2) from error
    try:
        validate_payment_settings(settings)
    except PaymentConfigError as error:
        err_console.print(f"[red]Refusing to start[/red]: {error}")
        raise typer.Exit(2) from error
    try:
        operator_secret(settings.webhooks)
    except (ImagegateError, OSError) as error:
        err_console.print(f"[red]Refusing to start[/red]: the webhook signing secret: {error}")
        raise typer.Exit(2) from error
    logs.configure(settings.logging.format, log_level)
    # Client addresses come from X-Forwarded-For only when the peer is one of [limits] trusted_proxies:
    # the app does it (uvicorn's own handling would trust 127.0.0.1 whatever the config says).
    server_options: dict[str, Any] = {"host": settings.server.host, "port": settings.server.port,
                                      "log_level": log_level, "log_config": None, "access_log": False,
                                      "proxy_headers": False}
    if workers == 1:
        from imagegate.app import app_from_settings  # the whole server (torch included): once the checks pass

        app = app_from_settings(settings)
        # uvicorn.Server rather than uvicorn.run: the first SIGTERM/SIGINT drains the app (paid work
        # finishes and settles) before uvicorn's own shutdown closes the listening socket.
        server = _draining_server(uvicorn.Config(app, **server_options,
                                                 timeout_graceful_shutdown=AFTER_DRAIN_CLOSE_S), app)
        server.run()
        return
    if settings.payments.enabled and settings.payments.mode == "devchain":
        err_console.print("[red]Refusing to start[/red]: --workers needs \\[payments] mode = \"network\" (each worker "
                          "would start its own embedded dev chain) or payments disabled.")
        raise typer.Exit(2)
    if settings.ledger.url is None or settings.ledger.url.startswith("sqlite"):
        err_console.print("[red]Refusing to start[/red]: --workers needs the ledger on PostgreSQL (\\[ledger] url = "
                          "\"postgresql+asyncpg://...\"): an SQLite ledger serves one process.")
        raise typer.Exit(2)
    _serve_workers(config, server_overrides, log_level, workers, server_options)


def _serve_workers(config: Path | None, server_overrides: dict[str, Any], log_level: str, workers: int,
                   server_options: dict[str, Any]) -> None:
    """uvicorn's worker processes, each building the app from the same settings (passed in the environment),
    with prometheus-client's multiprocess mode so that /metrics in any worker counts them all."""
    import tempfile

    import uvicorn

    from imagegate.app import LOG_LEVEL_ENV
    from imagegate.config import CONFIG_ENV_VAR

    if config is not None:
        os.environ[CONFIG_ENV_VAR] = str(config.resolve())
    for name, value in server_overrides.items():
        os.environ[f"IMAGEGATE_SERVER__{name.upper()}"] = str(value)
    os.environ[LOG_LEVEL_ENV] = log_level
    with tempfile.TemporaryDirectory(prefix="imagegate-metrics-") as own_directory:
        directory = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", own_directory)
        from imagegate import metrics  # after the variable: prometheus-client reads it at import

        metrics.reset_multiprocess_dir(directory)
        uvicorn.run("imagegate.app:app_from_environment", factory=True, workers=workers, **server_options)


def _draining_server(config: uvicorn.Config, app: FastAPI) -> uvicorn.Server:
    """A ``uvicorn.Server`` whose first SIGTERM/SIGINT drains ``app`` before uvicorn shuts down.

    uvicorn's own handler stops accepting connections at once, so a client would see a refused
    connection instead of 503 SERVER_DRAINING with Retry-After, and a paid render would be cut after
    ``timeout_graceful_shutdown``. Here the first signal runs the app's ``Drain`` (``app.state.drain``,
    set at startup) while the socket keeps answering, then hands over to uvicorn's shutdown; a second
    signal is uvicorn's as before (exit now; SIGINT twice forces it).
    """
    import signal

    import uvicorn

    from imagegate.drain import Drain

    class DrainingServer(uvicorn.Server):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(config)
            self._loop: asyncio.AbstractEventLoop | None = None
            self._drain_requested = False
            self._drain_task: asyncio.Task[None] | None = None

        async def startup(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            drain: Drain | None = getattr(app.state, "drain", None)
            if (self._drain_requested or self._loop is None or drain is None or not self.started
                    or sig not in (signal.SIGTERM, signal.SIGINT)):
                super().handle_exit(sig, frame)
                return
            self._drain_requested = True
            self._captured_signals.append(sig)  # re-raised once shut down, as uvicorn does
            # A signal handler runs between two bytecodes of the loop's thread: hand over through the
            # loop's thread-safe entry rather than touch the loop from here.
            self._loop.call_soon_threadsafe(self._begin_drain, drain)

        def _begin_drain(self, drain: Drain) -> None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit(drain))

        async def _drain_then_exit(self, drain: Drain) -> None:
            try:
                await drain.run()
            finally:
                self.should_exit = True

    server: uvicorn.Server = DrainingServer()
    return server


@cli.command()
def models(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the catalog: parameters, prices and whether each model can run here now."""
    settings = _settings(config)
    catalog = build_catalog(settings)

    async def gather() -> list[dict[str, Any]]:
        backends = Backends(settings)
        rows = []
        try:
            for spec in catalog.values():
                if backends.known(spec.backend):
                    availability = await backends.get(spec.backend).availability(spec)
                    available, reason = availability.available, availability.reason
                else:
                    available, reason = False, f"backend {spec.backend!r} is not installed"
                price = pricing.quote(spec, 1024, 1024, 1, spec.steps.default)
                rows.append({"id": spec.id, "default": spec.id == catalog.default_model, "backend": spec.backend,
                             "steps": f"{spec.steps.default} ({spec.steps.min}-{spec.steps.max})",
                             "guidance": spec.guidance.mode, "negativePrompt": spec.negative_prompt,
                             "usdPer1024Image": price.usd(), "available": available, "reason": reason})
        finally:
            await backends.aclose()
        return rows

    rows = asyncio.run(gather())
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title="imagegate models")
    for column in ("id", "backend", "steps", "guidance", "negativePrompt", "$ per 1024²", "available"):
        table.add_column(column)
    for row in rows:
        status = "yes" if row["available"] else f"no: {row['reason']}"
        table.add_row(row["id"] + (" (default)" if row["default"] else ""), row["backend"], row["steps"],
                      row["guidance"], row["negativePrompt"], row["usdPer1024Image"], status)
    console.print(table)


@cli.command()
def estimate(
    config: ConfigOption = None,
    model: Annotated[str | None, typer.Option(help="Model id (default: the catalog's default).")] = None,
    width: Annotated[int | None, typer.Option(help="128-2048, divisible by 64.")] = None,
    height: Annotated[int | None, typer.Option(help="128-2048, divisible by 64.")] = None,
    number_results: Annotated[int | None, typer.Option("--number-results", "-n", help="1-4 images.")] = None,
    steps: Annotated[int | None, typer.Option(help="Inference steps (model-dependent).")] = None,
) -> None:
    """Price a request exactly as POST /v1/images/estimate and the 402 challenge would."""
    settings = _settings(config)
    catalog = build_catalog(settings)
    body = {k: v for k, v in {"model": model, "width": width, "height": height,
                              "numberResults": number_results, "steps": steps}.items() if v is not None}
    try:
        request = parse_image_request(body, catalog, require_prompt=False)
    except ImagegateError as error:
        err_console.print(f"[red]{error.code}[/red]: {error.message}")
        raise typer.Exit(2) from error
    price = pricing.quote(catalog[request.model], request.width, request.height, request.number_results, request.steps)
    console.print_json(json.dumps({
        "model": request.model,
        "dimensions": f"{request.width}×{request.height}",
        "number_of_images": request.number_results,
        "steps": request.steps,
        "estimatedCost": {"usd": price.usd(), "amount": str(price.amount)},
    }, ensure_ascii=False))


PAYER_KEY_ENV = "IMAGEGATE_PAYER_KEY"


def _payer_key(key_file: Path | None) -> str:
    if key_file is not None:
        return key_file.read_text(encoding="utf-8").strip()
    key = os.environ.get(PAYER_KEY_ENV)
    if not key:
        err_console.print(f"[red]No payer key[/red]: pass --key-file or set ${PAYER_KEY_ENV}.")
        raise typer.Exit(2)
    return key


@cli.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw (2-3000 characters).")],
    url: Annotated[str, typer.Option(help="Base URL of an imagegate server.")] = "http://127.0.0.1:8402",
    model: Annotated[str | None, typer.Option(help="Model id (default: the server's default).")] = None,
    width: Annotated[int | None, typer.Option(help="128-2048, divisible by 64.")] = None,
    height: Annotated[int | None, typer.Option(help="128-2048, divisible by 64.")] = None,
    number_results: Annotated[int | None, typer.Option("--number-results", "-n", help="1-4 images.")] = None,
    steps: Annotated[int | None, typer.Option(help="Inference steps (model-dependent).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale, 1-30.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the first image (image i uses seed + i).")] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="What to keep out of the image.")] = None,
    key_file: Annotated[Path | None, typer.Option(help=f"Payer's private key file (else ${PAYER_KEY_ENV}).")] = None,
    max_usd: Annotated[str, typer.Option(help="Refuse to pay more than this many USD.")] = "0.10",
    out: Annotated[Path, typer.Option(help="Folder to save the images in.")] = Path("out"),
) -> None:
    """Pay for a generation with x402 (USDC) and save the images: shows the price first, then pays."""
    from imagegate.client import run_paid_generation

    body = {k: v for k, v in {"prompt": prompt, "model": model, "width": width, "height": height,
                              "numberResults": number_results, "steps": steps, "guidance": guidance,
                              "seed": seed, "negativePrompt": negative_prompt}.items() if v is not None}
    code = asyncio.run(run_paid_generation(url, body, _payer_key(key_file), max_usd=max_usd, out=out,
                                           console=console))
    raise typer.Exit(code)


@cli.command()
def facilitator(
    rpc_url: Annotated[str, typer.Option(help="JSON-RPC endpoint of the chain to settle on.")],
    network: Annotated[list[str] | None, typer.Option(help="CAIP-2 network(s) to settle [eip155:84532].")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8403,
    key_env: Annotated[str, typer.Option(help="Env var holding the gas key(s), comma-separated.")] = (
        "IMAGEGATE_FACILITATOR_KEY"),
    key_file: Annotated[Path | None, typer.Option(help="File holding the gas key(s), one a line (preferred).")] = None,
    token_env: Annotated[str | None, typer.Option(help="Env var holding a bearer token clients must send.")] = None,
    confirmation_timeout_s: Annotated[float, typer.Option(help="Receipt wait before 'settlement_pending'.")] = 60.0,
) -> None:
    """Serve the builtin facilitator over the standard x402 API (/verify, /settle, /supported)."""
    import uvicorn

    from imagegate.payments.facilitator_server import create_facilitator_app
    from imagegate.payments.facilitators import BuiltinFacilitator, read_private_keys

    keys = read_private_keys(key_env, key_file)
    if not keys:
        err_console.print(f"[red]No gas key[/red]: pass --key-file or set ${key_env}.")
        raise typer.Exit(2)
    token = os.environ.get(token_env) if token_env else None
    app = create_facilitator_app(
        BuiltinFacilitator(keys, rpc_url, network or ["eip155:84532"], confirmation_timeout_s=confirmation_timeout_s),
        bearer_token=token,
    )
    uvicorn.run(app, host=host, port=port, log_level="info")


@cli.command()
def revenue(config: ConfigOption = None) -> None:
    """Revenue, provider cost and margin per model, from the ledger."""
    from imagegate.ledger import SqlLedger

    settings = _settings(config)

    async def rows() -> list[Any]:
        ledger = SqlLedger.from_settings(settings.ledger, settings.data_dir)
        await ledger.start()
        try:
            return await ledger.revenue_by_model()
        finally:
            await ledger.aclose()

    table = Table(title="imagegate revenue (USD)")
    for column in ("model", "generations", "revenue", "provider cost", "margin", "uncosted"):
        table.add_column(column, justify="right" if column != "model" else "left")
    totals = [0, 0, 0]
    for row in asyncio.run(rows()):
        table.add_row(row.model, str(row.generations), Price(row.revenue_micros).usd(),
                      Price(row.provider_cost_micros).usd(), _signed_usd(row.margin_micros),
                      str(row.uncosted_generations))
        totals = [totals[0] + row.revenue_micros, totals[1] + row.provider_cost_micros, totals[2] + row.margin_micros]
    table.add_row("total", "", Price(totals[0]).usd(), Price(totals[1]).usd(), _signed_usd(totals[2]), "")
    console.print(table)


db_cli = typer.Typer(help="The ledger's database: schema migrations (Alembic).", no_args_is_help=True)
cli.add_typer(db_cli, name="db")


@db_cli.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Bring the ledger's schema to this version's newest revision; a ledger made before migrations is
    adopted in place. Safe to run from several machines at once (one upgrades, the others wait)."""
    from imagegate import migrations
    from imagegate.ledger import SqlLedger

    settings = _settings(config)

    async def run() -> tuple[str, migrations.UpgradeReport]:
        ledger = SqlLedger.from_settings(settings.ledger, settings.data_dir)
        try:
            return ledger.engine.url.render_as_string(hide_password=True), await migrations.upgrade(ledger.engine)
        finally:
            await ledger.aclose()

    try:
        url, report = asyncio.run(run())
    except migrations.SchemaError as error:
        err_console.print(f"[red]Cannot upgrade[/red]: {error}")
        raise typer.Exit(1) from error
    if report.adopted:
        console.print(f"adopted a ledger made before migrations: stamped at revision {migrations.BASELINE}")
    if report.before != report.after or report.adopted:
        console.print(f"upgraded {url} from {report.before or 'nothing'} to {report.after}")
    else:
        console.print(f"{url} is already at {report.after} (newest)")


@db_cli.command("current")
def db_current(config: ConfigOption = None) -> None:
    """The ledger's schema revision, and whether it is this version's newest."""
    from imagegate import migrations
    from imagegate.ledger import SqlLedger

    settings = _settings(config)

    async def run() -> tuple[str, str | None]:
        ledger = SqlLedger.from_settings(settings.ledger, settings.data_dir)
        try:
            return ledger.engine.url.render_as_string(hide_password=True), await migrations.current_revision(
                ledger.engine)
        finally:
            await ledger.aclose()

    url, current = asyncio.run(run())
    head = migrations.head_revision()
    state = "newest" if current == head else f"newest is {head}: run `imagegate db upgrade`"
    console.print(f"{url}: revision {current or 'none'} ({state})")


@db_cli.command("revision")
def db_revision(
    message: Annotated[str, typer.Option("--message", "-m", help="What the migration does, e.g. 'add jobs'.")],
) -> None:
    """(Developers, in a source checkout) Write the next migration: the difference between the schema the
    existing revisions build and ``imagegate.ledger.metadata``, as Alembic autogenerates it. Review it."""
    from imagegate import migrations

    console.print(f"wrote {migrations.new_revision(message)}")


def _signed_usd(micros: int) -> str:
    return ("-" if micros < 0 else "") + Price(abs(micros)).usd()


@cli.command()
def demo(
    prompt: Annotated[str, typer.Argument(help="What to draw.")] = "a large orange triangle on a blue background",
    out: Annotated[Path, typer.Option(help="Folder to save the images in.")] = Path("out"),
) -> None:
    """End to end on the embedded defaults: dev chain, server, a paid generation by a real x402 client."""
    from imagegate.demo import run_demo

    raise typer.Exit(asyncio.run(run_demo(prompt, out, console)))


def main() -> None:
    cli()


# --- imagegate workers: GPU workers on Ray Serve ([workers] engine = "ray") ----------------------

workers_cli = typer.Typer(
    help="GPU workers on Ray Serve: start a local Ray head, deploy the model hosts, show them, remove them.",
    no_args_is_help=True,
)
cli.add_typer(workers_cli, name="workers")

AddressOption = Annotated[
    str | None, typer.Option(help="Ray cluster (head host:port, or 'auto'); default: [workers] address.")
]
# Ports of a head started by `imagegate workers head`, as offsets from its --port (firewall rules
# and parallel test clusters need them fixed; Ray would otherwise pick some at random).
HEAD_PORT_OFFSETS = {
    "--ray-client-server-port": 1,
    "--node-manager-port": 2,
    "--object-manager-port": 3,
    "--dashboard-agent-listen-port": 4,
    "--dashboard-agent-grpc-port": 5,
    "--runtime-env-agent-port": 6,
    "--metrics-export-port": 7,
    "--dashboard-port": 8,
}
HEAD_WORKER_PORTS_OFFSET = 10


def _workers_settings(config: Path | None, address: str | None) -> Settings:
    return _settings(config, workers={"address": address}) if address else _settings(config)


def _ray_operations() -> Any:
    import importlib.util

    # Looked up, not imported: a loopback cluster needs its setting in place before Ray's import.
    if importlib.util.find_spec("ray") is None:
        err_console.print("[red]Ray is not installed[/red]: pip install 'imagegate[ray]'.")
        raise typer.Exit(2)
    from imagegate.workers import ray as ray_workers

    return ray_workers


@workers_cli.command("head")
def workers_head(
    host: Annotated[str, typer.Option(help="Address of this node; 127.0.0.1 keeps the whole cluster on "
                                           "this machine (no other node can join).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Head port; Ray's other ports follow it (port+1 ... port+8, workers "
                                           "from port+10).")] = 6379,
    num_gpus: Annotated[int | None, typer.Option(help="GPUs to offer (default: those Ray detects).")] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs to offer (default: those Ray detects).")] = None,
    worker_ports: Annotated[int, typer.Option(help="Ports for Ray's worker processes.")] = 100,
    temp_dir: Annotated[Path | None, typer.Option(help="Ray's session files (default: /tmp/ray).")] = None,
) -> None:
    """Start a Ray head on this machine and keep it running until interrupted (Ctrl-C, SIGTERM).

    Other machines join with `ray start --address=HOST:PORT --num-gpus=N`; then deploy with
    `imagegate workers deploy --address HOST:PORT`.
    """
    import shutil
    import signal
    import subprocess
    import sys

    import psutil  # type: ignore[import-untyped]

    ray_workers = _ray_operations()
    ray_bin = Path(sys.executable).with_name("ray")
    command = [str(ray_bin if ray_bin.exists() else shutil.which("ray") or "ray"), "start", "--head", "--block",
               f"--node-ip-address={host}", f"--port={port}", "--include-dashboard=false", "--disable-usage-stats",
               f"--min-worker-port={port + HEAD_WORKER_PORTS_OFFSET}",
               f"--max-worker-port={port + HEAD_WORKER_PORTS_OFFSET + worker_ports - 1}",
               *(f"{option}={port + offset}" for option, offset in HEAD_PORT_OFFSETS.items())]
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    if temp_dir is not None:
        command.append(f"--temp-dir={temp_dir.resolve()}")
    environment = dict(os.environ)
    if ray_workers._is_loopback(host):
        environment[ray_workers.RAY_LOOPBACK_ENV] = "0"
    head = subprocess.Popen(command, env=environment)
    stopping: list[int] = []
    # `ray start --block` stops its processes on SIGTERM, draining for up to 30 s; whatever is left
    # after that (a stuck raylet, dashboard helpers) is ended here, by the PIDs it started.
    started: list[Any] = []

    def remember_descendants() -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            started.extend(psutil.Process(head.pid).children(recursive=True))

    def stop(signum: int, frame: object) -> None:
        stopping.append(signum)
        remember_descendants()
        if head.poll() is None:
            head.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    console.print(f"Ray head starting at [bold]{host}:{port}[/bold]; set [workers] address = \"{host}:{port}\", "
                  "then run `imagegate workers deploy`.")
    try:
        code = head.wait()
    finally:
        if head.poll() is None:
            remember_descendants()
            head.terminate()
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                head.kill()
        for process in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    raise typer.Exit(0 if stopping else code)


@workers_cli.command("deploy")
def workers_deploy(
    config: ConfigOption = None,
    address: AddressOption = None,
    timeout_s: Annotated[float, typer.Option(help="How long to wait for the replicas to run.")] = 900.0,
) -> None:
    """Deploy (or update) the model hosts on a running Ray cluster, from the same config as the API."""
    ray_workers = _ray_operations()
    settings = _workers_settings(config, address)

    def show(status: Any) -> None:
        console.print(f"{settings.workers.app_name}: {status.status}, replicas {status.replicas or '-'} "
                      f"{status.message}".rstrip())

    try:
        status = ray_workers.deploy(settings, timeout_s=timeout_s, on_status=show)
    except (RuntimeError, ValueError, ConnectionError) as error:
        err_console.print(f"[red]Deploy failed[/red]: {error}")
        raise typer.Exit(1) from error
    console.print(f"[green]{settings.workers.app_name} is {status.status}[/green] with {status.running_replicas} "
                  f"replicas on {settings.workers.address}.")


@workers_cli.command("status")
def workers_status(
    config: ConfigOption = None,
    address: AddressOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """The worker app and each replica: models held, jobs, recent batch sizes."""
    import dataclasses

    ray_workers = _ray_operations()
    settings = _workers_settings(config, address)
    try:
        ray_workers.connect(settings.workers.address)
    except (RuntimeError, ValueError, ConnectionError) as error:
        err_console.print(f"[red]Cannot reach the Ray cluster at {settings.workers.address}[/red]: {error}")
        raise typer.Exit(1) from error
    status = ray_workers.read_app_status(settings.workers.app_name)
    replicas: list[Any] = []
    if status.running_replicas:
        handle = ray_workers.app_handle(settings.workers.app_name)
        replicas = asyncio.run(ray_workers.replica_stats(handle, status.running_replicas))
    if as_json:
        console.print_json(json.dumps({"app": settings.workers.app_name, **dataclasses.asdict(status),
                                       "replicaStats": [dataclasses.asdict(stats) for stats in replicas]}))
        return
    console.print(f"{settings.workers.app_name} on {settings.workers.address}: {status.status}, "
                  f"replicas {status.replicas or '-'} {status.message}".rstrip())
    if replicas:
        table = Table(title="replicas")
        for column in ("replica", "pid", "models", "active jobs", "recent batches", "finished", "cancelled"):
            table.add_column(column)
        for stats in sorted(replicas, key=lambda stats: stats.replica):
            models = ", ".join(f"{model} ({size / 1024**2:.0f} MB)" for model, size in stats.loaded_models.items())
            table.add_row(stats.replica, str(stats.pid), models or ", ".join(stats.multiplexed_models) or "-",
                          str(len(stats.active)), " ".join(map(str, stats.recent_batches[-12:])) or "-",
                          str(stats.jobs_finished), str(stats.jobs_cancelled))
        console.print(table)


@workers_cli.command("delete")
def workers_delete(config: ConfigOption = None, address: AddressOption = None) -> None:
    """Remove the worker app from the cluster (its replicas stop; the cluster keeps running)."""
    ray_workers = _ray_operations()
    settings = _workers_settings(config, address)
    try:
        ray_workers.delete(settings)
    except (RuntimeError, ValueError, ConnectionError) as error:
        err_console.print(f"[red]Delete failed[/red]: {error}")
        raise typer.Exit(1) from error
    console.print(f"Deleted {settings.workers.app_name} from {settings.workers.address}.")
