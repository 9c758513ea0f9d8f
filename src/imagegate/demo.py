"""``imagegate demo``: the whole product on the embedded defaults, end to end, on one machine.

Starts ``imagegate serve`` (which starts the dev chain), pays for one generation with the dev
payer's key through the x402 SDK's client, saves the images, prints the receipt, stops the server.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.markup import escape

from imagegate import devchain
from imagegate.catalog import build_catalog
from imagegate.client import EXIT_FAILED, run_paid_generation
from imagegate.config import load_settings

STARTUP_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def run_demo(prompt: str, out: Path, console: Console) -> int:
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = Path("data") / "demo-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    console.rule("imagegate demo")
    config_args = await _fallback_config(console)
    console.print(f"Starting [bold]imagegate serve[/bold] on {base_url} (log: {log_path})")
    with log_path.open("ab") as log_file:
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imagegate", "serve", "--port", str(port), *config_args,
            stdout=log_file, stderr=log_file,
        )
        try:
            if not await _wait_healthy(base_url, server):
                console.print(f"[red]The server did not start[/red]; see {log_path}")
                return EXIT_FAILED
            async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
                manifest = (await http.get(f"{base_url}/")).json()
                models = (await http.get(f"{base_url}/v1/images/models")).json()
            notice = manifest["payments"].get("notice")
            if notice:
                console.print(f"[bold yellow]{escape(notice)}[/bold yellow]")
            default = next(m for m in models["models"] if m["id"] == models["defaultModel"])
            console.print(f"Default model: [bold]{default['id']}[/bold] ({default['name']}), "
                          f"available: {default['available']}")
            console.print(f"Playground for people: {base_url}/ in a browser while the demo runs; afterwards run "
                          "[bold].venv/bin/imagegate serve[/bold] and open http://127.0.0.1:8402/")
            console.print(f"Prompt: [italic]{prompt}[/italic]")
            return await run_paid_generation(
                base_url, {"prompt": prompt, "width": 512, "height": 512, "numberResults": 2, "seed": 7},
                devchain.PAYER_ACCOUNT.private_key, max_usd="0.10", out=out, console=console,
            )
        finally:
            if server.returncode is None:
                server.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(server.wait(), timeout=30)
                except TimeoutError:
                    server.kill()
                    await server.wait()
            console.print("Server stopped.")


async def _fallback_config(console: Console) -> list[str]:
    """Serve arguments: none when the embedded default model is installed (the normal case).

    Without its weights (a checkout where they were not committed yet), a tiny random-weight FLUX
    pipeline is built on the fly so the payment flow still runs end to end; its images are noise.
    """
    catalog = build_catalog(load_settings())
    spec = catalog[catalog.default_model]
    local = spec.local_path()
    if local is not None and (local / "model_index.json").is_file():
        return []
    from imagegate.tiny_pipelines import build_tiny_flux

    console.print(f"[yellow]The default model {spec.id!r} is not installed here; building a tiny random-weight "
                  "FLUX pipeline instead (its images are noise).[/yellow]")
    directory = Path("data") / "demo-tiny-flux"
    if not (directory / "model_index.json").is_file():
        await asyncio.to_thread(build_tiny_flux, directory)
    config = Path("data") / "demo.toml"
    config.write_text(
        '[catalog]\ndefault_model = "flux-schnell"\n\n[models.flux-schnell]\n'
        f'source = "{directory.resolve()}"\nrequires_cuda = false\ndtype = "float32"\nmemory_gb = 0.05\n'
    )
    return ["--config", str(config.resolve())]


async def _wait_healthy(base_url: str, server: asyncio.subprocess.Process) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    async with httpx.AsyncClient(timeout=2, trust_env=False) as http:
        while time.monotonic() < deadline:
            if server.returncode is not None:
                return False
            try:
                if (await http.get(f"{base_url}/healthz")).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.25)
    return False
