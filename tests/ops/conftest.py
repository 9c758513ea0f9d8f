"""Operating imagegate: real ``imagegate serve`` processes on loopback, their logs captured in files.

``paid_server`` is the package's one paid server (the dev chain, JSON logs, tight rate limits with no
exempt clients and 127.0.0.1 as the trusted proxy): tests tell their clients apart with
X-Forwarded-For addresses from TEST-NET-3 (``client_ip``); those addresses only ever travel in a header.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from imagegate import devchain
from tests.integration.conftest import network_payments
from tests.support.server import free_port, wait_answering

REPO = Path(__file__).resolve().parents[2]
IMAGEGATE = [sys.executable, "-m", "imagegate"]
# Built-in models whose weights are not on this machine (no hub in the tests): off, so every model
# the servers list can run.
UNAVAILABLE_HERE = ("flux-schnell", "flux-dev", "sdxl", "sdxl-turbo", "sd-turbo", "sd-1.5")
SLOW_RENDER_MS = 2000


@dataclass
class Served:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    root: Path

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def toml(data: dict[str, Any]) -> str:
    """Just enough TOML for the configs here: scalars, lists of scalars, nested tables, arrays of tables."""
    lines: list[str] = []

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int | float):
            return repr(item)
        if isinstance(item, str | Path):
            return '"' + str(item).replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(item, list):
            return "[" + ", ".join(value(element) for element in item) + "]"
        if isinstance(item, dict):
            return "{" + ", ".join(f'"{key}" = {value(element)}' for key, element in item.items()) + "}"
        raise TypeError(f"no TOML for {item!r}")

    def table(prefix: str, section: dict[str, Any]) -> None:
        scalars = {k: v for k, v in section.items() if not isinstance(v, dict) and not _is_table_list(v)}
        if prefix and (scalars or not section):
            lines.append(f"[{prefix}]")
        lines.extend(f'"{key}" = {value(item)}' for key, item in scalars.items())
        for key, item in section.items():
            name = f'{prefix}."{key}"' if prefix else f'"{key}"'
            if isinstance(item, dict):
                table(name, item)
            elif _is_table_list(item):
                for element in item:
                    lines.append(f"[[{name}]]")
                    lines.extend(f'"{k}" = {value(v)}' for k, v in element.items())

    table("", data)
    return "\n".join(lines) + "\n"


def _is_table_list(item: Any) -> bool:
    return isinstance(item, list) and bool(item) and all(isinstance(element, dict) for element in item)


def base_config(root: Path) -> dict[str, Any]:
    models: dict[str, Any] = {model: {"enabled": False} for model in UNAVAILABLE_HERE}
    return {
        "data_dir": str(root),
        "storage": {"directory": str(root / "images")},
        "diffusers": {"cpu_threads": 1, "allow_downloads": False},
        "catalog": {"default_model": "imagegate-tiny"},
        "models": models,
    }


@contextmanager
def serve(root: Path, config: dict[str, Any], *, args: tuple[str, ...] = (), env: dict[str, str] | None = None,
          startup_timeout_s: float = 180.0) -> Iterator[Served]:
    """``imagegate serve`` with ``config`` on a free loopback port, until the block ends (then SIGTERM to
    its process group: uvicorn's workers go with it)."""
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "imagegate.toml"
    config_path.write_text(toml(config), encoding="utf-8")
    port = free_port()
    log_path = root / "server.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [*IMAGEGATE, "serve", "--config", str(config_path), "--port", str(port), *args],
            cwd=root, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )
    served = Served(f"http://127.0.0.1:{port}", process, log_path, root)
    try:
        _wait_ready(served, startup_timeout_s)
        yield served
    finally:
        _stop(process)


def wait_for_log(served: Served, text: str, count: int, timeout_s: float = 180.0) -> None:
    """Until ``text`` appears ``count`` times in the server's log (e.g. every worker started)."""
    deadline = time.monotonic() + timeout_s
    while served.log_text().count(text) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} did not appear {count} times:\n{served.log_text()[-3000:]}")
        time.sleep(0.2)


def _wait_ready(served: Served, timeout_s: float) -> None:
    wait_answering(f"{served.base_url}/healthz", served.process, timeout_s=timeout_s, exited=served.log_text,
                   interval_s=0.2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value (0 when absent: a counter not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


_client_numbers = itertools.count(1)


def client_ip() -> str:
    """A client address of its own (TEST-NET-3, only ever sent as X-Forwarded-For)."""
    return f"203.0.113.{next(_client_numbers)}"


# --- the package's paid server --------------------------------------------------------------------


@pytest.fixture(scope="package")
async def ops_chain() -> AsyncIterator[devchain.DevChain]:
    async with devchain.DevChain() as running:
        yield running


# Refills far slower than any test runs (one token per 100 s), so a burst is a burst even under load.
TIGHT = {"rate": 0.01, "burst": 4}


@pytest.fixture(scope="package")
def paid_server(ops_chain: devchain.DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("ops-paid")
    config = base_config(root)
    config["models"]["bench-simulated"] = {"enabled": True, "options": {"batch_ms": SLOW_RENDER_MS}}
    config["workers"] = {"max_queue": 0}
    config["payments"] = {**network_payments(root, ops_chain.rpc_url), "reconcile_interval_s": 1.0}
    config["logging"] = {"format": "json"}
    config["limits"] = {"exempt_clients": [], "trusted_proxies": ["127.0.0.1"],
                        **{name: TIGHT for name in ("challenge", "estimate", "models", "images", "manifest")},
                        "refused_payment": {"rate": 0.01, "burst": 2}}
    with serve(root, config, args=("--log-level", "debug")) as served:
        yield served


@pytest.fixture
async def paid_http(paid_server: Served) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=paid_server.base_url, timeout=120, trust_env=False) as client:
        yield client


async def scrape(http: httpx.AsyncClient, **headers: str) -> Samples:
    response = await http.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse_metrics(response.text)
