"""The playground in a real browser against a real imagegate on its embedded dev chain.

One server (dev chain, tiny local pipelines) and one chromium for the module. Browser wallets are
injected into the page (EIP-1193 announced through EIP-6963); their typed-data signatures are made
here with anvil test keys. Money is checked on the chain itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from imagegate import devchain
from imagegate.app import app_from_settings
from tests.integration.conftest import tiny_settings
from tests.playground.support import (
    ANVIL_KEYS,
    DESKTOP,
    PHONE,
    Chain,
    InjectedWallet,
    open_playground,
    screenshot,
    serious_accessibility_violations,
    tab_to,
)
from tests.support.server import live_server

PROMPT = "a large orange triangle on a blue background"
ONE_USDC = 10**6
SLOW_RENDER_MS = 6000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_paths: dict[str, Path]) -> Iterator[str]:
    root = tmp_path_factory.mktemp("playground-devchain")
    # The embedded defaults' payments: imagegate starts its own anvil dev chain. A simulated GPU that
    # holds each render a while, and no waiting line, make a busy model on demand.
    settings = tiny_settings(root, tiny_model_paths, workers={"max_queue": 0}, models={
        "bench-simulated": {"enabled": True, "options": {"batch_ms": SLOW_RENDER_MS}}})
    with live_server(app_from_settings(settings), startup_timeout=120) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def chain(server: str) -> Iterator[Chain]:
    config = httpx.get(f"{server}/playground/config", timeout=10, trust_env=False).json()
    reader = Chain(config["payments"]["chain"]["rpcUrls"][0])
    yield reader
    reader.close()


def funded_wallet(chain: Chain, key: str, amount: int = ONE_USDC) -> InjectedWallet:
    wallet = InjectedWallet(key, chain.rpc_url)
    if chain.usdc_balance(wallet.address) < amount:
        chain.mint(wallet.address, amount)
    return wallet


def choose_small_size(page: Page) -> None:
    page.get_by_label("Size", exact=True).select_option(label="1:1 square, 512 × 512")


def price_amount(server: str, body: dict[str, object]) -> int:
    estimate = httpx.post(f"{server}/v1/images/estimate", json=body, timeout=10, trust_env=False).json()
    return int(estimate["estimatedCost"]["amount"])


def test_the_whole_story_pays_from_the_wallet_and_shows_the_images(server: str, chain: Chain, browser: Browser) -> None:
    wallet = funded_wallet(chain, ANVIL_KEYS[0])
    opened = open_playground(browser, server, wallet=wallet)
    page = opened.page
    try:
        expect(page.get_by_role("note")).to_contain_text("local test chain")
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        choose_small_size(page)
        page.get_by_label("Images", exact=True).fill("2")
        amount = price_amount(server, {"width": 512, "height": 512, "numberResults": 2, "outputFormat": "png"})
        usd = f"{amount / 10**6:.6f}"
        expect(page.locator("#price")).to_contain_text(f"${usd}")
        expect(page.locator("#price")).to_contain_text("2 images, 512 × 512")

        page.get_by_role("button", name="Connect Test Wallet").click()
        expect(page.get_by_test_id("balance")).to_have_text("1 USDC")
        before = chain.usdc_balance(wallet.address)
        pay_to_before = chain.usdc_balance(devchain.PAY_TO_ACCOUNT.address)

        page.get_by_role("button", name=f"Pay ${usd} and generate").click()
        images = page.locator(".gallery img")
        expect(images).to_have_count(2)
        expect(page.locator(".status")).to_contain_text(f"Done: 2 images for ${usd}")
        assert wallet.signed and len(wallet.signed) == 1, "one typed-data signature per payment"
        assert wallet.signed[0]["primaryType"] == "TransferWithAuthorization"
        # One unpaid request (answered 402), one paid with the x402 v2 header.
        assert opened.generate_posts == ["", "payment-signature"]

        # The images are real files at permanent URLs, and the payer paid exactly the price shown.
        first_url = images.first.evaluate("img => img.closest('a').href")
        response = page.request.get(first_url)
        assert response.status == 200 and response.headers["content-type"] == "image/png"
        assert response.body()[:8] == b"\x89PNG\r\n\x1a\n"
        assert chain.usdc_balance(wallet.address) == before - amount
        assert chain.usdc_balance(devchain.PAY_TO_ACCOUNT.address) == pay_to_before + amount
        expect(page.get_by_test_id("balance")).to_have_text(f"{(before - amount) / 10**6:.6f}".rstrip("0") + " USDC")

        # The gallery: download link, copy, seed, transaction (no explorer on the dev chain).
        card = page.locator(".image-card").first
        expect(card.get_by_role("link", name="Download")).to_have_attribute("href", first_url)
        download = card.get_by_role("link", name="Download")
        expect(download).to_have_attribute("download", "imagegate-" + first_url.rsplit("/", 1)[1])
        card.get_by_role("button", name="Copy URL").click()
        expect(card.get_by_role("button", name="Copied")).to_be_visible()
        assert page.evaluate("navigator.clipboard.readText()") == first_url
        entry = page.locator(".gallery .entry").first
        expect(entry).to_contain_text("local test chain: no explorer")
        assert entry.locator("a", has_text="block explorer").count() == 0
        seed = int(card.locator(".meta code").inner_text())

        screenshot(page, "desktop-after-payment")
        assert serious_accessibility_violations(page) == []

        # "Use these settings again" brings back the prompt and that image's seed.
        page.get_by_label("Prompt", exact=True).fill("something else")
        card.get_by_role("button", name="Use these settings again").click()
        expect(page.get_by_label("Prompt", exact=True)).to_have_value(PROMPT)
        expect(page.get_by_label("Seed", exact=True)).to_have_value(str(seed))
        expect(page.get_by_label("Size", exact=True)).to_have_value("512x512")
        assert opened.problems == []
    finally:
        opened.close()


def test_a_wallet_on_another_network_is_asked_to_switch(server: str, chain: Chain, browser: Browser) -> None:
    wallet = funded_wallet(chain, ANVIL_KEYS[1])
    wallet.chain_id = 1
    wallet.known_chains = {1}  # it has to add the payment network before switching to it
    opened = open_playground(browser, server, wallet=wallet)
    page = opened.page
    try:
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        choose_small_size(page)
        page.get_by_role("button", name="Connect Test Wallet").click()
        expect(page.get_by_text("Your wallet is on chain 1")).to_be_visible()
        # Paying first explains the network instead of asking for a signature.
        page.get_by_role("button", name="Pay $").click()
        expect(page.get_by_role("alert")).to_contain_text("Wrong network")
        assert wallet.signed == [] and opened.generate_posts == []

        page.get_by_role("alert").get_by_role("button", name="Switch network").click()
        expect(page.get_by_text("Your wallet is on chain 1")).to_have_count(0)
        assert wallet.chain_id == devchain.CHAIN_ID
        assert [call for call in wallet.calls if call.startswith("wallet_")] == [
            "wallet_switchEthereumChain", "wallet_addEthereumChain", "wallet_switchEthereumChain"]
        (added,) = wallet.added_chains
        assert added["chainId"] == hex(devchain.CHAIN_ID) and added["rpcUrls"] == [chain.rpc_url]
        before = chain.usdc_balance(wallet.address)
        page.get_by_role("button", name="Pay $").click()
        expect(page.locator(".gallery img")).to_have_count(1)
        assert chain.usdc_balance(wallet.address) < before
        assert opened.problems == []
    finally:
        opened.close()


def test_a_wallet_without_usdc_sees_insufficient_balance_and_is_not_charged(
        server: str, chain: Chain, browser: Browser) -> None:
    wallet = InjectedWallet(ANVIL_KEYS[2], chain.rpc_url, name="Empty Wallet")
    assert chain.usdc_balance(wallet.address) == 0
    # Two wallets announce themselves (EIP-6963): the visitor picks the empty one.
    other = funded_wallet(chain, ANVIL_KEYS[0])
    opened = open_playground(browser, server, wallet=wallet, other_wallets=(other,))
    page = opened.page
    try:
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        expect(page.locator(".wallet-list button")).to_have_text(["Connect Empty Wallet", "Connect Test Wallet"])
        page.get_by_role("button", name="Connect Empty Wallet").click()
        expect(page.locator(".wallet")).to_contain_text(wallet.address[:6])
        expect(page.get_by_test_id("balance")).to_have_text("0 USDC")
        expect(page.locator(".wallet")).to_contain_text("Insufficient balance")
        page.get_by_role("button", name="Pay $").click()
        expect(page.get_by_role("alert")).to_contain_text("Insufficient balance")
        expect(page.get_by_role("alert")).to_contain_text("Nothing was signed or charged")
        assert wallet.signed == [] and other.signed == [] and opened.generate_posts == []
        assert other.calls == [], "the other wallet was never asked anything"
        assert chain.usdc_balance(wallet.address) == 0
        assert page.locator(".gallery img").count() == 0
    finally:
        opened.close()


def test_a_refused_signature_leaves_everything_as_it_was(server: str, chain: Chain, browser: Browser) -> None:
    wallet = funded_wallet(chain, ANVIL_KEYS[3])
    wallet.refuse_signatures = True
    opened = open_playground(browser, server, wallet=wallet)
    page = opened.page
    try:
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        choose_small_size(page)
        page.get_by_text("More settings").click()
        page.get_by_label("Seed", exact=True).fill("1234")
        page.get_by_role("button", name="Connect Test Wallet").click()
        expect(page.get_by_test_id("balance")).to_contain_text("USDC")
        before = chain.usdc_balance(wallet.address)

        page.get_by_role("button", name="Pay $").click()
        expect(page.get_by_role("alert")).to_contain_text("You declined the signature in your wallet. Nothing was paid")
        assert "eth_signTypedData_v4" in wallet.calls and wallet.signed == []
        assert opened.generate_posts == [""], "only the unpaid request that fetched the price challenge"
        assert chain.usdc_balance(wallet.address) == before
        expect(page.get_by_label("Prompt", exact=True)).to_have_value(PROMPT)
        expect(page.get_by_label("Seed", exact=True)).to_have_value("1234")
        expect(page.get_by_label("Size", exact=True)).to_have_value("512x512")
        expect(page.get_by_role("button", name="Pay $")).to_be_enabled()
        assert page.locator(".gallery img").count() == 0

        # Changing one's mind works from the same state.
        wallet.refuse_signatures = False
        page.get_by_role("button", name="Pay $").click()
        expect(page.locator(".gallery img")).to_have_count(1)
        expect(page.locator(".image-card .meta code").first).to_have_text("1234")
    finally:
        opened.close()


def test_invalid_settings_are_explained_before_any_payment(server: str, chain: Chain, browser: Browser) -> None:
    wallet = funded_wallet(chain, ANVIL_KEYS[0])
    opened = open_playground(browser, server, wallet=wallet)
    page = opened.page
    try:
        page.get_by_role("button", name="Connect Test Wallet").click()
        expect(page.get_by_test_id("balance")).to_contain_text("USDC")
        # No prompt yet: explained on paying, focus on the field.
        page.get_by_role("button", name="Pay $").click()
        expect(page.get_by_role("alert")).to_contain_text("Check the settings")
        expect(page.get_by_label("Prompt", exact=True)).to_be_focused()
        expect(page.locator("#prompt-error")).to_contain_text("at least 2 characters")

        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        page.get_by_label("Size", exact=True).select_option("custom")
        page.get_by_label("Width", exact=True).fill("1000")
        expect(page.locator("#width-error")).to_contain_text("divisible by 64")
        expect(page.get_by_label("Width", exact=True)).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#price")).to_contain_text("No price")
        page.get_by_role("button", name="and generate").click()
        expect(page.get_by_label("Width", exact=True)).to_be_focused()

        # Too many steps for the model: caught here, and by the server's estimate alike.
        page.get_by_label("Width", exact=True).fill("512")
        page.get_by_text("More settings").click()
        page.get_by_label("Steps", exact=True).fill("51")
        expect(page.locator("#steps-error")).to_contain_text("takes 1 to 50 steps")
        page.get_by_label("Steps", exact=True).fill("")

        # A model that cannot run here says why, and nothing is asked of the wallet.
        page.get_by_label("Model", exact=True).select_option("sd-turbo")
        expect(page.get_by_text("Unavailable:")).to_be_visible()
        page.get_by_role("button", name="Pay $").click()
        expect(page.get_by_role("alert")).to_contain_text("This model cannot run now")
        assert wallet.signed == [] and opened.generate_posts == []
    finally:
        opened.close()


def test_the_dev_chain_test_wallet_at_phone_width_with_the_keyboard_alone(
        server: str, chain: Chain, browser: Browser) -> None:
    opened = open_playground(browser, server, viewport=PHONE)
    page = opened.page
    try:
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], "no sideways scrolling"
        expect(page.get_by_text("No browser wallet was found")).to_be_visible()
        screenshot(page, "phone-start")
        assert serious_accessibility_violations(page) == []
        before = chain.usdc_balance(devchain.PAYER_ACCOUNT.address)

        tab_to(page, "Skip to the prompt")
        page.keyboard.press("Enter")
        expect(page.get_by_label("Prompt", exact=True)).to_be_focused()
        page.keyboard.type(PROMPT)
        tab_to(page, "Size")
        page.keyboard.press("ArrowDown")  # the first preset: 512 × 512
        expect(page.get_by_label("Size", exact=True)).to_have_value("512x512")
        tab_to(page, "Pay with the dev-chain test wallet")
        page.keyboard.press("Enter")
        expect(page.get_by_text("Dev-chain test wallet", exact=True)).to_be_visible()
        expect(page.get_by_role("heading", name="Wallet")).to_be_focused()
        tab_to(page, "and generate")
        page.keyboard.press("Enter")
        expect(page.locator(".gallery img")).to_have_count(1)
        # Focus moves to the new images for keyboard and screen-reader users.
        expect(page.locator(".gallery h3").first).to_be_focused()
        amount = price_amount(server, {"width": 512, "height": 512, "outputFormat": "png"})
        assert chain.usdc_balance(devchain.PAYER_ACCOUNT.address) == before - amount

        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        screenshot(page, "phone-after-payment")
        assert serious_accessibility_violations(page) == []
        page.set_viewport_size(DESKTOP)
        screenshot(page, "desktop-test-wallet")
        assert opened.problems == []
    finally:
        opened.close()


def test_the_config_route_offers_the_test_wallet_only_on_the_dev_chain(server: str, chain: Chain) -> None:
    config = httpx.get(f"{server}/playground/config", timeout=10, trust_env=False).json()
    payments = config["payments"]
    assert payments["testChain"] is True and payments["chain"]["explorerUrl"] is None
    assert payments["chain"]["chainId"] == devchain.CHAIN_ID and payments["network"] == devchain.NETWORK_V2
    assert config["testWallet"] == {"address": devchain.PAYER_ACCOUNT.address,
                                    "privateKey": devchain.PAYER_ACCOUNT.private_key}
    balance = httpx.get(f"{server}/{payments['balanceUrl']}/{devchain.PAYER_ACCOUNT.address}", timeout=10,
                        trust_env=False)
    assert balance.status_code == 200
    assert int(balance.json()["amount"]) == chain.usdc_balance(devchain.PAYER_ACCOUNT.address)
    bad = httpx.get(f"{server}/{payments['balanceUrl']}/0x123", timeout=10, trust_env=False)
    assert bad.status_code == 400 and bad.json()["error"] == "INVALID_PARAMETER"


def test_a_busy_model_is_explained_and_nothing_is_charged(server: str, chain: Chain, browser: Browser) -> None:
    first = open_playground(browser, server)
    wallet = funded_wallet(chain, ANVIL_KEYS[1])
    second = open_playground(browser, server, wallet=wallet)
    try:
        for opened in (first, second):
            opened.page.get_by_label("Prompt", exact=True).fill(PROMPT)
            opened.page.get_by_label("Model", exact=True).select_option("bench-simulated")
        first.page.get_by_role("button", name="Pay with the dev-chain test wallet").click()
        first.page.get_by_role("button", name="Pay $").click()
        # Busy once the first render holds the model's only slot: an unpaid request then gets 503
        # MODEL_BUSY instead of a price challenge (and takes no slot itself).
        deadline = time.monotonic() + 60
        while True:
            probe = httpx.post(f"{server}/v1/images/generate", json={"prompt": PROMPT, "model": "bench-simulated"},
                               timeout=30, trust_env=False)
            if probe.status_code == 503:
                break
            assert probe.status_code == 402 and time.monotonic() < deadline, probe.text
            time.sleep(0.05)

        page = second.page
        page.get_by_role("button", name="Connect Test Wallet").click()
        expect(page.get_by_test_id("balance")).to_contain_text("USDC")
        before = chain.usdc_balance(wallet.address)
        page.get_by_role("button", name="Pay $").click()
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("The model is busy")
        expect(alert).to_contain_text("Nothing was charged")
        expect(alert).to_contain_text("Try again in about")
        assert wallet.signed == [] and second.generate_posts == [""]
        assert chain.usdc_balance(wallet.address) == before
        # The first visitor's images arrive as usual.
        expect(first.page.locator(".gallery img")).to_have_count(1)
        assert first.problems == [] and second.problems == []
    finally:
        first.close()
        second.close()
