"""Error types of the protocol core.

Two kinds, as in h11: the local caller misused the API (`LocalProtocolError`), or data from
outside (a peer, a file, the chain) is not valid (`InvalidValue`, `DecodeError`,
`InvalidSignature`). State machines do not raise for bad peer input: they return a
`Rejection` with a `RejectReason` instead.
"""


class WeftProtocolError(Exception):
    """Base of every error raised by `protocols`."""


class InvalidValue(WeftProtocolError, ValueError):
    """A value does not satisfy its type's rules (range, length, shape)."""


class InvalidSignature(WeftProtocolError):
    """A signature is malformed or does not recover to the expected signer."""


class DecodeError(WeftProtocolError):
    """Bytes are not a valid wire message."""


class LocalProtocolError(WeftProtocolError):
    """The local caller asked for something the protocol does not allow."""
