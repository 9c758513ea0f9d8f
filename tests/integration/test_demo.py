"""The README's main command on the embedded defaults: dev chain, server, a paid generation, images on disk."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def test_demo_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "IMAGEGATE_ANVIL": str(REPO / "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"),
           "IMAGEGATE_DIFFUSERS__CPU_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "imagegate", "demo"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "LOCAL TEST CHAIN" in output
    assert re.search(r"Playground for people: http://127\.0\.0\.1:\d+/", output), output
    transaction = re.search(r"transaction (0x[0-9a-f]{64})", output)
    assert transaction, output
    images = sorted((tmp_path / "out").glob("*.png"))
    assert len(images) == 2
    assert all(Image.open(path).size == (512, 512) for path in images)
    # The dev chain's state survives the server: it was written to the data dir on shutdown.
    assert (tmp_path / "data" / "devchain" / "anvil-state.json").exists()
