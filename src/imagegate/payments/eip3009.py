"""EIP-3009 ``transferWithAuthorization`` by hand: the digest a payer signs, who signed it, the calldata.

The x402 SDK computes the same digest through eth-abi and eth-account's generic EIP-712 encoder
(~0.3 ms with the domain rebuilt every time) and always asks the node for the payer's code. On
the paid path every request needs this, so it is written out here for the one fixed struct: the
domain separator is cached per token, the struct is six 32-byte words, and recovery is one
coincurve call. Anything that is not a plain 65-byte ECDSA signature is left to the SDK.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from coincurve import PublicKey
from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak

TRANSFER_WITH_AUTHORIZATION_TYPEHASH = keccak(
    text="TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,"
         "bytes32 nonce)")
_DOMAIN_TYPEHASH = keccak(text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
SELECTOR_VRS = keccak(
    text="transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)")[:4]
SELECTOR_BYTES = keccak(text="transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)")[:4]
SELECTOR_AUTHORIZATION_STATE = keccak(text="authorizationState(address,bytes32)")[:4]
SELECTOR_BALANCE_OF = keccak(text="balanceOf(address)")[:4]
TRANSFER_EVENT_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()
AUTHORIZATION_USED_TOPIC = "0x" + keccak(text="AuthorizationUsed(address,bytes32)").hex()
_UINT256_MAX = 2**256 - 1


@dataclass(frozen=True)
class TransferAuthorization:
    """The signed authorization, as numbers and bytes (its shape already checked by the caller)."""

    sender: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes
    signature: bytes

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> TransferAuthorization:
        """From an exact-EVM payload ``{"signature", "authorization": {...}}``; ValueError if malformed."""
        try:
            raw = payload["authorization"]
            authorization = cls(
                sender=str(raw["from"]), to=str(raw["to"]), value=int(raw["value"]),
                valid_after=int(raw["validAfter"]), valid_before=int(raw["validBefore"]),
                nonce=bytes.fromhex(str(raw["nonce"]).removeprefix("0x")),
                signature=bytes.fromhex(str(payload["signature"]).removeprefix("0x")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed EIP-3009 payload: {exc!r}") from exc
        if len(authorization.nonce) != 32:
            raise ValueError("the authorization nonce must be 32 bytes")
        for number in (authorization.value, authorization.valid_after, authorization.valid_before):
            if not 0 <= number <= _UINT256_MAX:
                raise ValueError("authorization numbers must fit in uint256")
        for address in (authorization.sender, authorization.to):
            if len(_address_bytes(address)) != 20:
                raise ValueError("authorization addresses must be 20 bytes")
        return authorization

    @property
    def nonce_hex(self) -> str:
        return "0x" + self.nonce.hex()


def _address_bytes(address: str) -> bytes:
    return bytes.fromhex(address.removeprefix("0x").removeprefix("0X"))


def _word(value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return value.rjust(32, b"\0")
    return value.to_bytes(32, "big")


@lru_cache(maxsize=64)
def domain_separator(name: str, version: str, chain_id: int, verifying_contract: str) -> bytes:
    return keccak(_DOMAIN_TYPEHASH + keccak(text=name) + keccak(text=version) + _word(chain_id)
                  + _word(_address_bytes(verifying_contract)))


def digest(authorization: TransferAuthorization, *, name: str, version: str, chain_id: int, token: str) -> bytes:
    """The EIP-712 digest of ``TransferWithAuthorization`` for ``token``'s domain."""
    struct_hash = keccak(
        TRANSFER_WITH_AUTHORIZATION_TYPEHASH + _word(_address_bytes(authorization.sender))
        + _word(_address_bytes(authorization.to)) + _word(authorization.value) + _word(authorization.valid_after)
        + _word(authorization.valid_before) + authorization.nonce)
    return keccak(b"\x19\x01" + domain_separator(name, version, chain_id, token.lower()) + struct_hash)


def recover_signer(message_digest: bytes, signature: bytes) -> str | None:
    """The address whose key made the 65-byte ``signature`` (r, s, v with v in 27/28 or 0/1), or None."""
    if len(signature) != 65:
        return None
    recovery_id = signature[64] - 27 if signature[64] >= 27 else signature[64]
    if recovery_id not in (0, 1):
        return None
    try:
        public_key = PublicKey.from_signature_and_message(signature[:64] + bytes([recovery_id]), message_digest,
                                                          hasher=None)
    except ValueError:
        return None
    return "0x" + keccak(public_key.format(compressed=False)[1:])[-20:].hex()


def transfer_calldata(authorization: TransferAuthorization) -> str:
    """Calldata of ``transferWithAuthorization``: the (v, r, s) overload for a 65-byte signature (what
    every facilitator sends for an EOA), the ``bytes`` overload otherwise."""
    head = (_word(_address_bytes(authorization.sender)) + _word(_address_bytes(authorization.to))
            + _word(authorization.value) + _word(authorization.valid_after) + _word(authorization.valid_before)
            + authorization.nonce)
    signature = authorization.signature
    if len(signature) == 65:
        v = signature[64] + 27 if signature[64] in (0, 1) else signature[64]
        return "0x" + (SELECTOR_VRS + head + _word(v) + signature[:32] + signature[32:64]).hex()
    tail = abi_encode(["bytes"], [signature])
    # The bytes argument's offset is counted from the start of the arguments: six head words + itself.
    return "0x" + (SELECTOR_BYTES + head + _word(7 * 32) + tail[32:]).hex()


def authorization_state_calldata(authorizer: str, nonce: bytes) -> str:
    return "0x" + (SELECTOR_AUTHORIZATION_STATE + _word(_address_bytes(authorizer)) + nonce).hex()


def balance_of_calldata(owner: str) -> str:
    return "0x" + (SELECTOR_BALANCE_OF + _word(_address_bytes(owner))).hex()


def address_topic(address: str) -> str:
    return "0x" + _word(_address_bytes(address)).hex()


def decode_uint(result: str) -> int:
    return int(result, 16) if result not in ("0x", "") else 0
