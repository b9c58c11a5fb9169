"""Errors of the chain service (`node.chain`).

Every failure of a chain call is one of these; web3, eth-tester, requests and eth-abi
exceptions never leave the service (each error keeps the library's exception as its
`__cause__`, for debugging).
"""

from __future__ import annotations


class ChainError(Exception):
    """Base of every chain-service error."""


class ChainUnavailable(ChainError):
    """The chain cannot be reached (connection refused, timeout, broken response)."""


class ContractReverted(ChainError):
    """A call or transaction would revert; nothing was sent (the nonce is not used).

    `reason` is the contract's revert string (`Error(string)`), "" when it gave none.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"reverted: {reason}" if reason else "reverted without a reason")
        self.reason = reason


class TransactionFailed(ChainError):
    """A transaction was mined but failed (receipt status 0); its nonce and gas are spent."""

    def __init__(self, tx_hash: bytes, block_number: int, gas_used: int) -> None:
        super().__init__(
            f"transaction 0x{tx_hash.hex()} failed in block {block_number} (gas used {gas_used})"
        )
        self.tx_hash = tx_hash
        self.block_number = block_number
        self.gas_used = gas_used


class RequestRejected(ChainError):
    """The node answered a request with an error: most often a refused transaction (nonce
    too low, funds too low for gas, fee too low), or a refused query (e.g. a log range too
    large). After a refused transaction the service forgets the sender's cached nonce, so
    the next transaction re-reads it from the chain.
    """


class ReceiptTimeout(ChainError):
    """A sent transaction has no receipt within the timeout; it may still be mined."""

    def __init__(self, tx_hash: bytes, seconds: float) -> None:
        super().__init__(f"no receipt for 0x{tx_hash.hex()} after {seconds:g}s")
        self.tx_hash = tx_hash
        self.seconds = seconds


class ChainDataError(ChainError):
    """The chain returned data the service cannot interpret (a malformed log or value)."""


class NotSupported(ChainError):
    """The chain does not support the request (e.g. time travel on a public network)."""
