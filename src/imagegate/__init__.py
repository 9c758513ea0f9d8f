"""imagegate: a self-hostable, pay-per-request text-to-image API server (x402, USDC on Base)."""

__version__ = "0.1.0"
