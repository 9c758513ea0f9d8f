"""The playground on a real-network configuration ([payments] mode = "network", base-sepolia), with
the chain played by an anvil this module starts: balances read through the wallet's own node,
no test wallet offered, transactions linked to the block explorer, and a settlement whose outcome
is pending explained and then collected with the same signed payment. One server, one chromium."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect

from imagegate.app import app_from_settings
from tests.integration.conftest import network_payments, tiny_settings
from tests.playground.conftest import dev_chain_in_thread
from tests.playground.support import ANVIL_KEYS, Chain, InjectedWallet, open_playground, screenshot
from tests.support.server import live_server

ONE_USDC = 10**6
# The facilitator waits this long for a receipt before it answers "settlement pending".
CONFIRMATION_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    with dev_chain_in_thread() as running:
        reader = Chain(running.rpc_url)
        yield reader
        reader.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_paths: dict[str, Path], chain: Chain) -> Iterator[str]:
    root = tmp_path_factory.mktemp("playground-network")
    payments = network_payments(root, chain.rpc_url, confirmation_timeout_s=CONFIRMATION_TIMEOUT_S)
    with live_server(app_from_settings(tiny_settings(root, tiny_model_paths, payments=payments)),
                     startup_timeout=120) as base_url:
        yield base_url


def test_a_pending_settlement_is_explained_then_collected_with_the_same_payment(
        server: str, chain: Chain, browser: Browser) -> None:
    wallet = InjectedWallet(ANVIL_KEYS[0], chain.rpc_url)
    chain.mint(wallet.address, ONE_USDC)
    opened = open_playground(browser, server, wallet=wallet)
    page = opened.page
    try:
        expect(page.get_by_role("note")).to_have_count(0)  # no test-chain banner on a real network
        expect(page.get_by_role("button", name="dev-chain test wallet")).to_have_count(0)
        page.get_by_label("Prompt", exact=True).fill("a small red circle")
        page.get_by_label("Size", exact=True).select_option("512x512")
        page.get_by_role("button", name="Connect Test Wallet").click()
        # On a real network the balance comes from the wallet's own node (eth_call through EIP-1193).
        expect(page.get_by_test_id("balance")).to_have_text("1 USDC")
        assert "eth_call" in wallet.calls
        expect(page.locator(".wallet")).to_contain_text("Base Sepolia")

        # Blocks stop: the transfer is broadcast but not mined within the facilitator's wait.
        chain.set_automine(False)
        page.get_by_role("button", name="Pay $").click()
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("Payment sent, waiting for the chain")
        expect(alert).to_contain_text("Do not pay again")
        transaction = alert.locator(".hash").inner_text()
        assert transaction.startswith("0x") and len(transaction) == 66
        assert len(wallet.signed) == 1
        assert chain.usdc_balance(wallet.address) == ONE_USDC
        expect(alert.get_by_role("link", name="follow it on the block explorer")).to_have_attribute(
            "href", f"https://sepolia.basescan.org/tx/{transaction}")
        screenshot(page, "desktop-settlement-pending")
        # Paying again for the same settings only checks on the payment already sent.
        page.get_by_role("button", name="Pay $").click()
        expect(page.get_by_role("alert")).to_contain_text("Still waiting for the chain")
        assert len(wallet.signed) == 1

        chain.rpc("evm_mine")
        chain.set_automine(True)
        page.get_by_role("alert").get_by_role("button", name="Check again").click()
        expect(page.locator(".gallery img")).to_have_count(1)
        assert len(wallet.signed) == 1, "collected with the same payment, never a second signature"
        paid = ONE_USDC - chain.usdc_balance(wallet.address)
        assert paid > 0
        link = page.get_by_role("link", name="transaction on the block explorer")
        expect(link).to_have_attribute("href", f"https://sepolia.basescan.org/tx/{transaction}")
        expect(page.get_by_test_id("balance")).to_have_text(f"{(ONE_USDC - paid) / 10**6:.6f}".rstrip("0") + " USDC")
        assert opened.generate_posts == ["", "payment-signature", "payment-signature", "payment-signature"]
        assert opened.problems == []
    finally:
        chain.set_automine(True)
        opened.close()
