"""What the browser tests drive the playground with: Debian's chromium through Playwright, a wallet
injected into the page whose answers (and signatures, with an anvil test key) come from this process,
and direct reads of the chain the server pays on."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_utils.abi import function_signature_to_4byte_selector
from playwright.sync_api import Browser, BrowserContext, Page

from imagegate import devchain

REPO = Path(__file__).resolve().parents[2]
AXE_SOURCE = REPO / "web" / "node_modules" / "axe-core" / "axe.min.js"
SCREENSHOTS = REPO / "tmp" / "playground-screenshots"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}

# Anvil's well-known test keys 3-6 (0-2 and 9 have roles on the dev chain): the browser wallets.
ANVIL_KEYS = (
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
)


def chromium_executable() -> str:
    """Debian's chromium (scripts/setup --tests installs it); Playwright's own browsers are not used."""
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError("chromium is not installed: run ./scripts/setup --tests (it installs Debian's chromium)")
    return path


def _selector(signature: str) -> str:
    return "0x" + function_signature_to_4byte_selector(signature).hex()


class Chain:
    """Direct JSON-RPC reads and test-only writes on the chain the server settles on."""

    def __init__(self, rpc_url: str):
        self.rpc_url = rpc_url
        self._http = httpx.Client(timeout=10, trust_env=False)

    def rpc(self, method: str, *params: Any) -> Any:
        answer = self._http.post(self.rpc_url, json={"jsonrpc": "2.0", "id": 1, "method": method,
                                                     "params": list(params)}).json()
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def usdc_balance(self, address: str) -> int:
        data = _selector("balanceOf(address)") + abi_encode(["address"], [address]).hex()
        (balance,) = abi_decode(["uint256"], bytes.fromhex(self.rpc("eth_call", {"to": devchain.USDC_ADDRESS,
                                                                                 "data": data}, "latest")[2:]))
        return int(balance)

    def mint(self, address: str, amount: int) -> None:
        """Test USDC for ``address``, sent by the dev chain's admin account (anvil keeps it unlocked)."""
        data = _selector("mint(address,uint256)") + abi_encode(["address", "uint256"], [address, amount]).hex()
        tx_hash = self.rpc("eth_sendTransaction", {"from": devchain.ADMIN_ACCOUNT.address,
                                                   "to": devchain.USDC_ADDRESS, "data": data})
        deadline = time.monotonic() + 20
        while self.rpc("eth_getTransactionReceipt", tx_hash) is None:
            assert time.monotonic() < deadline, "the mint was not mined"
            time.sleep(0.05)

    def set_automine(self, enabled: bool) -> None:
        self.rpc("evm_setAutomine", enabled)

    def close(self) -> None:
        self._http.close()


INJECTED_WALLET_SCRIPT = """
((binding, name, uuid) => {
  const listeners = {};
  const emit = (name, data) => (listeners[name] || []).slice().forEach((listener) => listener(data));
  const provider = {
    async request({ method, params }) {
      const answer = await window[binding](method, params ?? []);
      if (answer.error) {
        const error = new Error(answer.error.message);
        error.code = answer.error.code;
        throw error;
      }
      if (answer.emit) setTimeout(() => emit(answer.emit[0], answer.emit[1]), 0);
      return answer.result;
    },
    on(name, listener) { (listeners[name] ||= []).push(listener); },
    removeListener(name, listener) { listeners[name] = (listeners[name] || []).filter((l) => l !== listener); },
  };
  const info = Object.freeze({
    uuid,
    name,
    icon: "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 8 8'%3E"
      + "%3Crect width='8' height='8' fill='%23444'/%3E%3C/svg%3E",
    rdns: `org.imagegate.${binding}`,
  });
  const announce = () =>
    window.dispatchEvent(new CustomEvent("eip6963:announceProvider", { detail: Object.freeze({ info, provider }) }));
  window.addEventListener("eip6963:requestProvider", announce);
  announce();
})"""


@dataclass
class InjectedWallet:
    """An EIP-1193 wallet announced through EIP-6963. Accounts, chain and signatures are answered
    here: ``eth_signTypedData_v4`` is signed with ``private_key`` (eth-account), other reads are
    forwarded to ``rpc_url`` as a wallet's own node would answer them."""

    private_key: str
    rpc_url: str
    name: str = "Test Wallet"
    chain_id: int = devchain.CHAIN_ID
    refuse_signatures: bool = False
    # Networks the wallet knows; switching to another one fails with 4902 until it is added.
    known_chains: set[int] = field(default_factory=lambda: {1, devchain.CHAIN_ID})
    calls: list[str] = field(default_factory=list)
    added_chains: list[dict[str, Any]] = field(default_factory=list)
    signed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def address(self) -> str:
        address: str = Account.from_key(self.private_key).address
        return address

    def install(self, context: BrowserContext) -> None:
        """Announce this wallet in every page of ``context`` (several wallets may share a context)."""
        binding = "testWallet" + hashlib.sha256(self.name.encode()).hexdigest()[:12]
        identifier = str(uuid.uuid5(uuid.NAMESPACE_URL, binding))
        context.expose_function(binding, self._answer)
        context.add_init_script(f"{INJECTED_WALLET_SCRIPT}({json.dumps(binding)}, {json.dumps(self.name)}, "
                                f"{json.dumps(identifier)});")

    def _answer(self, method: str, params: list[Any]) -> dict[str, Any]:
        self.calls.append(method)
        match method:
            case "eth_requestAccounts" | "eth_accounts":
                return {"result": [self.address]}
            case "eth_chainId":
                return {"result": hex(self.chain_id)}
            case "wallet_switchEthereumChain":
                wanted = int(params[0]["chainId"], 16)
                if wanted not in self.known_chains:
                    return {"error": {"code": 4902, "message": f"Unrecognized chain ID {hex(wanted)}."}}
                self.chain_id = wanted
                return {"result": None, "emit": ["chainChanged", hex(self.chain_id)]}
            case "wallet_addEthereumChain":
                self.added_chains.append(params[0])
                self.known_chains.add(int(params[0]["chainId"], 16))
                return {"result": None}
            case "eth_signTypedData_v4":
                if self.refuse_signatures:
                    return {"error": {"code": 4001, "message": "User rejected the request."}}
                typed = json.loads(params[1])
                assert params[0].lower() == self.address.lower()
                signed = Account.sign_typed_data(self.private_key, full_message=typed)
                self.signed.append(typed)
                return {"result": "0x" + signed.signature.hex().removeprefix("0x")}
            case _:
                answer = httpx.post(self.rpc_url, json={"jsonrpc": "2.0", "id": 1, "method": method,
                                                        "params": params}, timeout=10, trust_env=False).json()
                return {"result": answer["result"]} if "error" not in answer else {"error": answer["error"]}


@dataclass
class OpenedPage:
    context: BrowserContext
    page: Page
    # Problems the page met: CSP violations, uncaught errors, requests to any other host.
    problems: list[str]
    # Every POST to the generate route: the payment header it carried ("" for none).
    generate_posts: list[str]

    def close(self) -> None:
        self.context.close()


def open_playground(browser: Browser, base_url: str, *, wallet: InjectedWallet | None = None,
                    other_wallets: tuple[InjectedWallet, ...] = (),
                    viewport: dict[str, int] = DESKTOP, setup: Callable[[BrowserContext], None] | None = None
                    ) -> OpenedPage:
    context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
    for announced in (wallet, *other_wallets):
        if announced is not None:
            announced.install(context)
    if setup is not None:
        setup(context)
    page = context.new_page()
    page.set_default_timeout(60_000)
    problems: list[str] = []
    generate_posts: list[str] = []
    page.on("console", lambda message: problems.append(message.text)
            if "Content Security Policy" in message.text else None)
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))

    def on_request(request: Any) -> None:
        if not request.url.startswith((f"{base_url}/", "data:")):
            problems.append(f"request to another host: {request.url}")
        if request.method == "POST" and request.url.endswith("/v1/images/generate"):
            headers = request.headers
            generate_posts.append(next((name for name in ("payment-signature", "x-payment") if name in headers), ""))

    page.on("request", on_request)
    page.goto(f"{base_url}/")
    page.get_by_role("heading", name="Settings").wait_for()
    return OpenedPage(context, page, problems, generate_posts)


def serious_accessibility_violations(page: Page) -> list[str]:
    """axe-core (from web/node_modules) run in the page: violations of impact serious or critical."""
    page.evaluate(AXE_SOURCE.read_text(encoding="utf-8"))
    violations = page.evaluate(
        """async () => (await axe.run(document, { resultTypes: ["violations"] })).violations
            .filter((v) => v.impact === "serious" || v.impact === "critical")
            .map((v) => `${v.id} (${v.impact}): ${v.help} at ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`)"""
    )
    return list(violations)


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def tab_to(page: Page, accessible_text: str, *, limit: int = 60) -> None:
    """Press Tab until the focused element's text or label contains ``accessible_text`` (keyboard only)."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        focused = page.evaluate(
            """() => { const e = document.activeElement; if (!e || e === document.body) return "";
                 const label = e.labels && e.labels[0] ? e.labels[0].textContent : "";
                 return [e.textContent, label, e.getAttribute("aria-label")].join(" "); }"""
        )
        if accessible_text in focused:
            return
    raise AssertionError(f"{accessible_text!r} is not reachable with the Tab key")
