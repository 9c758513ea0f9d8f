"""Test-only fault injection: a crash at a precise moment of the request flow.

``IMAGEGATE_TEST_FAULTS="point=N[,point=N...]"`` makes this process SIGKILL itself the Nth time it
reaches ``point``: a crash the soak test can aim at moments that outside timing would only hit by
luck. It is read from the environment only (never from a config file) and, unset, costs one check.

Points:
- ``payment_reserved``: a payment is reserved and verified; no work is done yet;
- ``render_step``: a denoising step is done (mid-generation);
- ``settled``: the money moved; the images are neither published nor sent.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from functools import cache

from imagegate.workers.base import ProgressSink, RenderProgress

FAULTS_ENV = "IMAGEGATE_TEST_FAULTS"
POINTS = frozenset({"payment_reserved", "render_step", "settled"})

_reached: Counter[str] = Counter()


@cache
def _armed() -> dict[str, int]:
    spec = os.environ.get(FAULTS_ENV, "").strip()
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, count = item.partition("=")
        if point not in POINTS or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{FAULTS_ENV}: {item!r} is not point=N with a point among {sorted(POINTS)}")
        armed[point] = int(count)
    return armed


def reached(point: str) -> None:
    """Count one passage through ``point``; at the armed count, the process dies as if SIGKILLed."""
    armed = _armed()
    if point not in armed:
        return
    _reached[point] += 1
    if _reached[point] == armed[point]:
        os.kill(os.getpid(), signal.SIGKILL)


def watching_steps(progress: ProgressSink | None) -> ProgressSink | None:
    """``progress``, reporting denoising steps to ``reached("render_step")`` when that point is armed."""
    if "render_step" not in _armed():
        return progress

    def sink(event: RenderProgress) -> None:
        if event.kind == "step":
            reached("render_step")
        if progress is not None:
            progress(event)

    return sink
