"""Where generation runs, chosen by ``[workers] engine``: in this process, or on Ray Serve workers."""

from __future__ import annotations

from imagegate.backends import Backends
from imagegate.config import Settings
from imagegate.workers.base import Admission, Engine, ProgressSink, RenderProgress
from imagegate.workers.local import LocalEngine


def build_engine(settings: Settings, backends: Backends | None = None) -> Engine:
    workers = settings.workers
    if workers.engine == "local":
        return LocalEngine(backends or Backends(settings), max_queue=workers.max_queue)
    if workers.engine == "ray":
        # Imported only here: the embedded default never loads Ray (the imagegate[ray] extra).
        from imagegate.workers.ray import RayEngine

        return RayEngine(settings, backends)
    raise ValueError(f"unknown workers engine {workers.engine!r}")


__all__ = ["Admission", "Engine", "LocalEngine", "ProgressSink", "RenderProgress", "build_engine"]
