"""Payment configuration that would lose money is refused before the server starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imagegate import devchain
from imagegate.config import load_settings
from imagegate.payments import PaymentConfigError, validate_payment_settings

OPERATOR = "0x1111111111111111111111111111111111111111"


def settings(**payments: Any) -> Any:
    return load_settings(payments={"mode": "network", **payments})


def test_mainnet_needs_pay_to_and_a_facilitator() -> None:
    with pytest.raises(PaymentConfigError, match="pay_to"):
        validate_payment_settings(settings(options=[{"network": "base"}],
                                           facilitator={"kind": "http", "url": "https://f.example"}))
    with pytest.raises(PaymentConfigError, match="facilitator"):
        validate_payment_settings(settings(options=[{"network": "base", "pay_to": OPERATOR}]))
    validate_payment_settings(settings(options=[{"network": "base", "pay_to": OPERATOR}],
                                       facilitator={"kind": "http", "url": "https://f.example"}))


def test_mainnet_refuses_well_known_test_keys_and_addresses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PaymentConfigError, match="public test account"):
        validate_payment_settings(settings(options=[{"network": "base", "pay_to": devchain.PAY_TO_ACCOUNT.address}],
                                           facilitator={"kind": "http", "url": "https://f.example"}))
    monkeypatch.setenv("IMAGEGATE_FACILITATOR_KEY", devchain.FACILITATOR_ACCOUNT.private_key)
    with pytest.raises(PaymentConfigError, match="public test key"):
        validate_payment_settings(settings(options=[{"network": "base", "pay_to": OPERATOR}],
                                           facilitator={"kind": "builtin", "rpc_url": "https://rpc.example"}))
    key_file = tmp_path / "key"
    key_file.write_text("0x" + "ab" * 32)
    monkeypatch.delenv("IMAGEGATE_FACILITATOR_KEY")
    validate_payment_settings(settings(options=[{"network": "base", "pay_to": OPERATOR}],
                                       facilitator={"kind": "builtin", "rpc_url": "https://rpc.example",
                                                    "private_key_file": str(key_file)}))


def test_testnet_and_devchain_are_allowed() -> None:
    validate_payment_settings(load_settings())
    validate_payment_settings(settings(options=[{"network": "base-sepolia", "pay_to": OPERATOR}]))


def test_serve_refuses_loudly(tmp_path: Path) -> None:
    import logging

    from typer.testing import CliRunner

    from imagegate.cli import cli

    config = tmp_path / "imagegate.toml"
    config.write_text('[payments]\nmode = "network"\n[[payments.options]]\nnetwork = "base"\n')
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        result = CliRunner().invoke(cli, ["serve", "--config", str(config)])
    finally:
        # `serve` routes logging to the runner's stderr, which is closed once the runner returns.
        root.handlers[:] = handlers
        root.setLevel(level)
    assert result.exit_code == 2
    assert "Refusing to start" in result.output
