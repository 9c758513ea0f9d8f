"""The ``imagegate`` command: serve the API, inspect the catalog, price requests, pay for images."""

from __future__ import annotations

import asyncio
import json
import logging
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
from imagegate.validation import parse_image_request

cli = typer.Typer(
    name="imagegate",
    help="Self-hostable, pay-per-request text-to-image API server (x402, USDC on Base).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
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

    server_overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = _settings(config, server=server_overrides) if server_overrides else _settings(config)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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


def main() -> None:
    cli()
