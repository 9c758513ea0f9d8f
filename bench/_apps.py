"""App factories for the benchmarks, started by ``uvicorn --factory`` in a subprocess.

Configuration comes from environment variables set by the bench scripts: BENCH_ROOT (data dir),
BENCH_TINY_FLUX (tiny pipeline dir), BENCH_RPC_URL, BENCH_PAYMENTS, BENCH_GAS_KEYS (imagegate's
facilitator), BENCH_SDK_GAS_KEY and BENCH_PRICE (the SDK middleware's route).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from imagegate import devchain
from imagegate.app import app_from_settings
from imagegate.config import load_settings


def _with_hello(app: FastAPI) -> FastAPI:
    @app.post("/bench/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    return app


def imagegate_app() -> FastAPI:
    """imagegate on the tiny FLUX pipeline; paid through the dev chain when BENCH_PAYMENTS=1."""
    root = Path(os.environ["BENCH_ROOT"])
    payments: dict[str, Any] = {"enabled": False}
    if os.environ.get("BENCH_PAYMENTS") == "1":
        key_file = root / "facilitator.key"
        key_file.write_text(devchain.FACILITATOR_ACCOUNT.private_key)
        payments = {
            "mode": "network",
            "options": [{"network": "base-sepolia", "pay_to": devchain.PAY_TO_ACCOUNT.address}],
            "facilitator": {"kind": "builtin", "rpc_url": os.environ["BENCH_RPC_URL"],
                            "private_key_file": str(key_file)},
        }
    settings = load_settings(
        data_dir=root,
        storage={"directory": str(root / "images")},
        diffusers={"cpu_threads": int(os.environ.get("BENCH_THREADS", "1")), "allow_downloads": False},
        catalog={"default_model": "flux-schnell"},
        models={"flux-schnell": {"source": os.environ["BENCH_TINY_FLUX"], "requires_cuda": False,
                                 "dtype": "float32", "memory_gb": 0.05}},
        payments=payments,
    )
    return _with_hello(app_from_settings(settings))


def hello_app() -> FastAPI:
    """A plain FastAPI app with one bare hello route: the yardstick for the 402 challenge's rate."""
    app = FastAPI()

    @app.post("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def gate_app() -> FastAPI:
    """imagegate with the benchmark-only simulated model enabled (0 ms renders) and, for the record,
    its embedded imagegate-tiny; paid on the chain at BENCH_RPC_URL by its builtin facilitator with the
    gas key(s) in BENCH_GAS_KEYS (comma-separated)."""
    root = Path(os.environ["BENCH_ROOT"])
    root.mkdir(parents=True, exist_ok=True)
    key_file = root / "facilitator.key"
    key_file.write_text(os.environ["BENCH_GAS_KEYS"])
    settings = load_settings(
        data_dir=root,
        storage={"directory": str(root / "images")},
        # One torch thread: on a machine whose cores are shared, more threads spin against each other.
        diffusers={"allow_downloads": False, "cpu_threads": 1},
        catalog={"default_model": "imagegate-tiny"},
        models={"bench-simulated": {"enabled": True, "options": {"batch_ms": 0, "image_ms": 0}}},
        payments={
            "mode": "network",
            "options": [{"network": "base-sepolia", "pay_to": devchain.PAY_TO_ACCOUNT.address}],
            "facilitator": {"kind": "builtin", "rpc_url": os.environ["BENCH_RPC_URL"],
                            "private_key_file": str(key_file)},
        },
    )
    return app_from_settings(settings)


def sdk_middleware_app() -> FastAPI:
    """The x402 SDK's own FastAPI middleware on a fixed-price route, with the same builtin facilitator."""
    from x402 import x402Facilitator, x402ResourceServer
    from x402.http import PaymentOption, RouteConfig
    from x402.http.middleware.fastapi import PaymentMiddlewareASGI
    from x402.mechanisms.evm import FacilitatorWeb3Signer
    from x402.mechanisms.evm.exact import ExactEvmServerScheme, register_exact_evm_facilitator
    from x402.schemas import AssetAmount

    facilitator = x402Facilitator()
    signer = FacilitatorWeb3Signer(private_key=os.environ.get("BENCH_SDK_GAS_KEY",
                                                              devchain.FACILITATOR_ACCOUNT.private_key),
                                   rpc_url=os.environ["BENCH_RPC_URL"])
    register_exact_evm_facilitator(facilitator, signer, networks=devchain.NETWORK_V2)
    resource_server = x402ResourceServer(facilitator)
    resource_server.register(devchain.NETWORK_V2, ExactEvmServerScheme())
    price = AssetAmount(amount=os.environ.get("BENCH_PRICE", "435"), asset=devchain.USDC_ADDRESS,
                        extra={"name": devchain.TOKEN_NAME, "version": devchain.TOKEN_VERSION})
    routes = {"POST /paid": RouteConfig(accepts=PaymentOption(scheme="exact", pay_to=devchain.PAY_TO_ACCOUNT.address,
                                                              price=price, network=devchain.NETWORK_V2),
                                        mime_type="application/json")}
    app = FastAPI()

    @app.post("/paid")
    async def paid() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(PaymentMiddlewareASGI, routes=routes, server=resource_server)
    return app
