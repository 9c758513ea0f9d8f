"""``imagegate generate``: price, pay, submit a job, follow its progress bar, download."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from imagegate.payments.client import payer_address, post_with_payment
from imagegate.types import USD_DECIMALS, Price

EXIT_OK, EXIT_FAILED, EXIT_OVER_CAP = 0, 1, 3
TERMINAL_EVENTS = frozenset({"succeeded", "failed", "cancelled", "expired"})
RECONNECTS = 5


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

        # 2. Pay and submit a job: the x402 client signs a USDC authorization for exactly that amount,
        # settled only once the images are stored.
        console.print(f"Payer: {payer_address(private_key)}")
        with console.status("Paying with x402..."):
            paid = await post_with_payment(f"{base_url}/v1/images/generate", body, private_key, max_atomic=amount,
                                           headers={"Prefer": "respond-async"})
        if paid.status not in (200, 202):
            console.print(f"[red]HTTP {paid.status} {paid.body.get('error')}[/red]: {paid.body.get('message')}")
            return EXIT_FAILED
        job = paid.body
        console.print(f"Job {job['id']} ({job['status']})")

        # 3. Follow its events (queue position, then each step) until it ends.
        await follow_job(http, base_url, job["id"], console)
        job = (await http.get(f"{base_url}/v1/jobs/{job['id']}")).json()
        if job["status"] != "succeeded":
            error = job.get("error") or {}
            console.print(f"[red]Job {job['status']}[/red]: {error.get('error')}: {error.get('message')} "
                          f"(payment {(job.get('payment') or {}).get('state')})")
            return EXIT_FAILED
        result = job["result"]

        # 4. Download and save.
        await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
        table = Table(title=f"{len(result['images'])} image(s) from {result['model']}")
        for column in ("file", "seed", "size", "url"):
            table.add_column(column)
        with console.status("Downloading..."):
            for image in result["images"]:
                response = await http.get(image["url"])
                response.raise_for_status()
                extension = image["url"].rsplit(".", 1)[-1]
                path = out / f"{image['uuid']}.{extension}"
                await asyncio.to_thread(path.write_bytes, response.content)
                table.add_row(str(path), str(image.get("seed")), f"{image.get('width')}×{image.get('height')}",
                              image["url"])
        console.print(table)
        cost = result["cost"]
        payment = job.get("payment") or {}
        console.print(
            f"Paid ${Price(amount).usd()} USDC — transaction {cost.get('transaction')} on {cost.get('network')}"
            f", payer {cost.get('payer')}, success={payment.get('state') == 'settled'}"
        )
    return EXIT_OK


async def follow_job(http: httpx.AsyncClient, base_url: str, job_id: str, console: Console) -> None:
    """A progress bar fed by the job's event stream: place in line, then denoising steps. A dropped
    connection is resumed from the last event seen (Last-Event-ID)."""
    last_id: str | None = None
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("Submitted", total=None)
        for attempt in range(RECONNECTS + 1):
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                async with aconnect_sse(http, "GET", f"{base_url}/v1/jobs/{job_id}/events", headers=headers,
                                        timeout=httpx.Timeout(10, read=None)) as source:
                    async for event in source.aiter_sse():
                        if not event.data:
                            continue  # the stream's opening "retry:" frame
                        last_id = event.id or last_id
                        data = json.loads(event.data)
                        _show(progress, task, event.event, data)
                        if event.event in TERMINAL_EVENTS:
                            return
            except (httpx.TransportError, SSEError) as exc:
                if attempt == RECONNECTS:
                    raise
                progress.console.print(f"[yellow]Event stream interrupted ({exc}); resuming...[/yellow]")
                await asyncio.sleep(1)


def _show(progress: Progress, task: TaskID, kind: str, data: dict[str, Any]) -> None:
    match kind:
        case "queued":
            position = data.get("queuePosition")
            where = "next in line" if position == 0 else f"{position} ahead"
            progress.update(task, description=f"Queued ({where})", total=None)
            progress.console.print(f"Queued: {where}")
        case "running":
            progress.update(task, description="Rendering")
            progress.console.print("Rendering")
        case "progress":
            total = data["totalSteps"]
            progress.update(task, description=f"Step {data['step']}/{total}", total=total, completed=data["step"])
        case "settling":
            progress.update(task, description="Storing and settling the payment")
            progress.console.print("Rendered; settling the payment")
        case _:
            progress.update(task, description=kind.capitalize())
            progress.console.print(f"Job {kind}")
