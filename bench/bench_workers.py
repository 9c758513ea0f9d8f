"""GPU workers on Ray Serve (issue 10): scaling over replicas, dynamic batching, the cost of the hop.

    .venv/bin/python -m bench.bench_workers [--window 15] [--hop-runs 15]

Starts its own Ray head on 127.0.0.1 (`imagegate workers head`, 4 declared GPUs, replicas on the
CPU), deploys the worker app for each phase and drives it through ``RayEngine`` from this process
(closed-loop clients, the same calls an API process makes):

1. images/s with 1, 2 and 4 replicas on the simulated GPU (``batch_ms`` per pipeline call plus
   ``image_ms`` per image, spent asleep: the replica is busy, the CPU is not), 16 clients per
   replica so that every replica always has a full batch waiting; goal >= 0.9x linear;
2. images/s with batching on against off, 8 concurrent clients, 1 replica; goal >= 1.5x;
3. the p50 of one render through Ray against the same render in this process, on imagegate-tiny
   256x256 (12 steps, one torch thread on both sides) and on a zero-work simulated model (the hop
   alone), interleaved so that background load hits both sides alike.

Every phase reports the load average and this process's CPU use (the load generator must not be
what bounds the figure).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# Before Ray is imported: the head is on loopback and so must every Ray connection be.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from tests.support.ray import started_ray_head

DECLARED_GPUS = 4
APP = "imagegate-bench"
# The simulated GPU of phases 1 and 2.
SCALING = {"batch_ms": 800.0, "image_ms": 100.0}
BATCHING = {"batch_ms": 200.0, "image_ms": 25.0}
BATCH_IMAGES = 8
# The running head's PID, for the CPU its processes use.
HEAD_PID = [0]


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as handle:
        cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def load_average() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


@contextlib.contextmanager
def ray_head() -> Iterator[str]:
    """`imagegate workers head` on loopback with 4 declared GPUs; stopped by its PID at the end."""
    with started_ray_head(DECLARED_GPUS) as (address, process, _log):
        HEAD_PID[0] = process.pid
        yield address


def settings_for(address: str, *, replicas: int, batching: bool = True, batch_wait_s: float = 0.05,
                 simulated: dict[str, float] | None = None) -> Any:
    from imagegate.catalog import builtin_tables
    from imagegate.config import load_settings

    models: dict[str, Any] = {"bench-simulated": {"enabled": True, "options": simulated or SCALING},
                              "bench-zero": {**builtin_tables()["bench-simulated"], "enabled": True,
                                             "options": {"batch_ms": 0, "image_ms": 0}}}
    return load_settings(
        models=models, catalog={"default_model": "imagegate-tiny"},
        diffusers={"cpu_threads": 1, "allow_downloads": False},
        workers={"engine": "ray", "address": address, "app_name": APP, "replicas": replicas, "gpus_per_replica": 1,
                 "cpus_per_replica": 0, "batching": batching, "batch_max_images": BATCH_IMAGES,
                 "batch_wait_s": batch_wait_s, "max_queue": 10_000},
    )


@dataclass
class Throughput:
    images_per_s: float
    clients: int
    load: str
    cpu_share: float  # of one core, this process, during the window
    ray_cpu_share: float  # of one core, every process of the Ray head (replicas included), during the window


def ray_cpu_seconds(head_pid: int) -> float:
    """CPU seconds used so far by the head's processes (replicas, Serve controller, raylet, GCS)."""
    import psutil  # type: ignore[import-untyped]

    total = 0.0
    with contextlib.suppress(psutil.NoSuchProcess):
        for process in psutil.Process(head_pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
    return total


async def closed_loop(settings: Any, clients: int, window_s: float, warmup_s: float = 5.0) -> Throughput:
    """``clients`` callers, each rendering one simulated image after another; images done in the window."""
    from imagegate.backends.base import GenerationJob
    from imagegate.catalog import build_catalog
    from imagegate.workers.ray import RayEngine

    spec = build_catalog(settings)["bench-simulated"]
    engine = RayEngine(settings)
    assert (await engine.availability(spec)).available
    finish_times: list[float] = []
    stop_at = time.monotonic() + warmup_s + window_s

    async def client(index: int) -> None:
        seed = index * 1_000_000
        while time.monotonic() < stop_at:
            seed += 1
            job = GenerationJob(spec, "a plain image", None, 128, 128, 1, None, (seed,), False)
            await engine.render(job, engine.admit(spec), timeout_s=120)
            finish_times.append(time.monotonic())

    tasks = [asyncio.create_task(client(index)) for index in range(clients)]
    await asyncio.sleep(warmup_s)
    window_start, cpu_start, ray_start = time.monotonic(), time.process_time(), ray_cpu_seconds(HEAD_PID[0])
    await asyncio.sleep(window_s)
    window_end, cpu_end, ray_end = time.monotonic(), time.process_time(), ray_cpu_seconds(HEAD_PID[0])
    load = load_average()
    await asyncio.gather(*tasks)
    batches = {stats.replica: stats.recent_batches for stats in await engine.replica_stats()}
    print("  pipeline calls per replica (jobs in each, most recent last): "
          + "; ".join(f"{replica}: {len(sizes)} calls, mean {statistics.mean(sizes) if sizes else 0:.1f}"
                      for replica, sizes in sorted(batches.items())), flush=True)
    await engine.aclose()
    done = sum(1 for finished in finish_times if window_start <= finished < window_end)
    return Throughput(done / (window_end - window_start), clients, load, (cpu_end - cpu_start) / window_s,
                      (ray_end - ray_start) / window_s)


async def hop_cost(settings: Any, runs: int) -> dict[str, tuple[float, float]]:
    """p50 (ms) of one render in this process and through Ray, per model, interleaved."""
    from imagegate.backends import Backends
    from imagegate.backends.base import GenerationJob
    from imagegate.catalog import build_catalog
    from imagegate.workers.local import LocalEngine
    from imagegate.workers.ray import RayEngine

    catalog = build_catalog(settings)
    local = LocalEngine(Backends(settings), max_queue=16)
    remote = RayEngine(settings)
    results: dict[str, tuple[float, float]] = {}
    for model, steps, size in (("bench-zero", 1, 128), ("imagegate-tiny", 12, 256)):
        spec = catalog[model]
        assert (await remote.availability(spec)).available
        timings: dict[str, list[float]] = {"local": [], "ray": []}
        for run in range(runs + 2):  # the first two warm both sides (pipeline loads)
            job = GenerationJob(spec, "a large orange triangle on a blue background", None, size, size, steps, 3.0,
                                (run,), True)
            for side, engine in (("local", local), ("ray", remote)):
                started = time.perf_counter()
                await engine.render(job, engine.admit(spec), timeout_s=300)
                if run >= 2:
                    timings[side].append((time.perf_counter() - started) * 1000)
        results[model] = (statistics.median(timings["local"]), statistics.median(timings["ray"]))
    await local.aclose()
    await remote.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured per throughput point")
    parser.add_argument("--hop-runs", type=int, default=15)
    parser.add_argument("--phases", nargs="+", choices=["scaling", "batching", "hop"],
                        default=["scaling", "batching", "hop"])
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from imagegate.workers.ray import connect

    print(f"# {machine()}, {time.strftime('%Y-%m-%d %H:%M')}, load {load_average()}")
    with ray_head() as address:
        connect(address)

        if "scaling" in args.phases:
            scale(address, args.window)
        if "batching" in args.phases:
            batch(address, args.window)
        if "hop" in args.phases:
            hop(address, args.hop_runs)
        from imagegate.workers.ray import delete

        delete(settings_for(address, replicas=1))


def scale(address: str, window_s: float) -> None:
    """1. Scaling over replicas: 16 clients per replica keep a full batch waiting on each."""
    from imagegate.workers.ray import deploy

    scaling: dict[int, Throughput] = {}
    for replicas in (1, 2, 4):
        settings = settings_for(address, replicas=replicas)
        deploy(settings, timeout_s=600)
        point = scaling[replicas] = asyncio.run(closed_loop(settings, 2 * BATCH_IMAGES * replicas, window_s))
        print(f"replicas {replicas}: {point.images_per_s:.2f} images/s ({point.clients} clients, load "
              f"{point.load}, bench process {point.cpu_share:.0%} of a core, Ray processes "
              f"{point.ray_cpu_share:.0%} of a core)", flush=True)
    per_replica = BATCH_IMAGES / ((SCALING["batch_ms"] + BATCH_IMAGES * SCALING["image_ms"]) / 1000)
    print(f"ideal per replica (simulated GPU time alone): {per_replica:.2f} images/s")
    for replicas in (2, 4):
        ratio = scaling[replicas].images_per_s / (replicas * scaling[1].images_per_s)
        print(f"scaling 1 -> {replicas}: {ratio:.2f}x linear")


def batch(address: str, window_s: float) -> None:
    """2. Batching on vs off, 8 concurrent clients, 1 replica."""
    from imagegate.workers.ray import deploy

    batching: dict[bool, Throughput] = {}
    for enabled in (True, False):
        settings = settings_for(address, replicas=1, batching=enabled, simulated=BATCHING)
        deploy(settings, timeout_s=600)
        point = batching[enabled] = asyncio.run(closed_loop(settings, 8, window_s))
        print(f"batching {'on ' if enabled else 'off'}: {point.images_per_s:.2f} images/s (load {point.load}, "
              f"bench process {point.cpu_share:.0%} of a core, Ray processes {point.ray_cpu_share:.0%})", flush=True)
    print(f"batching on / off: {batching[True].images_per_s / batching[False].images_per_s:.2f}x")


def hop(address: str, runs: int) -> None:
    """3. The hop: one replica, with and without a batching wait (a lone request waits for company)."""
    from imagegate.workers.ray import deploy

    for wait_s in (0.0, 0.05):
        settings = settings_for(address, replicas=1, batch_wait_s=wait_s)
        deploy(settings, timeout_s=600)
        for model, (local_ms, ray_ms) in asyncio.run(hop_cost(settings, runs)).items():
            print(f"hop, batch_wait_s {wait_s}: {model}: in process p50 {local_ms:.1f} ms, through Ray p50 "
                  f"{ray_ms:.1f} ms, cost {ray_ms - local_ms:+.1f} ms (load {load_average()})", flush=True)


if __name__ == "__main__":
    main()
