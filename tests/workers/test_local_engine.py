"""The in-process engine: admission before payment, first-come queues with positions, steps as
progress, and renders cancelled where they run when their deadline passes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from imagegate.backends import Backends
from imagegate.catalog import Catalog, build_catalog
from imagegate.config import load_settings
from imagegate.errors import GenerationTimedOut, ModelBusy
from imagegate.workers import LocalEngine, RenderProgress
from tests.backends.conftest import job, make_catalog


def simulated_engine(max_queue: int = 16, **options: Any) -> tuple[Catalog, LocalEngine]:
    settings = load_settings(models={"bench-simulated": {"enabled": True, "options": options}})
    return build_catalog(settings), LocalEngine(Backends(settings), max_queue=max_queue)


async def test_admission_is_bounded_per_model_and_given_back() -> None:
    catalog, engine = simulated_engine(max_queue=1)
    spec = catalog["bench-simulated"]
    first, second = engine.admit(spec), engine.admit(spec)
    assert engine.queue_depth(spec.id) == 2
    with pytest.raises(ModelBusy) as busy:
        engine.admit(spec)
    assert busy.value.status == 503 and busy.value.headers["Retry-After"].isdigit()
    assert busy.value.details == {"model": "bench-simulated", "queued": 2}
    first.release()
    first.release()  # idempotent
    third = engine.admit(spec)
    assert engine.queue_depth(spec.id) == 2
    second.release()
    third.release()
    assert engine.queue_depth(spec.id) == 0


async def test_renders_run_first_come_first_served_and_report_their_place_and_steps() -> None:
    catalog, engine = simulated_engine(batch_ms=120)
    spec = catalog["bench-simulated"]
    events: dict[int, list[RenderProgress]] = {0: [], 1: [], 2: []}
    finished: list[int] = []

    async def render(index: int) -> None:
        await engine.render(job(spec, seeds=(index,), steps=3), engine.admit(spec), progress=events[index].append)
        finished.append(index)

    tasks = []
    for index in range(3):
        tasks.append(asyncio.create_task(render(index)))
        await asyncio.sleep(0)  # arrival order
    await asyncio.gather(*tasks)
    assert finished == [0, 1, 2]
    assert [e.kind for e in events[0]] == ["running", "step", "step", "step"]
    assert [(e.step, e.total_steps) for e in events[0][1:]] == [(1, 3), (2, 3), (3, 3)]
    # The third render waits behind two, then behind one, then runs.
    assert [e.position for e in events[2] if e.kind == "queued"] == [1, 0]
    assert [e.kind for e in events[2]][-4:] == ["running", "step", "step", "step"]
    assert engine.queue_depth(spec.id) == 0


async def test_a_render_past_its_deadline_is_cancelled_and_its_slot_freed() -> None:
    catalog, engine = simulated_engine(batch_ms=2000)
    spec = catalog["bench-simulated"]
    steps: list[int] = []

    def progress(event: RenderProgress) -> None:
        if event.step is not None:
            steps.append(event.step)

    with pytest.raises(GenerationTimedOut) as timed_out:
        await engine.render(job(spec, steps=20), engine.admit(spec), progress=progress, timeout_s=0.3)
    assert timed_out.value.status == 503 and "cancelled" in timed_out.value.message
    assert 0 < len(steps) < 20
    await asyncio.sleep(0.3)
    assert len(steps) < 20  # nothing kept running after the deadline
    assert engine.queue_depth(spec.id) == 0
    fast = job(spec, steps=1)
    result = await engine.render(fast, engine.admit(spec), timeout_s=30)
    assert len(result.images) == 1


async def test_a_waiting_render_that_is_cancelled_leaves_the_line() -> None:
    catalog, engine = simulated_engine(batch_ms=300)
    spec = catalog["bench-simulated"]
    events: list[RenderProgress] = []
    running = asyncio.create_task(engine.render(job(spec), engine.admit(spec)))
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(engine.render(job(spec), engine.admit(spec)))
    third = asyncio.create_task(engine.render(job(spec), engine.admit(spec), progress=events.append))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.gather(running, third)
    assert [e.position for e in events if e.kind == "queued"] == [1, 0]
    assert engine.queue_depth(spec.id) == 0


# With a real diffusers pipeline: steps come from the pipeline's step callback, in its thread.


@pytest.fixture
async def diffusers_engine(tiny_dirs: dict[str, Path]) -> Any:
    catalog, settings = make_catalog(tiny_dirs)
    engine = LocalEngine(Backends(settings), max_queue=4)
    yield catalog, engine
    await engine.aclose()


async def test_diffusers_steps_are_reported_across_the_calls_of_a_generation(diffusers_engine: Any) -> None:
    catalog, engine = diffusers_engine
    events: list[RenderProgress] = []
    result = await engine.render(job(catalog["sd-1.5"], seeds=(1, 2), steps=3), engine.admit(catalog["sd-1.5"]),
                                 progress=events.append)
    await asyncio.sleep(0)  # steps are posted from the render thread
    assert len(result.images) == 2
    assert [(e.step, e.total_steps) for e in events if e.kind == "step"] == [(1, 3), (2, 3), (3, 3)]
    spec = catalog["sd-1.5"].model_copy(update={"options": {"batch_images": False}})
    events.clear()
    await engine.render(job(spec, seeds=(1, 2), steps=2), engine.admit(spec), progress=events.append)
    await asyncio.sleep(0)
    assert [(e.step, e.total_steps) for e in events if e.kind == "step"] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert engine.loaded_models()["sd-1.5"] > 0


async def test_diffusers_render_is_stopped_at_its_next_step_when_cancelled(diffusers_engine: Any) -> None:
    catalog, engine = diffusers_engine
    spec = catalog["sd-1.5"]
    steps: list[int] = []
    render: asyncio.Task[Any] | None = None

    def progress(event: RenderProgress) -> None:
        if event.step is not None:
            steps.append(event.step)
            if event.step == 2 and render is not None:
                render.cancel()

    render = asyncio.create_task(engine.render(job(spec, steps=50), engine.admit(spec), progress=progress))
    with pytest.raises(asyncio.CancelledError):
        await render
    backend = engine.backends.get("diffusers")
    state = backend._states[spec.id]
    for _ in range(500):
        if not state.slots.locked():
            break
        await asyncio.sleep(0.01)
    assert not state.slots.locked()  # its thread ended: the render did not run its 50 steps
    await asyncio.sleep(0)
    assert max(steps) < 50
