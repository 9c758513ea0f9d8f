"""``imagegate serve --workers 2``: /metrics counts every worker's requests whichever worker answers the
scrape (prometheus-client multiprocess mode), behind a bearer token; text logs; X-Forwarded-For from an
untrusted peer ignored."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.ops.conftest import Served, base_config, metric, parse_metrics, serve, wait_for_log
from tests.support.postgres import PostgresServer

TOKEN = "metrics-token-for-the-ops-tests"
REQUESTS = 60


@pytest.fixture(scope="module")
def workers_server(tmp_path_factory: pytest.TempPathFactory,
                   postgres_server: PostgresServer) -> Iterator[tuple[Served, Path]]:
    root = tmp_path_factory.mktemp("ops-workers")
    metrics_dir = root / "prometheus"
    config = base_config(root)
    config["payments"] = {"enabled": False}
    # Several worker processes share one ledger: on PostgreSQL (an SQLite ledger serves one process).
    config["ledger"] = {"url": postgres_server.create_database("workers")}
    # No trusted proxy: X-Forwarded-For from 127.0.0.1 is the client's own claim and is ignored.
    config["limits"] = {"exempt_clients": [], "trusted_proxies": [], "estimate": {"rate": 0.01, "burst": 3},
                        "models": {"rate": 1000, "burst": 1000}}
    env = {"IMAGEGATE_METRICS_TOKEN": TOKEN, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with serve(root, config, args=("--workers", "2"), env=env) as served:
        wait_for_log(served, "Application startup complete", 2)  # both workers take connections
        yield served, metrics_dir


async def test_metrics_add_up_across_workers(workers_server: tuple[Served, Path]) -> None:
    served, metrics_dir = workers_server
    authorized = {"Authorization": f"Bearer {TOKEN}"}

    async def one_request() -> None:
        # A connection per request, so the kernel spreads them over both workers.
        async with httpx.AsyncClient(base_url=served.base_url, timeout=120, trust_env=False) as http:
            assert (await http.get("/v1/images/models")).status_code == 200

    for start in range(0, REQUESTS, 6):
        await asyncio.gather(*(one_request() for _ in range(min(6, REQUESTS - start))))
    # Both workers served and wrote their own counters.
    writers = {match.group(1) for path in metrics_dir.iterdir()
               if (match := re.match(r"counter_(\d+)\.db$", path.name))}
    assert len(writers) >= 2, writers

    async with httpx.AsyncClient(base_url=served.base_url, timeout=120, trust_env=False) as http:
        for _ in range(6):  # whichever worker answers, the sum is the same
            async with httpx.AsyncClient(base_url=served.base_url, timeout=120, trust_env=False) as fresh:
                response = await fresh.get("/metrics", headers=authorized)
            assert response.status_code == 200
            samples = parse_metrics(response.text)
            assert metric(samples, "imagegate_http_requests_total", method="GET", route="/v1/images/models",
                          status="200") == REQUESTS
            # Every catalog model's queue, summed over the live workers.
            assert metric(samples, "imagegate_queue_depth", model="imagegate-tiny") == 0
            assert ("imagegate_queue_depth", frozenset({("model", "imagegate-tiny")})) in samples

        # The token is required.
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            refused = await http.get("/metrics", headers=headers)
            assert refused.status_code == 401 and refused.json()["error"] == "UNAUTHORIZED"
            assert refused.headers["www-authenticate"] == "Bearer"


async def test_text_logs_name_the_request(workers_server: tuple[Served, Path]) -> None:
    served, _ = workers_server
    async with httpx.AsyncClient(base_url=served.base_url, timeout=120, trust_env=False) as http:
        response = await http.get("/healthz", headers={"X-Request-ID": "text-log-line"})
    assert response.headers["x-request-id"] == "text-log-line"
    # The access line is written once the response is sent: it may land a moment after the answer.
    await asyncio.to_thread(wait_for_log, served, "[text-log-line]", 1, 10)
    lines = [line for line in served.log_text().splitlines() if "[text-log-line]" in line]
    assert len(lines) == 1, served.log_text()[-3000:]
    assert "INFO imagegate.access [text-log-line]: GET /healthz 200" in lines[0]
    assert "route=/healthz status=200" in lines[0] and "client=127.0.0.1" in lines[0]


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(workers_server: tuple[Served, Path]) -> None:
    served, _ = workers_server
    body = {"width": 512, "height": 512}
    async with httpx.AsyncClient(base_url=served.base_url, timeout=120, trust_env=False) as http:
        # Buckets live in each worker: two workers let through at most twice the burst of 3.
        statuses = []
        for number in range(7):
            response = await http.post("/v1/images/estimate", json=body,
                                       headers={"X-Forwarded-For": f"198.51.100.{number}"})
            statuses.append(response.status_code)
    assert 429 in statuses and statuses.count(200) <= 6, statuses
