"""Fast secp256k1 signing and recovery of EIP-712 digests on coincurve.

Byte-identical to eth_account's `sign_typed_data` (RFC 6979 nonces, low s, v in {27, 28});
tests prove it on random states. The private key object is built once per `Signer`.
"""

from __future__ import annotations

from coincurve import PrivateKey, PublicKey

from protocols.eip712 import Domain, channel_state_digest, thread_state_digest
from protocols.errors import InvalidSignature, InvalidValue
from protocols.types import Address, ChannelState, Signature, ThreadState, check_bytes


class Signer:
    """Signs 32-byte digests with one cached secp256k1 key."""

    __slots__ = ("_key", "address")

    def __init__(self, private_key: bytes) -> None:
        check_bytes(private_key, 32, "private key")
        try:
            self._key = PrivateKey(private_key)
        except ValueError as exc:
            raise InvalidValue("private key out of range") from exc
        self.address = Address.from_public_key(self._key.public_key.format(compressed=False))

    def sign_digest(self, digest: bytes) -> Signature:
        """Sign a 32-byte digest; return r || s || v with v in {27, 28}."""
        check_bytes(digest, 32, "digest")
        raw = self._key.sign_recoverable(digest, hasher=None)
        return Signature(raw[:64] + bytes((raw[64] + 27,)))

    def sign_channel_state(self, domain: Domain, state: ChannelState) -> Signature:
        return self.sign_digest(channel_state_digest(domain, state))

    def sign_thread_state(self, domain: Domain, state: ThreadState) -> Signature:
        return self.sign_digest(thread_state_digest(domain, state))

    def __repr__(self) -> str:
        return f"Signer({self.address})"


def recover_digest(digest: bytes, signature: Signature) -> Address:
    """The address that signed `digest`; raise `InvalidSignature` if none can be recovered."""
    check_bytes(digest, 32, "digest")
    raw = signature.raw
    try:
        public = PublicKey.from_signature_and_message(
            raw[:64] + bytes((raw[64] - 27,)), digest, hasher=None
        )
    except ValueError as exc:  # coincurve raises ValueError for unrecoverable input
        raise InvalidSignature("signature does not recover to a public key") from exc
    return Address.from_public_key(public.format(compressed=False))


def recover_channel_state(domain: Domain, state: ChannelState, signature: Signature) -> Address:
    return recover_digest(channel_state_digest(domain, state), signature)


def recover_thread_state(domain: Domain, state: ThreadState, signature: Signature) -> Address:
    return recover_digest(thread_state_digest(domain, state), signature)


def is_signed_by(digest: bytes, signature: Signature, signer: Address) -> bool:
    """True if `signature` over `digest` recovers to `signer`."""
    try:
        return recover_digest(digest, signature) == signer
    except InvalidSignature:
        return False
