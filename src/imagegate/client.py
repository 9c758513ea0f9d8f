"""``imagegate generate``: price, pay, generate and download, with progress on the terminal."""

from __future__ import annotations

import asyncio
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from imagegate.payments.client import payer_address, post_with_payment
from imagegate.types import USD_DECIMALS, Price

EXIT_OK, EXIT_FAILED, EXIT_OVER_CAP = 0, 1, 3


def usd_to_atomic(usd: str) -> int:
    """``"0.10"`` -> 100000; exact decimal arithmetic, never floats."""
    try:
        value = Decimal(usd)
    except InvalidOperation as exc:
        raise ValueError(f"{usd!r} is not a USD amount") from exc
    atomic = value * 10**USD_DECIMALS
    if value < 0 or atomic != atomic.to_integral_value():
        raise ValueError(f"{usd!r} is not a non-negative amount with at most {USD_DECIMALS} decimals")
    return int(atomic)


async def run_paid_generation(
    base_url: str, body: dict[str, Any], private_key: str, *, max_usd: str, out: Path, console: Console
) -> int:
    base_url = base_url.rstrip("/")
    cap = usd_to_atomic(max_usd)
    async with httpx.AsyncClient(timeout=60, trust_env=False) as http:
        # 1. The price first: exactly what the 402 will ask for.
        with console.status("Asking for the price..."):
            estimate_response = await http.post(f"{base_url}/v1/images/estimate", json=body)
        estimate = estimate_response.json()
        if estimate_response.status_code != 200:
            console.print(f"[red]{estimate.get('error')}[/red]: {estimate.get('message')}")
            return EXIT_FAILED
        cost = estimate["estimatedCost"]
        amount = int(cost["amount"])
        console.print(f"Price: [bold]${cost['usd']}[/bold] USDC ({amount} atomic units on {cost['network']}) for "
                      f"{estimate['number_of_images']} × {estimate['dimensions']} on {estimate['model']}, "
                      f"{estimate['steps']} steps")
        if amount > cap:
            console.print(f"[red]Refusing to pay[/red] ${cost['usd']}: above --max-usd {max_usd}.")
            return EXIT_OVER_CAP

        # 2. Pay and generate: the x402 client signs a USDC authorization for exactly that amount.
        console.print(f"Payer: {payer_address(private_key)}")
        with console.status("Paying with x402 and generating..."):
            paid = await post_with_payment(f"{base_url}/v1/images/generate", body, private_key, max_atomic=amount)
        if paid.status != 200:
            console.print(f"[red]HTTP {paid.status} {paid.body.get('error')}[/red]: {paid.body.get('message')}")
            return EXIT_FAILED

        # 3. Download and save.
        await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
        table = Table(title=f"{len(paid.body['images'])} image(s) from {paid.body['model']}")
        for column in ("file", "seed", "size", "url"):
            table.add_column(column)
        with console.status("Downloading..."):
            for image in paid.body["images"]:
                response = await http.get(image["url"])
                response.raise_for_status()
                extension = image["url"].rsplit(".", 1)[-1]
                path = out / f"{image['uuid']}.{extension}"
                await asyncio.to_thread(path.write_bytes, response.content)
                table.add_row(str(path), str(image.get("seed")), f"{image.get('width')}×{image.get('height')}",
                              image["url"])
        console.print(table)
        receipt = paid.payment_response or {}
        console.print(
            f"Paid ${Price(amount).usd()} USDC — transaction {receipt.get('transaction')} on {receipt.get('network')}"
            f", payer {receipt.get('payer')}, success={receipt.get('success')}"
        )
    return EXIT_OK
