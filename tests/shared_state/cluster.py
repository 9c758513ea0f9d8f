"""A shared-state imagegate deployment on loopback, every part real, for multi-process tests:

- one PostgreSQL (``tests.support.postgres``, a fresh database) as the ledger of every API process;
- one bucket on moto's S3 server (``tests.support.s3``), versioned, with the public-read policy on
  ``<prefix>images/`` that the README recommends, as the image store of every API process;
- one dev chain (anvil + test USDC) and one ``imagegate facilitator`` process settling on it (one
  facilitator for all API processes, as in production: its gas key's nonces live in one place);
- N ``imagegate serve`` processes, each with its own config file, port and log, started together
  (so they also race to upgrade the ledger's schema at startup), each killable and restartable.

Reuse: ``ClusterOptions.settings`` is deep-merged into every API process's config, so a test can swap
the in-process engine for Ray workers (``{"workers": {"engine": "ray", "address": ..., ...}}``) or enable
more models; ``ClusterOptions.env`` adds environment variables; ``ClusterOptions.before_apis`` runs once
the shared services are up and before any API process starts (e.g. ``imagegate workers deploy --config``
with ``cluster.config_path(0)``). ``new_payers`` funds fresh payer accounts; ``wait_until_settled`` waits
for reconciliation to finish everything in flight; ``check_books`` then checks that the money agrees on
chain, in the ledger and per generation, and that every paid image is published once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account

from imagegate import devchain
from imagegate.ledger import GenerationRecord, GenerationStatus, PaymentRecord, PaymentStatus, SqlLedger
from imagegate.payments.client import payer_address, post_with_payment
from imagegate.types import OutputFormat
from tests.support.payments import Terms, sign, v2_header
from tests.support.postgres import PostgresServer
from tests.support.s3 import MotoS3Server
from tests.support.server import free_port

MODEL = "imagegate-tiny"
PAY_TO = devchain.PAY_TO_ACCOUNT.address
PREFIX = "imagegate/"
ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"
# Anvil's account 4 pays for the warm-up generations, so tests can count their own payer's transfers.
WARM_UP_PAYER_KEY = "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a"


def to_toml(table: dict[str, Any], _path: tuple[str, ...] = ()) -> str:
    """A TOML document from nested dicts of str/int/float/bool/lists (lists of tables inline)."""
    scalars = {key: value for key, value in table.items() if not isinstance(value, dict)}
    tables = {key: value for key, value in table.items() if isinstance(value, dict)}
    lines = [f"[{'.'.join(json.dumps(part) for part in _path)}]"] if _path and scalars else []
    lines += [f"{json.dumps(key)} = {_toml_value(value)}" for key, value in scalars.items()]
    text = "\n".join(lines) + ("\n\n" if lines else "")
    return text + "".join(to_toml(value, (*_path, key)) for key, value in tables.items())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict)
                       else value)
    return merged


@dataclass
class ClusterOptions:
    api_processes: int = 3
    # Deep-merged into every API process's settings (e.g. {"workers": {"engine": "ray", ...}}).
    settings: dict[str, Any] = field(default_factory=dict)
    # Reconciliation: how often each API process looks, and when an untouched payment counts as abandoned
    # (longer than any render the tests make, model loading included: see ``warm_up``).
    reconcile_interval_s: float = 0.5
    stale_after_s: float = 10.0
    # Each API process sells one small paid generation (x402 SDK client) once ready, so the first request
    # of a test does not pay for loading the model.
    warm_up: bool = True
    # Image URLs on the bucket (a CDN stand-in: anonymous reads of <prefix>images/), else through the API.
    cdn: bool = False
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 300.0
    # Runs after PostgreSQL, the bucket, the chain and the facilitator are up, before the API processes.
    before_apis: Callable[[Cluster], Awaitable[None]] | None = None


class ImagegateProcess:
    """One `imagegate ...` process on 127.0.0.1 with its log file; stopped by its own PID."""

    def __init__(self, name: str, arguments: list[str], root: Path, env: dict[str, str], port: int):
        self.name = name
        self.arguments = arguments
        self.env = env
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = root / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            self.process = subprocess.Popen([sys.executable, "-m", "imagegate", *self.arguments],
                                            stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as when a machine dies."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if not self.running:
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)

    def log_tail(self, characters: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""

    async def wait_until(self, ready: str, timeout_s: float) -> None:
        """Until GET ``ready`` answers 200 (and, for /v1/images/models, the test model is available)."""
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30, trust_env=False) as http:
            while True:
                if not self.running:
                    raise RuntimeError(f"{self.name} exited during startup:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    response = await http.get(ready)
                    if response.status_code == 200 and (
                            ready != "/v1/images/models"
                            or any(m["id"] == MODEL and m["available"] for m in response.json()["models"])):
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")
                await asyncio.sleep(0.25)


@dataclass(frozen=True)
class Books:
    """The money, three ways: transfers to payTo on chain, the ledger's revenue, and what each completed
    generation was charged; plus reverted settlement transactions."""

    transfers: list[devchain.TokenTransfer]
    ledger_revenue: int
    completed: list[GenerationRecord]
    reverted: list[devchain.MinedTransaction]

    @property
    def transferred(self) -> int:
        return sum(transfer.value for transfer in self.transfers)


@dataclass(frozen=True)
class SignedPayment:
    """A hand-signed x402 v2 payment (real EIP-3009 signature) that a test may send several times."""

    headers: dict[str, str]
    terms: Terms
    payer: str

    @property
    def key(self) -> str:
        return f"{devchain.NETWORK_V2}:{self.payer.lower()}:0x{self.terms.nonce.hex()}"


class Cluster:
    def __init__(self, root: Path, postgres: PostgresServer, s3: MotoS3Server, chain: devchain.DevChain,
                 options: ClusterOptions):
        self.root = root
        self.chain = chain
        self.s3 = s3
        self.options = options
        self.database_url = postgres.create_database("cluster")
        self.bucket = s3.create_bucket("imagegate-cluster")
        s3.allow_public_reads(self.bucket, PREFIX)
        self.public_base_url = f"{s3.endpoint_url}/{self.bucket}/{PREFIX}images"
        self.env = {**os.environ, **s3.credentials_env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "AWS_EC2_METADATA_DISABLED": "true", **options.env}
        key_file = root / "facilitator.key"
        key_file.write_text(devchain.FACILITATOR_ACCOUNT.private_key)
        key_file.chmod(0o600)
        facilitator_port = free_port()
        self.facilitator = ImagegateProcess(
            "facilitator", ["facilitator", "--rpc-url", chain.rpc_url, "--network", devchain.NETWORK_V2,
                            "--host", "127.0.0.1", "--port", str(facilitator_port), "--key-file", str(key_file)],
            root, self.env, facilitator_port)
        self.apis = [self._api_process(index) for index in range(options.api_processes)]
        self.start_block = 0

    def settings(self, index: int, port: int) -> dict[str, Any]:
        """The config file of API process ``index``: everything shared but its port and data dir."""
        options = self.options
        s3: dict[str, Any] = {"bucket": self.bucket, "prefix": PREFIX, "endpoint_url": self.s3.endpoint_url,
                              "region": "us-east-1"}
        if options.cdn:
            s3["public_base_url"] = self.public_base_url
        base: dict[str, Any] = {
            "data_dir": str(self.root / f"api-{index}"),
            "server": {"host": "127.0.0.1", "port": port},
            "ledger": {"url": self.database_url},
            "storage": {"kind": "s3", "s3": s3},
            "diffusers": {"cpu_threads": 1, "allow_downloads": False},
            "catalog": {"default_model": MODEL},
            "payments": {
                "mode": "network",
                "options": [{"network": "base-sepolia", "pay_to": PAY_TO}],
                "facilitator": {"kind": "http", "url": self.facilitator.base_url, "timeout_s": 120},
                "reconcile_rpc_url": self.chain.rpc_url,
                "reconcile_interval_s": options.reconcile_interval_s,
                "stale_after_s": options.stale_after_s,
            },
        }
        return deep_merge(base, options.settings)

    def config_path(self, index: int) -> Path:
        """The config file of API process ``index`` (every process's is the same but for port and data dir)."""
        return self.root / f"api-{index}.toml"

    def _api_process(self, index: int) -> ImagegateProcess:
        port = free_port()
        config = self.config_path(index)
        config.write_text(to_toml(self.settings(index, port)))
        return ImagegateProcess(f"api-{index}", ["serve", "--config", str(config), "--log-level", "info"],
                                self.root, self.env, port)

    # lifecycle

    async def start(self) -> None:
        self.start_block = await self.chain.block_number() + 1
        if self.options.warm_up:
            await self.chain.mint(payer_address(WARM_UP_PAYER_KEY), 10**8)  # 100 test USDC
        self.facilitator.start()
        await self.facilitator.wait_until("/supported", self.options.startup_timeout_s)
        if self.options.before_apis is not None:
            await self.options.before_apis(self)
        for api in self.apis:
            api.start()
        await asyncio.gather(*(self.wait_ready(api) for api in self.apis))
        if self.options.warm_up:
            await asyncio.gather(*(self.warm_up(api) for api in self.apis))

    async def warm_up(self, api: ImagegateProcess) -> None:
        body = {"prompt": "a small red circle", "model": MODEL, "width": 128, "height": 128, "steps": 2}
        paid = await post_with_payment(f"{api.base_url}/v1/images/generate", body, WARM_UP_PAYER_KEY,
                                       max_atomic=await self.price(body))
        assert paid.status == 200, (api.name, paid.body, api.log_tail())

    async def wait_ready(self, api: ImagegateProcess) -> None:
        await api.wait_until("/v1/images/models", self.options.startup_timeout_s)

    async def restart(self, api: ImagegateProcess) -> None:
        api.start()
        await self.wait_ready(api)
        if self.options.warm_up:
            await self.warm_up(api)

    def stop(self) -> None:
        for process in [*self.apis, self.facilitator]:
            process.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail(2500)}" for p in [*self.apis, self.facilitator])

    # paying

    async def price(self, body: dict[str, Any]) -> int:
        async with httpx.AsyncClient(base_url=self.apis[0].base_url, timeout=60, trust_env=False) as http:
            response = await http.post("/v1/images/estimate", json=body)
            response.raise_for_status()
            return int(response.json()["estimatedCost"]["amount"])

    async def sign(self, body: dict[str, Any], payer_key: str = devchain.PAYER_ACCOUNT.private_key) -> SignedPayment:
        terms = Terms(amount=await self.price(body))
        payload = sign(terms, payer_key)
        return SignedPayment(v2_header(terms, payload), terms, payload["authorization"]["from"])

    async def new_payers(self, count: int, funds: int = 10 * 10**devchain.TOKEN_DECIMALS) -> list[str]:
        """Private keys of ``count`` fresh accounts holding ``funds`` test USDC each (gasless: EIP-3009)."""
        keys = ["0x" + Account.create().key.hex().removeprefix("0x") for _ in range(count)]
        for key in keys:
            await self.chain.mint(payer_address(key), funds)
        return keys

    # looking inside

    @asynccontextmanager
    async def ledger(self) -> AsyncIterator[SqlLedger]:
        ledger = SqlLedger(self.database_url)
        try:
            yield ledger
        finally:
            await ledger.aclose()

    async def payment(self, key: str) -> PaymentRecord | None:
        async with self.ledger() as ledger:
            return await ledger.payment(key)

    async def generations_paid_by(self, key: str) -> list[GenerationRecord]:
        async with self.ledger() as ledger:
            found = []
            for status in GenerationStatus:
                found += [g for g in await ledger.generations_with_status(status) if g.payment_key == key]
            return found

    async def books(self) -> Books:
        chain = self.chain
        transfers = [t for t in await chain.token_transfers(from_block=self.start_block)
                     if t.recipient == PAY_TO and t.sender != ZERO_ADDRESS]
        settlements = await chain.transactions_to(devchain.USDC_ADDRESS, from_block=self.start_block)
        async with self.ledger() as ledger:
            revenue = sum(row.revenue_micros for row in await ledger.revenue_by_model())
            completed = await ledger.generations_with_status(GenerationStatus.COMPLETED)
        return Books(transfers, revenue, completed, [tx for tx in settlements if tx.status != 1])

    async def wait_until_settled(self, timeout_s: float | None = None) -> None:
        """Until nothing is in flight: no payment reserved, settling or pending, no generation settling
        (reconciliation has finished what dead processes left; give it stale_after_s). A generation whose
        process died mid-render stays "running", with nothing staged and its payment released."""
        in_flight_payments = (PaymentStatus.RESERVED, PaymentStatus.SETTLING, PaymentStatus.PENDING)
        in_flight_generations = (GenerationStatus.SETTLING, GenerationStatus.SETTLEMENT_PENDING)
        deadline = time.monotonic() + (timeout_s or self.options.stale_after_s + 120)
        async with self.ledger() as ledger:
            while True:
                left = [p.key for status in in_flight_payments for p in await ledger.payments_with_status(status)]
                left += [g.id for status in in_flight_generations for g in await ledger.generations_with_status(status)]
                if not left:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"still in flight: {left}")
                await asyncio.sleep(0.5)

    async def check_books(self) -> Books:
        """What must hold after any run, faults included: the money agrees on chain, in the ledger and per
        generation; no settlement reverted; every settled payment's generation is completed; every completed
        generation's images are published once, and none of them is left staged."""
        books = await self.books()
        charged = sum(generation.charged_amount for generation in books.completed)
        assert books.transferred == books.ledger_revenue == charged, (books.transferred, books.ledger_revenue, charged)
        assert books.reverted == []
        async with self.ledger() as ledger:
            for payment in await ledger.payments_with_status(PaymentStatus.SETTLED):
                assert payment.generation_id is not None
                generation = await ledger.generation(payment.generation_id)
                assert generation is not None and generation.status is GenerationStatus.COMPLETED, payment
        published, staged = self.object_versions("images"), self.object_versions("staging")
        for generation in books.completed:
            for image in generation.images:
                name = f"{image['uuid']}.{OutputFormat(image['format']).extension}"
                assert published.get(f"{PREFIX}images/{name}") == 1, (name, published)
                assert published.get(f"{PREFIX}images/{image['uuid']}.json") == 1
                assert f"{PREFIX}staging/{name}" not in staged or self._deleted(f"{PREFIX}staging/{name}")
        return books

    def _deleted(self, key: str) -> bool:
        """Whether ``key``'s newest version is a delete marker (staged, then moved on)."""
        listing = self.s3.client().list_object_versions(Bucket=self.bucket, Prefix=key)
        return any(marker["Key"] == key and marker["IsLatest"] for marker in listing.get("DeleteMarkers", []))

    def object_versions(self, folder: str) -> dict[str, int]:
        """Versions of each key under ``<prefix><folder>/`` (the bucket is versioned)."""
        return self.s3.versions(self.bucket, f"{PREFIX}{folder}/")

    def object_bytes(self, key: str) -> bytes:
        data: bytes = self.s3.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return data


@asynccontextmanager
async def running_cluster(root: Path, postgres: PostgresServer, s3: MotoS3Server, chain: devchain.DevChain,
                          options: ClusterOptions | None = None) -> AsyncIterator[Cluster]:
    cluster = Cluster(root, postgres, s3, chain, options or ClusterOptions())
    try:
        await cluster.start()
        yield cluster
    except BaseException:
        print(cluster.logs(), file=sys.stderr)  # the processes' own words, in the failing test's report
        raise
    finally:
        cluster.stop()
