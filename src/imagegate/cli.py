"""The ``imagegate`` command: serve the API, inspect the catalog, price requests, pay for images."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from imagegate import pricing
from imagegate.backends import Backends
from imagegate.catalog import build_catalog
from imagegate.config import Settings, load_settings
from imagegate.errors import ImagegateError
from imagegate.types import Price
from imagegate.validation import parse_image_request

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


def _settings(config: Path | None, **overrides: Any) -> Settings:
    return load_settings(config, **overrides)


@cli.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind (default from config: 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (default from config: 8402).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve the HTTP API (POST /v1/images/generate, /v1/images/estimate, GET /v1/images/models, ...)."""
    import uvicorn

    from imagegate.app import app_from_settings
    from imagegate.payments import PaymentConfigError, validate_payment_settings

    server_overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = _settings(config, server=server_overrides) if server_overrides else _settings(config)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per outbound request (chain RPC, facilitator, providers) drowns the server's own log.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        validate_payment_settings(settings)
    except PaymentConfigError as error:
        err_console.print(f"[red]Refusing to start[/red]: {error}")
        raise typer.Exit(2) from error
    uvicorn.run(
        app_from_settings(settings),
        host=settings.server.host,
        port=settings.server.port,
        log_level=log_level,
        proxy_headers=True,
    )


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
    key_env: Annotated[str, typer.Option(help="Env var holding the gas key.")] = "IMAGEGATE_FACILITATOR_KEY",
    key_file: Annotated[Path | None, typer.Option(help="File holding the gas key (preferred).")] = None,
    token_env: Annotated[str | None, typer.Option(help="Env var holding a bearer token clients must send.")] = None,
    confirmation_timeout_s: Annotated[float, typer.Option(help="Receipt wait before 'settlement_pending'.")] = 60.0,
) -> None:
    """Serve the builtin facilitator over the standard x402 API (/verify, /settle, /supported)."""
    import uvicorn

    from imagegate.payments.facilitator_server import create_facilitator_app
    from imagegate.payments.facilitators import BuiltinFacilitator, read_private_key

    key = read_private_key(key_env, key_file)
    if key is None:
        err_console.print(f"[red]No gas key[/red]: pass --key-file or set ${key_env}.")
        raise typer.Exit(2)
    token = os.environ.get(token_env) if token_env else None
    app = create_facilitator_app(
        BuiltinFacilitator(key, rpc_url, network or ["eip155:84532"], confirmation_timeout_s=confirmation_timeout_s),
        bearer_token=token,
    )
    uvicorn.run(app, host=host, port=port, log_level="info")


@cli.command()
def revenue(config: ConfigOption = None) -> None:
    """Revenue, provider cost and margin per model, from the ledger."""
    from imagegate.ledger import SqlLedger

    settings = _settings(config)

    async def rows() -> list[Any]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        ledger = SqlLedger(settings.ledger.url or f"sqlite+aiosqlite:///{settings.data_dir / 'ledger.sqlite3'}")
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
