"""Payments, chosen by configuration: the x402 gate (embedded dev chain or a real network) or none.

This package is the only place that imports the x402 SDK.
"""

from __future__ import annotations

import logging
from pathlib import Path

from x402.mechanisms.evm.default_assets import get_default_asset

from imagegate import devchain
from imagegate.config import PaymentOptionSettings, Settings
from imagegate.ledger import Ledger
from imagegate.payments.base import FreeGate, PaymentGate
from imagegate.payments.chain import ChainReader
from imagegate.payments.facilitators import BuiltinFacilitator, Facilitator, HttpFacilitator, read_private_keys
from imagegate.payments.x402 import PaymentOption, X402Gate
from imagegate.types import PaymentTerms

log = logging.getLogger(__name__)

NETWORK_IDS = {"base": "eip155:8453", "base-sepolia": "eip155:84532"}
DEVCHAIN_BANNER = (
    "PAYMENTS ARE ON A LOCAL TEST CHAIN: anvil (chain id 84532, posing as base-sepolia) with a test USDC "
    "at the Base Sepolia USDC address. No real money moves. Configure [payments] mode = \"network\" to sell."
)


class PaymentConfigError(ValueError):
    """The payment configuration would lose money or cannot work; the server refuses to start."""


def _option(settings: PaymentOptionSettings, default_pay_to: str | None) -> PaymentOption:
    network_v2 = NETWORK_IDS[settings.network]
    usdc = get_default_asset(network_v2)
    pay_to = settings.pay_to or default_pay_to
    if pay_to is None:
        raise PaymentConfigError(f"[[payments.options]] on {settings.network} needs pay_to (your receiving address).")
    return PaymentOption(
        network_v1=settings.network,
        network_v2=network_v2,
        asset=settings.asset or usdc["asset"],
        asset_name=settings.asset_name or usdc["name"],
        asset_version=settings.asset_version or usdc["version"],
        pay_to=pay_to,
    )


def _check_mainnet(settings: Settings, options: list[PaymentOption], private_keys: list[str]) -> None:
    """On Base mainnet real money moves: refuse configurations that would lose it."""
    if not any(o.network_v1 == "base" for o in options):
        return
    for option in options:
        if devchain.is_well_known_test_address(option.pay_to):
            raise PaymentConfigError(f"pay_to {option.pay_to} is a public test account: anyone can spend from it.")
    if any(devchain.is_well_known_test_key(key) for key in private_keys):
        raise PaymentConfigError("the facilitator key is a public test key; use your own gas key.")
    facilitator = settings.payments.facilitator
    explicit_pay_to = all(o.pay_to for o in settings.payments.options)
    configured = (facilitator.kind == "http" and facilitator.url) or (
        facilitator.kind == "builtin" and facilitator.rpc_url and private_keys
    )
    if not explicit_pay_to or not configured:
        raise PaymentConfigError(
            "refusing to start on Base mainnet without an explicit pay_to and a facilitator "
            "(an http facilitator url, or a builtin facilitator with rpc_url and a gas key)."
        )


def validate_payment_settings(settings: Settings) -> None:
    """The checks ``build_gate`` makes before starting anything, for ``imagegate serve`` to fail early."""
    payments = settings.payments
    if not payments.enabled or payments.mode == "devchain":
        return
    options = [_option(o, None) for o in payments.options]
    keys = read_private_keys(payments.facilitator.private_key_env, payments.facilitator.private_key_file)
    _check_mainnet(settings, options, keys)


async def build_gate(settings: Settings, ledger: Ledger) -> tuple[PaymentGate, PaymentTerms]:
    payments = settings.payments
    if not payments.enabled:
        log.warning("payments are disabled: every generation is free")
        return FreeGate(), PaymentTerms(asset=None, network=None)

    chain_process: devchain.DevChain | None = None
    facilitator_settings = payments.facilitator
    private_keys = read_private_keys(facilitator_settings.private_key_env, facilitator_settings.private_key_file)
    rpc_url = facilitator_settings.rpc_url
    if payments.mode == "devchain":
        state_file = Path(settings.data_dir) / "devchain" / "anvil-state.json"
        state_file.parent.mkdir(parents=True, exist_ok=True)
        chain_process = devchain.DevChain(state_file=state_file)
        await chain_process.start()
        rpc_url = chain_process.rpc_url
        private_keys = private_keys or [devchain.FACILITATOR_ACCOUNT.private_key]
        options = [_option(o, devchain.PAY_TO_ACCOUNT.address) for o in payments.options]
        if any(o.network_v1 != "base-sepolia" for o in options):
            raise PaymentConfigError("the embedded dev chain only poses as base-sepolia")
        rule = "!" * 100
        how = "reattached to the chain left running" if chain_process.reattached else "started"
        log.warning("\n%s\n%s\nDev chain RPC %s (anvil pid %s, %s)\n%s",
                    rule, DEVCHAIN_BANNER, rpc_url, chain_process.pid, how, rule)
    else:
        options = [_option(o, None) for o in payments.options]
        _check_mainnet(settings, options, private_keys)

    facilitator: Facilitator
    if facilitator_settings.kind == "http":
        if not facilitator_settings.url:
            raise PaymentConfigError("[payments.facilitator] kind = \"http\" needs url")
        facilitator = HttpFacilitator(facilitator_settings.url, headers=_resolve_headers(facilitator_settings.headers),
                                      timeout_s=facilitator_settings.timeout_s)
    else:
        if not rpc_url or not private_keys:
            raise PaymentConfigError("the builtin facilitator needs rpc_url and a gas key "
                                     f"(${facilitator_settings.private_key_env} or private_key_file)")
        facilitator = BuiltinFacilitator(private_keys, rpc_url, sorted({o.network_v2 for o in options}),
                                         confirmation_timeout_s=facilitator_settings.confirmation_timeout_s)
    reconcile_rpc = payments.reconcile_rpc_url or rpc_url
    gate = X402Gate(
        options,
        facilitator,
        ledger,
        max_timeout_seconds=payments.max_timeout_seconds,
        chain=ChainReader(reconcile_rpc, log_range=payments.reconcile_log_range) if reconcile_rpc else None,
        in_flight_wait_s=payments.in_flight_wait_s,
        facts={"testChain": chain_process is not None, **({"notice": DEVCHAIN_BANNER} if chain_process else {})},
        on_close=chain_process.stop if chain_process else None,
    )
    return gate, PaymentTerms(asset=options[0].asset, network=options[0].network_v1)


def _resolve_headers(headers: dict[str, str]) -> dict[str, str]:
    """Header values written as ``env:NAME`` are read from the environment (secrets stay out of files)."""
    import os

    resolved = {}
    for name, value in headers.items():
        if value.startswith("env:"):
            env_value = os.environ.get(value.removeprefix("env:"))
            if env_value is None:
                raise PaymentConfigError(f"facilitator header {name} names ${value[4:]}, which is not set")
            value = env_value
        resolved[name] = value
    return resolved
