"""The embedded development chain: a local anvil that looks like Base Sepolia to x402 clients.

``DevChain`` runs ``anvil --chain-id 84532`` on 127.0.0.1 and installs the project's test token
(``contracts/TestUSDC.sol``, an ERC-20 + EIP-3009 with Base Sepolia USDC's EIP-712 domain) at the
canonical Base Sepolia USDC address. Unmodified x402 clients then pay it as if it were real USDC:
v1 clients derive the chain id from the network name ``base-sepolia``, and the v2 clients' spend
controls accept the canonical USDC address as a default asset.

All chain access goes through a small async JSON-RPC helper over httpx rather than web3.py: web3's
sync provider would block the event loop of the server and of the tests.

A chain with a ``state_file`` (``imagegate serve``'s) behaves like a real chain across a crash of the
server: anvil runs in its own session, so it outlives a SIGKILLed server (and ignores the terminal's
Ctrl-C, which the server drains first), dumps its state every ``state_interval_s``, and is recorded
beside the state file (pid, start time, port, chain id). The next server on the same data directory
reattaches to it after checking that it is the very same anvil, so no transaction the chain accepted
is lost; a clean stop of the server ends it (anvil then writes its state one last time).

The keys below are anvil's well-known development keys (mnemonic ``test test ... junk``): they are
public, so production configuration must refuse them (``is_well_known_test_key``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from asyncio.subprocess import DEVNULL, Process
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

import httpx
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_utils.abi import function_signature_to_4byte_selector
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

CHAIN_ID: Final = 84532
NETWORK_V1: Final = "base-sepolia"
NETWORK_V2: Final = "eip155:84532"
USDC_ADDRESS: Final = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
TOKEN_NAME: Final = "USDC"
TOKEN_VERSION: Final = "2"
TOKEN_DECIMALS: Final = 6
DEFAULT_PAYER_BALANCE: Final = 1_000 * 10**TOKEN_DECIMALS  # 1000 USDC in atomic units

ANVIL_MNEMONIC: Final = "test test test test test test test test test test test junk"


@dataclass(frozen=True)
class DevAccount:
    private_key: str
    address: str


# Anvil accounts 0-2 and their roles on the dev chain. Account 0 holds ETH and pays the gas of
# settlement; the payer needs no ETH (EIP-3009 is gasless for the client).
FACILITATOR_ACCOUNT: Final = DevAccount(
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
)
PAYER_ACCOUNT: Final = DevAccount(
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
)
PAY_TO_ACCOUNT: Final = DevAccount(
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
)
# Anvil account 9 sends the dev chain's own transactions (mints, test calls), so they never consume
# nonces of the facilitator account, whose signer keeps a local nonce counter.
ADMIN_ACCOUNT: Final = DevAccount(
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
    "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720",
)

# All ten keys anvil derives from its default mnemonic (lower-case hex with 0x).
WELL_KNOWN_TEST_KEYS: Final = frozenset(
    {
        "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
        "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
        "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
        "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
        "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
        "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
        "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
        "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
        "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
        "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
    }
)
# Their addresses, in the same order (lower-case), so payTo addresses can be refused as well.
WELL_KNOWN_TEST_ADDRESSES: Final = frozenset(
    {
        "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266",
        "0x70997970c51812dc3a010c7d01b50e0d17dc79c8",
        "0x3c44cdddb6a900fa2b585dd299e03d12fa4293bc",
        "0x90f79bf6eb2c4f870365e785982e1f101e93b906",
        "0x15d34aaf54267db7d7c367839aaf71a00a2c6a65",
        "0x9965507d1a55bcc2695c58ba16fb37d819b0a4dc",
        "0x976ea74026e726554db657fa54763abd0c3a0aa9",
        "0x14dc79964da2c08b23698b3d3cc7ca32193d9955",
        "0x23618e81e3f5cdf7f54c3d65f7fbc0abf5b21e8f",
        "0xa0ee7a142d267c1f36714e4a8f75612f20a79720",
    }
)


def is_well_known_test_key(private_key: str) -> bool:
    """True for anvil's public development keys, with or without ``0x``, in any case."""
    normalized = private_key.strip().lower()
    if not normalized.startswith("0x"):
        normalized = "0x" + normalized
    return normalized in WELL_KNOWN_TEST_KEYS


def is_well_known_test_address(address: str) -> bool:
    return address.strip().lower() in WELL_KNOWN_TEST_ADDRESSES


def _selector(signature: str) -> str:
    return "0x" + function_signature_to_4byte_selector(signature).hex()


TRANSFER_WITH_AUTHORIZATION_VRS_SELECTOR: Final = _selector(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
)
TRANSFER_WITH_AUTHORIZATION_BYTES_SELECTOR: Final = _selector(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
)
TRANSFER_EVENT_TOPIC: Final = "0x" + keccak(text="Transfer(address,address,uint256)").hex()

ANVIL_ENV_VAR: Final = "IMAGEGATE_ANVIL"
_ANVIL_PACKAGE_BINARY: Final = Path("node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
# src/imagegate/devchain.py -> the repository root of a source checkout.
_REPO_ROOT: Final = Path(__file__).resolve().parents[2]
SETUP_HINT: Final = "run `npm ci` in the repository root (it installs @foundry-rs/anvil-linux-amd64)"


class DevChainError(RuntimeError):
    """The development chain could not be started or did not answer as expected."""


class AnvilNotFoundError(DevChainError):
    pass


class RpcError(DevChainError):
    """A JSON-RPC error answer; for a reverted call ``message`` carries the revert string."""

    def __init__(self, method: str, code: int, message: str, data: object = None) -> None:
        super().__init__(f"{method}: {message} (code {code})")
        self.method = method
        self.code = code
        self.message = message
        self.data = data


class TransactionReverted(DevChainError):
    def __init__(self, tx_hash: str) -> None:
        super().__init__(f"transaction {tx_hash} reverted")
        self.tx_hash = tx_hash


def find_anvil() -> Path:
    """The anvil binary: ``$IMAGEGATE_ANVIL``, else the npm package's binary, else ``anvil`` on PATH."""
    configured = os.environ.get(ANVIL_ENV_VAR)
    if configured:
        path = Path(configured)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise AnvilNotFoundError(f"{ANVIL_ENV_VAR}={configured} is not an executable file")
        return path
    for root in (_REPO_ROOT, Path.cwd()):
        candidate = root / _ANVIL_PACKAGE_BINARY
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which("anvil")
    if on_path:
        return Path(on_path)
    raise AnvilNotFoundError(
        f"anvil was not found (looked for {ANVIL_ENV_VAR}, {_ANVIL_PACKAGE_BINARY} under {_REPO_ROOT} "
        f"and the current directory, and PATH): {SETUP_HINT}"
    )


@dataclass(frozen=True)
class TokenArtifact:
    contract_name: str
    compiler: str
    source_sha256: str
    abi: list[dict[str, Any]]
    bytecode: str
    deployed_bytecode: str


@cache
def load_token_artifact() -> TokenArtifact:
    """The committed build of contracts/TestUSDC.sol (written by scripts/compile_contracts.mjs)."""
    text = resources.files("imagegate").joinpath("contracts", "TestUSDC.json").read_text(encoding="utf-8")
    raw = json.loads(text)
    return TokenArtifact(
        contract_name=raw["contractName"],
        compiler=raw["compiler"],
        source_sha256=raw["sourceSha256"],
        abi=raw["abi"],
        bytecode=raw["bytecode"],
        deployed_bytecode=raw["deployedBytecode"],
    )


def transfer_authorization_typed_data(
    *, sender: str, to: str, value: int, valid_after: int, valid_before: int, nonce: bytes
) -> dict[str, Any]:
    """EIP-712 ``TransferWithAuthorization`` for the token at USDC_ADDRESS, in eth-account's
    ``Account.sign_typed_data(full_message=...)`` shape. This is what x402 clients sign."""
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "TransferWithAuthorization": [
                {"name": "from", "type": "address"},
                {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"},
                {"name": "nonce", "type": "bytes32"},
            ],
        },
        "primaryType": "TransferWithAuthorization",
        "domain": {
            "name": TOKEN_NAME,
            "version": TOKEN_VERSION,
            "chainId": CHAIN_ID,
            "verifyingContract": USDC_ADDRESS,
        },
        "message": {
            "from": sender,
            "to": to,
            "value": value,
            "validAfter": valid_after,
            "validBefore": valid_before,
            "nonce": nonce,
        },
    }


def encode_transfer_with_authorization(
    *,
    sender: str,
    to: str,
    value: int,
    valid_after: int,
    valid_before: int,
    nonce: bytes,
    signature: bytes,
) -> str:
    """Calldata for ``transferWithAuthorization``: the (v, r, s) overload for a 65-byte signature
    (as every facilitator does for EOAs), the ``bytes`` overload otherwise."""
    head_types = ["address", "address", "uint256", "uint256", "uint256", "bytes32"]
    head_values: list[Any] = [sender, to, value, valid_after, valid_before, nonce]
    if len(signature) == 65:
        r, s, v = signature[:32], signature[32:64], signature[64]
        args = abi_encode([*head_types, "uint8", "bytes32", "bytes32"], [*head_values, v, r, s])
        return TRANSFER_WITH_AUTHORIZATION_VRS_SELECTOR + args.hex()
    args = abi_encode([*head_types, "bytes"], [*head_values, signature])
    return TRANSFER_WITH_AUTHORIZATION_BYTES_SELECTOR + args.hex()


@dataclass(frozen=True)
class MinedTransaction:
    hash: str
    sender: str
    to: str | None
    selector: str  # first 4 bytes of the calldata, "0x" + 8 hex digits ("0x" for a bare transfer)
    status: int  # 1 success, 0 reverted
    block_number: int
    gas_used: int


@dataclass(frozen=True)
class TokenTransfer:
    sender: str
    recipient: str
    value: int
    transaction_hash: str
    block_number: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _owns_listening_socket(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the TCP socket listening on 127.0.0.1:``port`` (Linux /proc).

    A free port picked before anvil starts can be taken meanwhile, e.g. by another dev chain; then
    the RPC answering there is not ours. True where /proc cannot tell (not Linux).
    """
    tcp_table = Path("/proc/net/tcp")
    if not tcp_table.exists():
        return True
    local_address = f"0100007F:{port:04X}"  # 127.0.0.1 as /proc/net/tcp writes it
    listening_inodes = set()
    for line in tcp_table.read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local_address and fields[3] == "0A":  # 0A: TCP_LISTEN
            listening_inodes.add(f"socket:[{fields[9]}]")
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:  # the process has exited (e.g. anvil could not bind the port)
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(descriptor) in listening_inodes:
                return True
        except FileNotFoundError:  # closed while we looked
            continue
    return False


def _process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc), or None when it is gone or a zombie.

    With the pid, it identifies one process for its whole life: pids are reused, start times are not.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields that follow it come
    # after its last ')'. There, field 3 (the state) is first and field 22 (starttime) is 20th.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):  # exited, waiting to be reaped: not running any more
        return None
    return int(fields[19])


@dataclass(frozen=True)
class AnvilRecord:
    """The anvil serving a state file, as written beside it: enough to recognise it again."""

    pid: int
    start_ticks: int
    port: int
    chain_id: int

    def alive(self) -> bool:
        """The recorded process still runs (the same process: its pid was not reused since)."""
        return _process_start_ticks(self.pid) == self.start_ticks

    @classmethod
    def read(cls, path: Path) -> AnvilRecord | None:
        try:
            raw = json.loads(path.read_text())
            return cls(int(raw["pid"]), int(raw["startTicks"]), int(raw["port"]), int(raw["chainId"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def write(self, path: Path) -> None:
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"pid": self.pid, "startTicks": self.start_ticks, "port": self.port,
                                         "chainId": self.chain_id}))
        os.replace(temporary, path)


async def _terminate(record: AnvilRecord, *, timeout_s: float) -> None:
    """Stop an anvil this process did not start (so cannot ``wait`` for): SIGTERM, then SIGKILL."""
    # Not our child: its exit cannot be awaited, only watched for (it is polled, like any foreign pid).
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        if not record.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not record.alive():
                return
            await asyncio.sleep(0.05)


def _address_word(address: str) -> bytes:
    return abi_encode(["address"], [address])


class DevChain:
    """A local anvil with the test USDC installed and the payer funded.

    ``state_file``: anvil loads the chain from it at start, writes it back every ``state_interval_s``
    and at stop, and a running anvil for it is reattached to rather than started twice (see the
    module), so the chain survives restarts and crashes (``imagegate serve``'s dev chain). Without it
    every start is a fresh chain that ends with ``stop``.
    ``payer_balance``: the payer is topped up to at least this many atomic units at every start.
    ``block_time_s``: mine a block every this many seconds (like Base's 2 s) instead of one block
    per transaction as soon as it arrives.
    """

    def __init__(
        self,
        *,
        payer_balance: int = DEFAULT_PAYER_BALANCE,
        payer_address: str = PAYER_ACCOUNT.address,
        state_file: Path | None = None,
        state_interval_s: int = 1,
        anvil_path: Path | None = None,
        port: int | None = None,
        startup_timeout_s: float = 30.0,
        block_time_s: float | None = None,
    ) -> None:
        self.payer_balance = payer_balance
        self.block_time_s = block_time_s
        self.payer_address = payer_address
        self.state_file = state_file
        self.state_interval_s = state_interval_s
        self._anvil_path = anvil_path
        self._requested_port = port
        self._startup_timeout_s = startup_timeout_s
        self._process: Process | None = None
        # An anvil started by an earlier process for the same state file, which this one reattached to.
        self._attached: AnvilRecord | None = None
        # Whether ``start`` found the chain already running (reattached) rather than launching it.
        self.reattached = False
        self._stderr: IO[bytes] | None = None
        self._client: httpx.AsyncClient | None = None
        self._rpc_url: str | None = None
        self._request_id = 0

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def connect(cls, rpc_url: str) -> DevChain:
        """A handle on a dev chain someone else runs (``imagegate serve``'s): queries and test
        transactions only; its ``stop`` closes the connection and leaves the chain running."""
        chain = cls()
        chain._rpc_url = rpc_url
        chain._client = httpx.AsyncClient(timeout=10.0, trust_env=False)
        try:
            chain_id = int(await chain.rpc("eth_chainId"), 16)
        except BaseException:
            await chain.stop()
            raise
        if chain_id != CHAIN_ID:
            await chain.stop()
            raise DevChainError(f"{rpc_url} reports chain id {chain_id}, expected {CHAIN_ID}")
        return chain

    @property
    def rpc_url(self) -> str:
        if self._rpc_url is None:
            raise DevChainError("the dev chain is not running")
        return self._rpc_url

    @property
    def pid(self) -> int:
        if self._attached is not None:
            return self._attached.pid
        if self._process is None:
            raise DevChainError("the dev chain is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        if self._attached is not None:
            return self._attached.alive()
        return self._process is not None and self._process.returncode is None

    @property
    def record_file(self) -> Path | None:
        """Where the anvil serving ``state_file`` is recorded (beside it)."""
        return None if self.state_file is None else self.state_file.with_name(self.state_file.name + ".anvil.json")

    async def start(self) -> None:
        if self._process is not None or self._attached is not None:
            raise DevChainError("the dev chain is already running")
        if self.state_file is None:
            await self._start_new()
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        # One server at a time decides, for one state file, between reattaching and launching.
        with open(self.state_file.with_name(self.state_file.name + ".lock"), "w") as lock:  # noqa: ASYNC230
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
            try:
                if not await self._reattach():
                    await self._start_new()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    async def _reattach(self) -> bool:
        """Take over the anvil recorded for ``state_file`` if it is still the one that was recorded."""
        assert self.record_file is not None
        record = AnvilRecord.read(self.record_file)
        if record is None or not record.alive():
            return False
        self._rpc_url = f"http://127.0.0.1:{record.port}"
        self._client = httpx.AsyncClient(timeout=10.0, trust_env=False)
        try:
            chain_id = int(await self.rpc("eth_chainId"), 16)
            same = (chain_id == record.chain_id == CHAIN_ID and _owns_listening_socket(record.pid, record.port)
                    and record.alive())
        except (httpx.HTTPError, DevChainError):
            same = False
        if not same:
            # Our anvil (same pid and start time) that does not answer as recorded: end it, so the
            # chain restarts from its last dump instead of two anvils writing one state file.
            await self._client.aclose()
            self._client, self._rpc_url = None, None
            await _terminate(record, timeout_s=10.0)
            return False
        self._attached = record
        self.reattached = True
        await self._provision()
        return True

    async def _start_new(self) -> None:
        anvil = self._anvil_path or find_anvil()
        # A port picked here can be taken before anvil binds it; retry with a new one in that case.
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(attempts):
            port = self._requested_port or _free_port()
            try:
                await self._launch(anvil, port)
                break
            except DevChainError:
                await self.stop()
                if attempt == attempts - 1:
                    raise
        await self._provision()

    async def _provision(self) -> None:
        """The token and the payer's funds on the chain just started or attached; stopped if that fails."""
        try:
            await self._install_token()
            await self._fund_payer()
        except BaseException:
            await self.stop()
            raise

    async def _launch(self, anvil: Path, port: int) -> None:
        command = [str(anvil), "--host", "127.0.0.1", "--port", str(port), "--chain-id", str(CHAIN_ID)]
        command.append("--silent")
        if self.block_time_s is not None:
            command += ["--block-time", f"{self.block_time_s:g}"]
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            # Dumped periodically too: anvil otherwise writes its state only when it exits cleanly.
            command += ["--state", str(self.state_file), "--state-interval", str(self.state_interval_s)]
        # stderr goes to a temporary file rather than a pipe that nobody would drain; it is closed in stop().
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        # A persistent chain gets its own session: it outlives a crashed server (to be reattached to),
        # and the terminal's Ctrl-C reaches only the server, which settles what it owes before stopping it.
        self._process = await asyncio.create_subprocess_exec(
            *command, stdin=DEVNULL, stdout=DEVNULL, stderr=self._stderr,
            start_new_session=self.state_file is not None,
        )
        self._rpc_url = f"http://127.0.0.1:{port}"
        # No proxies: the chain is on loopback and must never be reached through anything else.
        self._client = httpx.AsyncClient(timeout=10.0, trust_env=False)
        await self._wait_until_ready(port)
        if self.record_file is not None:
            # Recorded as soon as it answers: a server killed from here on leaves a chain to reattach to.
            start_ticks = _process_start_ticks(self._process.pid)
            if start_ticks is not None:  # None: no /proc (not Linux); such a chain is never reattached to
                AnvilRecord(self._process.pid, start_ticks, port, CHAIN_ID).write(self.record_file)

    async def _wait_until_ready(self, port: int) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        while True:
            if self._process is not None and self._process.returncode is not None:
                raise DevChainError(f"anvil exited with code {self._process.returncode}: {self._stderr_tail()}")
            try:
                chain_id = int(await self.rpc("eth_chainId"), 16)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise DevChainError(
                        f"anvil did not answer within {self._startup_timeout_s:.0f} s: {self._stderr_tail()}"
                    ) from None
                await asyncio.sleep(0.05)
                continue
            if self._process is not None and not _owns_listening_socket(self._process.pid, port):
                raise DevChainError(f"port {port} is served by another process")
            if chain_id != CHAIN_ID:
                raise DevChainError(f"anvil reports chain id {chain_id}, expected {CHAIN_ID}")
            return

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read()[-2000:].decode("utf-8", errors="replace").strip()

    async def _install_token(self) -> None:
        runtime = load_token_artifact().deployed_bytecode
        await self.rpc("anvil_setCode", USDC_ADDRESS, runtime)
        installed = await self.rpc("eth_getCode", USDC_ADDRESS, "latest")
        if str(installed).lower() != runtime.lower():
            raise DevChainError("anvil_setCode did not install the test token")

    async def _fund_payer(self) -> None:
        shortfall = self.payer_balance - await self.balance_of(self.payer_address)
        if shortfall > 0:
            await self.mint(self.payer_address, shortfall)

    async def stop(self, *, timeout_s: float = 10.0) -> None:
        """SIGTERM (anvil then writes ``state_file``), SIGKILL if it has not exited after ``timeout_s``."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        attached, self._attached = self._attached, None
        if attached is not None:
            await _terminate(attached, timeout_s=timeout_s)
        if self.record_file is not None and (attached is not None or self._process is not None):
            self.record_file.unlink(missing_ok=True)
        process, self._process = self._process, None
        if process is not None:
            # ProcessLookupError: it has already exited (e.g. it could not bind its port) and been
            # reaped; asyncio has just not recorded the exit code yet. wait() collects it either way.
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self._rpc_url = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ JSON-RPC

    async def rpc(self, method: str, *params: Any) -> Any:
        if self._client is None or self._rpc_url is None:
            raise DevChainError("the dev chain is not running")
        self._request_id += 1
        payload = {"jsonrpc": "2.0", "id": self._request_id, "method": method, "params": list(params)}
        response = await self._client.post(self._rpc_url, json=payload)
        response.raise_for_status()
        answer = response.json()
        if "error" in answer:
            error = answer["error"]
            raise RpcError(method, int(error.get("code", 0)), str(error.get("message", "")), error.get("data"))
        return answer["result"]

    async def call(self, to: str, data: str, *, sender: str | None = None) -> bytes:
        """``eth_call`` at the latest block; a revert raises RpcError whose message has the reason."""
        transaction = {"to": to, "data": data}
        if sender is not None:
            transaction["from"] = sender
        result = await self.rpc("eth_call", transaction, "latest")
        return bytes.fromhex(str(result).removeprefix("0x"))

    async def send_transaction(
        self,
        to: str,
        data: str,
        *,
        sender: str = ADMIN_ACCOUNT.address,
        gas: int | None = None,
        allow_revert: bool = False,
    ) -> str:
        """Sends from one of anvil's unlocked accounts, waits for the receipt, returns the tx hash.

        Anvil mines a reverting transaction too (status 0, gas paid); that raises TransactionReverted
        unless ``allow_revert``. Use ``call`` first to learn a revert reason.
        """
        transaction = {"from": sender, "to": to, "data": data}
        if gas is not None:
            transaction["gas"] = hex(gas)
        tx_hash = str(await self.rpc("eth_sendTransaction", transaction))
        receipt = await self.wait_for_receipt(tx_hash)
        if int(receipt["status"], 16) != 1 and not allow_revert:
            raise TransactionReverted(tx_hash)
        return tx_hash

    async def transaction_receipt(self, tx_hash: str) -> dict[str, Any] | None:
        receipt: dict[str, Any] | None = await self.rpc("eth_getTransactionReceipt", tx_hash)
        return receipt

    async def wait_for_receipt(self, tx_hash: str, *, timeout_s: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (receipt := await self.transaction_receipt(tx_hash)) is None:
            if time.monotonic() > deadline:
                raise DevChainError(f"no receipt for {tx_hash} after {timeout_s:.0f} s")
            await asyncio.sleep(0.02)
        return receipt

    async def block_number(self) -> int:
        return int(await self.rpc("eth_blockNumber"), 16)

    async def latest_block_timestamp(self) -> int:
        block = await self.rpc("eth_getBlockByNumber", "latest", False)
        return int(block["timestamp"], 16)

    async def set_next_block_timestamp(self, timestamp: int) -> None:
        await self.rpc("evm_setNextBlockTimestamp", timestamp)

    async def increase_time(self, seconds: int) -> None:
        """Moves the chain clock forward; it shows in the next mined block."""
        await self.rpc("evm_increaseTime", seconds)

    async def mine(self) -> None:
        await self.rpc("evm_mine")

    # ------------------------------------------------------------------ the token

    async def balance_of(self, address: str) -> int:
        data = _selector("balanceOf(address)") + _address_word(address).hex()
        (balance,) = abi_decode(["uint256"], await self.call(USDC_ADDRESS, data))
        return int(balance)

    async def authorization_state(self, authorizer: str, nonce: bytes) -> bool:
        data = (
            _selector("authorizationState(address,bytes32)")
            + abi_encode(["address", "bytes32"], [authorizer, nonce]).hex()
        )
        (used,) = abi_decode(["bool"], await self.call(USDC_ADDRESS, data))
        return bool(used)

    async def mint(self, address: str, amount: int) -> str:
        """Mints test USDC (anyone may: it is a test token); returns the transaction hash."""
        data = _selector("mint(address,uint256)") + abi_encode(["address", "uint256"], [address, amount]).hex()
        return await self.send_transaction(USDC_ADDRESS, data)

    async def transactions_to(
        self, address: str, *, from_block: int = 0, to_block: int | None = None
    ) -> list[MinedTransaction]:
        """Every mined transaction sent to ``address`` in the block range, reverted ones included.

        It reads each block, so pass ``from_block`` (e.g. ``await block_number() + 1`` taken before
        the action under test) on a long-lived chain.
        """
        last = await self.block_number() if to_block is None else to_block
        found: list[MinedTransaction] = []
        for number in range(from_block, last + 1):
            block = await self.rpc("eth_getBlockByNumber", hex(number), True)
            for tx in block["transactions"]:
                if tx.get("to") is None or tx["to"].lower() != address.lower():
                    continue
                receipt = await self.wait_for_receipt(tx["hash"])
                found.append(
                    MinedTransaction(
                        hash=tx["hash"],
                        sender=to_checksum_address(tx["from"]),
                        to=to_checksum_address(tx["to"]),
                        selector=tx["input"][:10],
                        status=int(receipt["status"], 16),
                        block_number=number,
                        gas_used=int(receipt["gasUsed"], 16),
                    )
                )
        return found

    async def token_transfers(self, *, from_block: int = 0, to_block: int | None = None) -> list[TokenTransfer]:
        """``Transfer`` events of the test USDC (mints appear with sender 0x0...0)."""
        if from_block > await self.block_number():
            return []  # nothing mined since: anvil refuses a range that starts past the head
        logs = await self.rpc(
            "eth_getLogs",
            {
                "address": USDC_ADDRESS,
                "topics": [TRANSFER_EVENT_TOPIC],
                "fromBlock": hex(from_block),
                "toBlock": "latest" if to_block is None else hex(to_block),
            },
        )
        transfers: list[TokenTransfer] = []
        for log in logs:
            transfers.append(
                TokenTransfer(
                    sender=to_checksum_address("0x" + log["topics"][1][-40:]),
                    recipient=to_checksum_address("0x" + log["topics"][2][-40:]),
                    value=int(log["data"], 16),
                    transaction_hash=log["transactionHash"],
                    block_number=int(log["blockNumber"], 16),
                )
            )
        return transfers
