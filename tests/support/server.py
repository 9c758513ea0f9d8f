"""A real uvicorn server on 127.0.0.1 (free port) in a background thread, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def live_server(app: Any, *, startup_timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` until the block ends; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the test server failed to start")
        if time.monotonic() > deadline:
            raise TimeoutError("the test server did not start in time")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_answering(url: str, process: subprocess.Popen[bytes], *, timeout_s: float,
                   exited: Callable[[], str] | None = None, interval_s: float = 0.1) -> None:
    """Block until ``url`` answers 200 from the server ``process``; fail as soon as the process exits
    (with ``exited()``, e.g. its log, in the message) or after ``timeout_s``. For synchronous fixtures
    and benchmarks; ``wait_healthy`` is the async form."""
    def log() -> str:
        return f":\n{exited()}" if exited is not None else ""

    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server behind {url} exited ({process.returncode}){log()}")
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer in {timeout_s:.0f} s{log()}")
        time.sleep(interval_s)


async def wait_healthy(url: str, process: subprocess.Popen[bytes], *, timeout_s: float = 180,
                       exited: Callable[[], str] | None = None) -> float:
    """Seconds until ``url``/healthz answers 200 from the ``imagegate serve`` ``process``; fails as soon as
    the process exits (with ``exited()`` as the message, e.g. its log), or after ``timeout_s``."""
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
        while time.monotonic() - started < timeout_s:
            if process.poll() is not None:
                raise RuntimeError(f"imagegate serve exited ({process.returncode})"
                                   + (f"; log:\n{exited()}" if exited is not None else ""))
            try:
                if (await client.get(f"{url}/healthz")).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not answer in {timeout_s:.0f} s"
                       + (f"; log:\n{exited()}" if exited is not None else ""))
