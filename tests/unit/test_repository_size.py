"""The repository stays small: no tracked file over 25 MB, no training checkpoint at all."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_TRACKED_BYTES = 25 * 1000 * 1000
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".onnx")


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    return [REPO / name for name in listing.decode().split("\0") if name]


def test_no_tracked_file_exceeds_25_mb() -> None:
    too_big = {
        str(path.relative_to(REPO)): path.stat().st_size
        for path in _tracked_files()
        if path.is_file() and path.stat().st_size > MAX_TRACKED_BYTES
    }
    assert too_big == {}, f"tracked files over 25 MB: {too_big}"


def test_no_training_checkpoint_is_tracked() -> None:
    checkpoints = [str(p.relative_to(REPO)) for p in _tracked_files() if p.suffix in CHECKPOINT_SUFFIXES]
    assert checkpoints == [], f"training checkpoints belong in the ignored training-runs/: {checkpoints}"
    assert not any(p.relative_to(REPO).parts[0] == "training-runs" for p in _tracked_files())
