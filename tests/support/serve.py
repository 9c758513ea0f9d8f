"""Real ``imagegate serve`` processes on the embedded defaults (dev chain, SQLite, local files), for the
tests and benchmarks that stop, kill and restart the server.

Each ``ServeProcess`` owns one data directory (so one ledger, one image store and one dev chain) and
one loopback port; it may be started, SIGTERMed, SIGKILLed and restarted any number of times.
``cleanup`` ends whatever is left, the dev chain's anvil included, by the pids it recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from imagegate.devchain import AnvilRecord, DevChain
from tests.support.server import free_port, wait_healthy

SIMULATED = "bench-simulated"


async def eventually(condition: Callable[[], Awaitable[bool]], timeout_s: float, *, interval_s: float = 0.1) -> bool:
    """Whether ``condition`` holds within ``timeout_s`` (polled): for tests that wait on another process."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await condition():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval_s)


def embedded_config(root: Path, *, batch_ms: float = 0, image_ms: float = 0, max_concurrency: int = 1,
                    drain_timeout_s: float = 30, stale_after_s: float = 120, reconcile_interval_s: float = 15,
                    extra: str = "") -> str:
    """The embedded defaults (dev chain, SQLite, local files) with the simulated GPU enabled (requests name it:
    a benchmark-only model is never the default)."""
    return f"""
data_dir = "{root / 'data'}"

[server]
drain_timeout_s = {drain_timeout_s}

[storage]
directory = "{root / 'images'}"

[models.{SIMULATED}]
enabled = true
max_concurrency = {max_concurrency}
options = {{ batch_ms = {batch_ms}, image_ms = {image_ms} }}

[payments]
stale_after_s = {stale_after_s}
reconcile_interval_s = {reconcile_interval_s}
{extra}
"""


class ServeProcess:
    def __init__(self, root: Path, config_text: str, *, port: int | None = None,
                 env: dict[str, str] | None = None, log_level: str = "warning"):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "imagegate.toml"
        self.config.write_text(config_text)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "serve.log"
        self.env = env or {}
        self.log_level = log_level
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # ------------------------------------------------------------------ the process

    def start(self, *, faults: str | None = None) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the server is already running")
        # Offline unless a test says otherwise: a server started here never reaches the real model hub.
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **os.environ, **self.env}
        env.pop("IMAGEGATE_TEST_FAULTS", None)
        if faults:
            env["IMAGEGATE_TEST_FAULTS"] = faults
        with self.log.open("ab") as log:
            log.write(f"\n==== start {self.starts + 1} (faults: {faults or 'none'}) ====\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "imagegate", "serve", "--config", str(self.config), "--port", str(self.port),
                 "--log-level", self.log_level],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def wait_ready(self, timeout_s: float = 240) -> float:
        """Seconds until /healthz answers 200; fails if the process exits first."""
        assert self.process is not None
        return await wait_healthy(self.url, self.process, timeout_s=timeout_s, exited=self.log_tail)

    async def start_ready(self, *, faults: str | None = None) -> float:
        self.start(faults=faults)
        return await self.wait_ready()

    def send(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait_exit(self, timeout_s: float) -> int:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"imagegate serve did not exit in {timeout_s} s; log:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        return self.process.returncode

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    async def stop(self, timeout_s: float = 90) -> int:
        """SIGTERM (drain, then a clean stop of the dev chain); SIGKILL if it does not exit in time."""
        if not self.running():
            return self.returncode or 0
        self.send(signal.SIGTERM)
        try:
            return await self.wait_exit(timeout_s)
        except TimeoutError:
            self.send(signal.SIGKILL)
            return await self.wait_exit(30)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------------ what it leaves on disk

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def staging_dir(self) -> Path:
        return self.root / "images" / "staging"

    def chain_record(self) -> AnvilRecord | None:
        """The dev chain's anvil as the server recorded it beside the chain's state."""
        return AnvilRecord.read(self.data_dir / "devchain" / "anvil-state.json.anvil.json")

    async def chain(self) -> DevChain:
        """A connection to the server's running dev chain (close it with ``stop``)."""
        record = self.chain_record()
        if record is None or not record.alive():
            raise RuntimeError("the server's dev chain is not running")
        return await DevChain.connect(f"http://127.0.0.1:{record.port}")

    def stopped_chain(self) -> DevChain:
        """The server's dev chain, while the server is stopped: anvil started from the state it left
        (``async with``); nobody is topped up, so balances are exactly what the server left."""
        return DevChain(state_file=self.data_dir / "devchain" / "anvil-state.json", payer_balance=0)

    def ledger_rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of a read-only SQL query on the server's SQLite ledger."""
        path = self.data_dir / "ledger.sqlite3"
        if not path.exists():
            return []
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as connection:
            return list(connection.execute(query, params).fetchall())

    async def wait_for_ledger(self, query: str, *params: Any, timeout_s: float = 120) -> list[tuple[Any, ...]]:
        """Polls ``query`` until it returns rows."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                rows = self.ledger_rows(query, *params)
            except sqlite3.OperationalError:  # the table is not created yet, or a writer holds a lock
                rows = []
            if rows:
                return rows
            if not self.running():
                raise RuntimeError(f"imagegate serve exited ({self.returncode}); log:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no ledger rows for {query!r} within {timeout_s} s")

    def cleanup(self) -> None:
        """Ends the server and its dev chain, whatever state they are in (kills by recorded pid)."""
        if self.running():
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=30)
        record = self.chain_record()
        if record is not None and record.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
