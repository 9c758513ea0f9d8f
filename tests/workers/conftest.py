"""Fixtures of the workers tests: tiny pipelines, and simulated-GPU catalog tables. The session's Ray
head on loopback (``ray_head``) comes from ``tests.support.ray``, shared with ``tests/shared_state``.
"""

from __future__ import annotations

from typing import Any

from imagegate.catalog import builtin_tables
from tests.backends.conftest import make_backend, tiny_dirs

__all__ = ["make_backend", "simulated_model", "tiny_dirs"]


def simulated_model(batch_ms: float, image_ms: float = 0.0, **fields: Any) -> dict[str, Any]:
    """A catalog table for a simulated-GPU model (the benchmark backend) with these timings."""
    table = {**builtin_tables()["bench-simulated"], "enabled": True, "options": {"batch_ms": batch_ms,
                                                                                  "image_ms": image_ms}}
    table.update(fields)
    return table

