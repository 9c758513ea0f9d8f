"""The playground: the web page for people, served at ``GET /`` to browsers.

A request whose ``Accept`` header ranks HTML above JSON (a browser's) gets the page; JSON clients,
and ``*/*`` from curl or an HTTP library, keep the route manifest. The page is built from ``web/``
(Vite + TypeScript + Preact) by ``scripts/setup`` into ``playground_dist/`` beside this module,
which git ignores. Its content-hashed files are served from ``/static/<name>`` and cached for a year;
the page itself is revalidated on every visit and carries a strict Content-Security-Policy: it loads
nothing from, and sends nothing to, any other host.

``GET /playground/config`` tells the page what the free API routes do not: the payment chain as a
wallet needs it, the request limits, recent render times and, on the embedded dev chain only, the
dev chain's funded test account and a route reading balances there.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from imagegate import devchain, validation
from imagegate.catalog import SPEC_MAX_GUIDANCE, SPEC_MIN_GUIDANCE
from imagegate.errors import InvalidParameter, NotFound, PaymentUnavailable
from imagegate.payments.chain import ChainUnreachable
from imagegate.payments.x402 import X402Gate
from imagegate.service import ImageService
from imagegate.types import OutputFormat

DIST_DIR = Path(__file__).with_name("playground_dist")
IMMUTABLE_CACHE = "public, max-age=31536000, immutable"
STATIC_MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".woff2": "font/woff2",
}
COMPRESSIBLE = {".js", ".css", ".svg"}
_STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


@dataclass(frozen=True)
class ChainFacts:
    """What a wallet needs to switch to (or add) a payment network; the URLs are handed to the
    wallet or shown as links, never fetched by the page."""

    chain_id: int
    name: str
    rpc_urls: tuple[str, ...]
    explorer_url: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "chainId": self.chain_id,
            "name": self.name,
            "rpcUrls": list(self.rpc_urls),
            "explorerUrl": self.explorer_url,
            "nativeCurrency": {"name": "Ether", "symbol": "ETH", "decimals": 18},
        }


PUBLIC_CHAINS = {
    "eip155:8453": ChainFacts(8453, "Base", ("https://mainnet.base.org",), "https://basescan.org"),
    "eip155:84532": ChainFacts(84532, "Base Sepolia", ("https://sepolia.base.org",), "https://sepolia.basescan.org"),
}

NOT_BUILT_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>imagegate: the playground is not built</title></head>
<body><main>
<h1>The playground page is not built</h1>
<p>This imagegate serves its API, but the web page for browsers was not built on this machine.
Run <code>./scripts/setup</code> in the imagegate checkout (it builds <code>web/</code> with npm),
then reload this page; no restart is needed.</p>
<p>Programs are not affected: <code>GET /</code> with <code>Accept: application/json</code> lists the
routes, and <a href="openapi.json">openapi.json</a> describes them.</p>
</main></body></html>
"""


def prefers_html(accept: str | None) -> bool:
    """Whether an Accept header ranks ``text/html`` strictly above ``application/json``.

    Browsers send ``text/html,...,*/*;q=0.8``; curl and HTTP libraries send ``*/*`` (a tie, so the
    manifest as before). Each type's quality is that of its most specific matching range (RFC 9110
    §12.5.1); a dozen lines rather than a dependency for one decision.
    """
    if not accept:
        return False
    ranges: list[tuple[str, str, float]] = []
    for part in accept.split(","):
        media, *params = part.strip().split(";")
        main, _, sub = media.strip().lower().partition("/")
        quality = 1.0
        for param in params:
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        ranges.append((main, sub, quality))

    def quality_of(main: str, sub: str) -> float:
        best: tuple[int, float] = (-1, 0.0)
        for range_main, range_sub, quality in ranges:
            if (range_main, range_sub) == (main, sub):
                specificity = 2
            elif (range_main, range_sub) == (main, "*"):
                specificity = 1
            elif (range_main, range_sub) == ("*", "*"):
                specificity = 0
            else:
                continue
            if specificity > best[0]:
                best = (specificity, quality)
        return best[1]

    return quality_of("text", "html") > quality_of("application", "json")


def content_security_policy(image_origin: str | None) -> str:
    # data: images are the wallets' EIP-6963 icons (the standard makes them data URIs).
    images = " ".join(filter(None, ["'self'", "data:", image_origin]))
    return "; ".join([
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        f"img-src {images}",
        "connect-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])


class Playground:
    """The page, its static files and its config route, served from ``dist_dir``."""

    def __init__(self, dist_dir: Path = DIST_DIR, *, public_base_url: str | None = None):
        self.dist_dir = dist_dir
        image_origin = None
        if public_base_url:
            parts = urlsplit(public_base_url)
            image_origin = f"{parts.scheme}://{parts.netloc}"
        self.csp = content_security_policy(image_origin)
        self._index: tuple[tuple[int, int], bytes, str] | None = None
        self._gzipped: dict[str, bytes] = {}
        self.router = APIRouter(include_in_schema=False)
        self.router.add_api_route("/static/{name}", self.static_file, methods=["GET"])
        self.router.add_api_route("/playground/config", self.config, methods=["GET"])
        self.router.add_api_route("/playground/devchain/balance/{address}", self.devchain_balance, methods=["GET"])

    def _read_index(self) -> tuple[bytes, str] | None:
        """The built page and its ETag, re-read only when a rebuild changed the file."""
        index = self.dist_dir / "index.html"
        try:
            stat = index.stat()
        except FileNotFoundError:
            return None
        key = (stat.st_mtime_ns, stat.st_size)
        if self._index is None or self._index[0] != key:
            body = index.read_bytes()
            self._index = (key, body, f'"{hashlib.sha256(body).hexdigest()[:32]}"')
        return self._index[1], self._index[2]

    def page(self, request: Request) -> Response:
        """``GET /`` for a browser: the page, or a plain explanation when it was never built."""
        headers = {**SECURITY_HEADERS, "Vary": "Accept", "Content-Security-Policy": self.csp}
        built = self._read_index()
        if built is None:
            return HTMLResponse(NOT_BUILT_PAGE, status_code=503, headers={**headers, "Cache-Control": "no-store"})
        body, etag = built
        # no-cache: revalidated every visit, so a rebuilt page (new asset hashes) shows at once.
        headers.update({"Cache-Control": "no-cache", "ETag": etag})
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return HTMLResponse(body, headers=headers)

    async def static_file(self, request: Request, name: str) -> Response:
        path = self.dist_dir / "static" / name
        if not _STATIC_NAME.match(name) or not path.is_file():
            raise NotFound(f"No static file {name!r}.")
        media_type = STATIC_MEDIA_TYPES.get(path.suffix, "application/octet-stream")
        headers = {**SECURITY_HEADERS, "Cache-Control": IMMUTABLE_CACHE}
        if path.suffix not in COMPRESSIBLE:
            return FileResponse(path, media_type=media_type, headers=headers)
        headers["Vary"] = "Accept-Encoding"
        if "gzip" not in request.headers.get("accept-encoding", "").lower():
            return FileResponse(path, media_type=media_type, headers=headers)
        # Hashed files never change: each is compressed once (the script is ~440 KB, ~140 KB gzipped).
        compressed = self._gzipped.get(name)
        if compressed is None:
            compressed = self._gzipped[name] = await asyncio.to_thread(gzip.compress, path.read_bytes(), 9)
        return Response(compressed, media_type=media_type, headers={**headers, "Content-Encoding": "gzip"})

    async def config(self, request: Request) -> JSONResponse:
        service: ImageService = request.app.state.service
        body = {
            "payments": self._payments(service),
            "testWallet": (
                {"address": devchain.PAYER_ACCOUNT.address, "privateKey": devchain.PAYER_ACCOUNT.private_key}
                if _dev_chain_gate(service) is not None else None
            ),
            "limits": {
                "minSide": validation.MIN_SIDE,
                "maxSide": validation.MAX_SIDE,
                "sideMultiple": validation.SIDE_MULTIPLE,
                "minPrompt": validation.MIN_PROMPT,
                "maxPrompt": validation.MAX_PROMPT,
                "maxNegativePrompt": validation.MAX_NEGATIVE_PROMPT,
                "minResults": validation.MIN_RESULTS,
                "maxResults": validation.MAX_RESULTS,
                "minGuidance": SPEC_MIN_GUIDANCE,
                "maxGuidance": SPEC_MAX_GUIDANCE,
                "maxSeed": validation.MAX_SEED,
                "outputFormats": [fmt.value for fmt in OutputFormat],
                "defaultOutputFormat": service.output_format.value,
            },
            "typicalSeconds": {
                model_id: round(seconds, 2)
                for model_id in service.catalog
                if (seconds := service.engine.typical_render_s(model_id)) is not None
            },
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    def _payments(self, service: ImageService) -> dict[str, Any]:
        described = service.payments.describe()
        if not described.get("enabled"):
            return {"enabled": False, "testChain": False, "notice": None, "network": None, "networkName": None,
                    "asset": None, "decimals": service.terms.decimals, "payTo": None, "chain": None,
                    "balanceUrl": None}
        option = described["accepts"][0]
        dev_gate = _dev_chain_gate(service)
        if dev_gate is not None and dev_gate.chain is not None:
            chain = ChainFacts(devchain.CHAIN_ID, "imagegate dev chain", (dev_gate.chain.rpc_url,), None)
        else:
            chain = PUBLIC_CHAINS[option["networkId"]]
        return {
            "enabled": True,
            "testChain": dev_gate is not None,
            "notice": described.get("notice"),
            "network": option["networkId"],
            "networkName": option["network"],
            "asset": option["asset"],
            "decimals": service.terms.decimals,
            "payTo": option["payTo"],
            "chain": chain.as_json(),
            "balanceUrl": "playground/devchain/balance" if dev_gate is not None else None,
        }

    async def devchain_balance(self, request: Request, address: str) -> JSONResponse:
        """A test USDC balance on the embedded dev chain (a wallet's RPC for chain 84532 is the
        public Base Sepolia, not this machine's anvil). Not offered on any real network."""
        service: ImageService = request.app.state.service
        gate = _dev_chain_gate(service)
        if gate is None or gate.chain is None:
            raise NotFound("Balances are read here only on the embedded dev chain.")
        if not _ADDRESS.match(address):
            raise InvalidParameter(f"{address!r} is not an address (0x and 40 hex digits).", field="address")
        try:
            amount = await gate.chain.balance_of(gate.options[0].asset, address)
        except ChainUnreachable as exc:
            raise PaymentUnavailable(f"The dev chain cannot be reached: {exc}", retry_after=5) from exc
        return JSONResponse({"address": address, "amount": str(amount), "decimals": service.terms.decimals},
                            headers={"Cache-Control": "no-store"})


def _dev_chain_gate(service: ImageService) -> X402Gate | None:
    """The payment gate when it runs on the embedded dev chain, else None."""
    gate = service.payments
    if isinstance(gate, X402Gate) and gate.describe().get("testChain"):
        return gate
    return None
