"""Several gas keys for the builtin facilitator: one a line in the key file, or comma-separated in the
environment variable; a well-known test key among them is refused on Base mainnet."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagegate import devchain
from imagegate.config import load_settings
from imagegate.payments import PaymentConfigError, validate_payment_settings
from imagegate.payments.facilitators import read_private_key, read_private_keys

KEYS = ["0x" + "11" * 32, "0x" + "22" * 32]


def test_keys_from_a_file_one_a_line(tmp_path: Path) -> None:
    key_file = tmp_path / "gas.keys"
    key_file.write_text(f"{KEYS[0]}\n\n  {KEYS[1]}  \n")
    assert read_private_keys("UNSET_VARIABLE", key_file) == KEYS
    assert read_private_key("UNSET_VARIABLE", key_file) == KEYS[0]


def test_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATE_TEST_KEYS", ",".join(KEYS))
    assert read_private_keys("GATE_TEST_KEYS", None) == KEYS
    monkeypatch.delenv("GATE_TEST_KEYS")
    assert read_private_keys("GATE_TEST_KEYS", None) == [] and read_private_key("GATE_TEST_KEYS", None) is None


def test_a_public_test_key_among_several_is_refused_on_mainnet(tmp_path: Path) -> None:
    key_file = tmp_path / "gas.keys"
    key_file.write_text(f"{KEYS[0]}\n{devchain.FACILITATOR_ACCOUNT.private_key}\n")
    settings = load_settings(payments={
        "mode": "network", "options": [{"network": "base", "pay_to": "0x" + "ab" * 20}],
        "facilitator": {"kind": "builtin", "rpc_url": "https://rpc.example", "private_key_file": str(key_file)}})
    with pytest.raises(PaymentConfigError, match="public test key"):
        validate_payment_settings(settings)
