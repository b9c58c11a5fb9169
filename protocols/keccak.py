"""Keccak-256 as Ethereum uses it (not NIST SHA3-256)."""

import sha3  # safe-pysha3: C keccak, about 3x faster than pycryptodome on 640-byte inputs


def keccak(data: bytes) -> bytes:
    """Keccak-256 digest of `data`."""
    digest: bytes = sha3.keccak_256(data).digest()
    return digest
