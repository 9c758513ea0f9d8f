"""Where generation runs, apart from what generates.

A ``Backend`` (``imagegate.backends``) knows *what* makes images for a model; an ``Engine`` decides
*where* that runs: in the API process (``LocalEngine``, the embedded default) or on GPU workers
(``RayEngine``, ``[workers] engine = "ray"``). The request flow talks only to the engine:

1. ``check_request`` and ``availability``: before any payment step, nothing loads;
2. ``admit``: a place in the model's bounded queue, taken before payment (503 MODEL_BUSY when full)
   and given back when the render ends or never starts;
3. ``render``: the images, with progress events, within a deadline after which the work is
   cancelled where it runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from imagegate.backends.base import Availability, GenerationJob, GenerationResult
from imagegate.catalog import ModelSpec
from imagegate.types import ImageRequest


@dataclass(frozen=True)
class RenderProgress:
    """What happens to one render, as it happens: waiting in line, started, one denoising step done."""

    kind: Literal["queued", "running", "step"]
    # queued: renders ahead of this one for the same model (0: next in line).
    position: int | None = None
    # step: steps done so far, out of total_steps.
    step: int | None = None
    total_steps: int | None = None

    @classmethod
    def queued(cls, position: int) -> RenderProgress:
        return cls("queued", position=position)

    @classmethod
    def running(cls) -> RenderProgress:
        return cls("running")

    @classmethod
    def stepped(cls, step: int, total_steps: int) -> RenderProgress:
        return cls("step", step=step, total_steps=total_steps)


# Called on the event loop's thread, in order; must not block.
ProgressSink = Callable[[RenderProgress], None]


class Admission:
    """A place in a model's queue. ``release`` is idempotent; the engine calls it when the render
    ends, and whoever took the admission calls it when the render never starts."""

    def __init__(self, model_id: str, release: Callable[[], None]):
        self.model_id = model_id
        self._release: Callable[[], None] | None = release

    @property
    def held(self) -> bool:
        return self._release is not None

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Engine(ABC):
    """Runs backends' generations somewhere, with bounded per-model queues."""

    @abstractmethod
    def check_request(self, spec: ModelSpec, request: ImageRequest) -> None:
        """Reject (``InvalidParameter``) what the model's backend cannot honour; before payment."""

    @abstractmethod
    async def availability(self, spec: ModelSpec) -> Availability:
        """Whether ``spec`` can run now, and why not; cheap, loads nothing."""

    @abstractmethod
    def admit(self, spec: ModelSpec) -> Admission:
        """Take a place in ``spec``'s queue, or raise ``ModelBusy`` (with Retry-After) when it is full."""

    @abstractmethod
    async def render(
        self,
        job: GenerationJob,
        admission: Admission,
        *,
        progress: ProgressSink | None = None,
        timeout_s: float | None = None,
    ) -> GenerationResult:
        """Render ``job`` and release ``admission``. Past ``timeout_s`` the work is cancelled where it
        runs and ``GenerationTimedOut`` is raised; raises ``imagegate.errors`` exceptions only."""

    @abstractmethod
    def queue_depth(self, model_id: str) -> int:
        """Renders admitted for ``model_id`` and not finished (waiting or running), from this process."""

    def loaded_models(self) -> dict[str, int]:
        """Models held in memory where this engine renders, with their bytes (when it can tell)."""
        return {}

    def typical_render_s(self, model_id: str) -> float | None:
        """Recent wall time of one render of ``model_id`` (smoothed), None before the first one;
        what the playground shows a waiting visitor."""
        return None

    async def aclose(self) -> None:
        """Stop rendering and release workers, models and connections."""
