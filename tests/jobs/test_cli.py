"""``imagegate generate`` pays with x402, submits a job and shows a progress bar fed by its events."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

from imagegate import devchain
from tests.jobs.conftest import PAYER, SLOW, JobsServer, amount_of, payment_for, submit


async def test_generate_shows_its_place_in_line_then_steps_and_saves_the_images(
        jobs_server: JobsServer, http: httpx.AsyncClient, chain: devchain.DevChain, tmp_path: Path) -> None:
    body = {"model": SLOW, "width": 128, "height": 128, "steps": 6}
    amount = await amount_of(http, body)
    # Someone else's long render holds the simulated GPU: the command's job waits in line first.
    ahead_body = {"prompt": "ahead in line", "model": SLOW, "width": 128, "height": 128, "numberResults": 4}
    ahead = (await submit(http, ahead_body, await payment_for(http, ahead_body))).json()
    before = await chain.balance_of(PAYER.address)
    out = tmp_path / "out"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagegate", "generate", "a plain square", "--url", jobs_server.base_url,
        "--model", SLOW, "--width", "128", "--height", "128", "--steps", "6", "--out", str(out),
        env={**os.environ, "IMAGEGATE_PAYER_KEY": PAYER.private_key, "COLUMNS": "120"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while not any(line.startswith("Queued:") for line in lines):
        assert time.monotonic() < deadline, lines
        line = await asyncio.wait_for(process.stdout.readline(), timeout=120)
        assert line, lines
        lines.append(line.decode())
    # The simulated GPU and ours share one line: free it, and the command's job runs.
    await http.post(f"/v1/jobs/{ahead['id']}/cancel", json={"cancelToken": ahead["cancelToken"]})
    rest, _ = await asyncio.wait_for(process.communicate(), timeout=180)
    output = "".join(lines) + rest.decode()
    assert process.returncode == 0, output
    assert "Queued: next in line" in output and "Rendering" in output, output
    assert "Succeeded" in output and "6/6" in output and "Job succeeded" in output, output
    images = sorted(out.glob("*.png"))
    assert len(images) == 1 and all(Image.open(path).size == (128, 128) for path in images)
    assert await chain.balance_of(PAYER.address) == before - amount
