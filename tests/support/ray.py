"""One real Ray head on loopback for the test session, and what tests do with its worker apps.

The head is started with the real ``imagegate workers head`` on 127.0.0.1 (every Ray process binds
and dials loopback only), with 2 declared GPUs and explicit ports and temp dir; the replicas run on
the CPU. This test process joins it as a Ray driver (to deploy apps and look at replicas). At the
end the head is stopped by its PID, and whatever it started is ended by PID too.

Registered as a pytest plugin in ``tests/conftest.py``, so every test directory shares the one head
(a process can be the driver of one cluster only): ``tests/workers`` and ``tests/shared_state``.
"""

from __future__ import annotations

import os

# Before anything imports Ray: a loopback cluster must not resolve 127.0.0.1 to this machine's
# network address (scale-out.md §9).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import asyncio
import contextlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil  # type: ignore[import-untyped]
import pytest

if TYPE_CHECKING:
    from imagegate.workers.protocol import ReplicaStats

DECLARED_GPUS = 2
# Ports of `imagegate workers head --port P`: P ... P+8, and workers from P+10 (100 of them).
HEAD_PORT_SPAN = 110
HEAD_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RayHead:
    address: str
    pid: int
    log: Path
    # This process's SIGTERM handler before and after it joined the cluster as a driver.
    sigterm_handlers: tuple[Any, Any]


def _free_port_block(span: int) -> int:
    """A base port below Linux's ephemeral range whose next ``span`` ports are all free now."""
    for _ in range(200):
        base = random.randrange(20_000, 32_000 - span)
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + span):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free block of ports for a Ray head")


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Ray head exited ({process.returncode}): {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the Ray head did not listen within {HEAD_START_TIMEOUT_S:.0f} s: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the head's CLI (it stops `ray start`), then SIGKILL to whatever of it is left."""
    descendants: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        descendants = psutil.Process(process.pid).children(recursive=True)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=45)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    for leftover in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()


@contextlib.contextmanager
def started_ray_head(num_gpus: int = DECLARED_GPUS) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """`imagegate workers head` on 127.0.0.1 with ``num_gpus`` declared GPUs: its address, process and log.
    At the end Serve and this process's Ray connection (if any) are shut down and the head is stopped by
    its PID. For the tests' fixture and for the benchmarks."""
    port = _free_port_block(HEAD_PORT_SPAN)
    # Short: Ray's unix sockets live under it and their paths are limited to ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="ig-ray-", dir="/tmp"))
    log = temp_dir / "head.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "imagegate", "workers", "head", "--host", "127.0.0.1", "--port", str(port),
             "--num-gpus", str(num_gpus), "--num-cpus", "2", "--temp-dir", str(temp_dir)],
            stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
        )
    try:
        _wait_for_port(port, process, log)
        yield f"127.0.0.1:{port}", process, log
    finally:
        import ray
        from ray import serve
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        # Serve's controller outlives its apps; stopped first, the head stops in seconds rather than
        # draining for half a minute. A head that already died has nothing left to stop.
        if ray.is_initialized():
            with contextlib.suppress(RayError, RayServeException, ConnectionError):
                serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
        _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """A Ray head on 127.0.0.1 with 2 declared GPUs, this process connected to it as a driver."""
    from imagegate.workers.ray import connect

    with started_ray_head() as (address, process, log):
        before = signal.getsignal(signal.SIGTERM)
        connect(address)  # on the main thread, where ray.init installs its own SIGTERM handler
        yield RayHead(address, process.pid, log, (before, signal.getsignal(signal.SIGTERM)))


def run_imagegate(*arguments: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    """``imagegate <arguments>`` (e.g. ``workers deploy --config ...``) to its end, output captured."""
    return subprocess.run([sys.executable, "-m", "imagegate", *arguments], capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@dataclass(frozen=True)
class KilledReplica:
    replica: ReplicaStats
    # The jobs it was rendering when it died (one pipeline call: a batch of them).
    job_ids: tuple[str, ...]

    @property
    def job_id(self) -> str:
        return self.job_ids[0]


async def kill_a_replica_mid_job(app_name: str, done: asyncio.Event, replicas: int = 2) -> KilledReplica | None:
    """Watch the app's replicas; SIGKILL the first one seen rendering a job (once), and say which jobs.
    None when ``done`` is set before any replica was seen rendering."""
    from imagegate.workers.ray import app_handle, replica_stats

    handle = app_handle(app_name)
    while not done.is_set():
        for stats in await replica_stats(handle, replicas):
            rendering = [job for job in stats.active if job.state == "rendering"]
            if rendering:
                os.kill(stats.pid, signal.SIGKILL)  # a replica of the head this session started
                return KilledReplica(stats, tuple(job.job_id for job in rendering))
        await asyncio.sleep(0.05)
    return None
