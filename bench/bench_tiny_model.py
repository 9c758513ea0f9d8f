"""Seconds per image of the embedded imagegate-tiny model on this CPU.

    python bench/bench_tiny_model.py [--threads 2] [--runs 5] [--sizes 512 256 1024]

Loads the committed pipeline through the catalog entry (float32, CPU), pins torch's thread count,
warms up once per size, then reports the median and spread of ``--runs`` timed generations at the
catalog's default steps and guidance (classifier-free guidance: two UNet passes per step).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores, load {load:.2f}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256, 1024])
    parser.add_argument("--prompt", default="a large orange triangle on a blue background")
    args = parser.parse_args()

    import torch
    from diffusers import DiffusionPipeline

    from imagegate.catalog import build_catalog
    from imagegate.config import load_settings

    torch.set_num_threads(args.threads)
    spec = build_catalog(load_settings())["imagegate-tiny"]
    started = time.perf_counter()
    pipeline = DiffusionPipeline.from_pretrained(Path(spec.source), dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    load_seconds = time.perf_counter() - started
    steps, guidance = spec.steps.default, spec.guidance.default

    print(f"machine: {machine()}; torch {torch.__version__}, {args.threads} threads")
    print(f"model: {spec.id}, {steps} steps, guidance {guidance}; load {load_seconds:.2f} s")
    for size in args.sizes:
        def generate(seed: int, size: int = size) -> None:
            with torch.inference_mode():
                pipeline(args.prompt, width=size, height=size, num_inference_steps=steps, guidance_scale=guidance,
                         generator=torch.Generator("cpu").manual_seed(seed))

        generate(0)  # warm-up: first-call allocations and kernel selection
        timings = []
        for run in range(args.runs):
            start = time.perf_counter()
            generate(run + 1)
            timings.append(time.perf_counter() - start)
        print(f"{size}x{size}: median {statistics.median(timings):.3f} s "
              f"(min {min(timings):.3f}, max {max(timings):.3f}, {args.runs} runs)")


if __name__ == "__main__":
    main()
