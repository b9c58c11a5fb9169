"""EIP-712 typed-data hashing of channel and thread states.

The encoding is the one `eth_account.messages.encode_typed_data` produces for the type
strings below; tests prove the digests byte-identical on random states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocols.errors import InvalidValue
from protocols.keccak import keccak
from protocols.types import Address, ChannelState, ThreadState, check_uint256

DOMAIN_NAME = "Weft"
DOMAIN_VERSION = "1"

DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
CHANNEL_STATE_TYPE = (
    "ChannelState(address user,address recipient,"
    "uint256 balanceEthHub,uint256 balanceEthUser,uint256 balanceTokenHub,uint256 balanceTokenUser,"
    "uint256 pendingDepositEthHub,uint256 pendingDepositEthUser,"
    "uint256 pendingDepositTokenHub,uint256 pendingDepositTokenUser,"
    "uint256 pendingWithdrawalEthHub,uint256 pendingWithdrawalEthUser,"
    "uint256 pendingWithdrawalTokenHub,uint256 pendingWithdrawalTokenUser,"
    "uint256 txCountGlobal,uint256 txCountOnchain,bytes32 threadRoot,uint256 threadCount,"
    "uint256 timeout)"
)
THREAD_STATE_TYPE = (
    "ThreadState(uint256 threadId,address sender,address receiver,"
    "uint256 balanceEthSender,uint256 balanceEthReceiver,"
    "uint256 balanceTokenSender,uint256 balanceTokenReceiver,uint256 txCount)"
)

DOMAIN_TYPEHASH = keccak(DOMAIN_TYPE.encode())
CHANNEL_STATE_TYPEHASH = keccak(CHANNEL_STATE_TYPE.encode())
THREAD_STATE_TYPEHASH = keccak(THREAD_STATE_TYPE.encode())


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _address_word(address: Address) -> bytes:
    return b"\x00" * 12 + address.raw


@dataclass(frozen=True, slots=True)
class Domain:
    """The EIP-712 domain: binds every signature to one chain and one ChannelManager."""

    chain_id: int
    verifying_contract: Address
    name: str = DOMAIN_NAME
    version: str = DOMAIN_VERSION
    separator: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_uint256(self.chain_id, "chain_id")
        if type(self.verifying_contract) is not Address:
            raise InvalidValue("verifying_contract must be an Address")
        if type(self.name) is not str or type(self.version) is not str:
            raise InvalidValue("domain name and version must be str")
        separator = keccak(
            DOMAIN_TYPEHASH
            + keccak(self.name.encode())
            + keccak(self.version.encode())
            + _word(self.chain_id)
            + _address_word(self.verifying_contract)
        )
        object.__setattr__(self, "separator", separator)


def channel_state_struct_hash(state: ChannelState) -> bytes:
    """`hashStruct(ChannelState)` per EIP-712."""
    return keccak(
        b"".join(
            (
                CHANNEL_STATE_TYPEHASH,
                _address_word(state.user),
                _address_word(state.recipient),
                _word(state.balance_hub.eth),
                _word(state.balance_user.eth),
                _word(state.balance_hub.token),
                _word(state.balance_user.token),
                _word(state.pending_deposit_hub.eth),
                _word(state.pending_deposit_user.eth),
                _word(state.pending_deposit_hub.token),
                _word(state.pending_deposit_user.token),
                _word(state.pending_withdrawal_hub.eth),
                _word(state.pending_withdrawal_user.eth),
                _word(state.pending_withdrawal_hub.token),
                _word(state.pending_withdrawal_user.token),
                _word(state.tx_count_global),
                _word(state.tx_count_onchain),
                state.thread_root,
                _word(state.thread_count),
                _word(state.timeout),
            )
        )
    )


def thread_state_struct_hash(state: ThreadState) -> bytes:
    """`hashStruct(ThreadState)` per EIP-712."""
    return keccak(
        b"".join(
            (
                THREAD_STATE_TYPEHASH,
                _word(state.thread_id),
                _address_word(state.sender),
                _address_word(state.receiver),
                _word(state.balance_sender.eth),
                _word(state.balance_receiver.eth),
                _word(state.balance_sender.token),
                _word(state.balance_receiver.token),
                _word(state.tx_count),
            )
        )
    )


def typed_data_digest(domain: Domain, struct_hash: bytes) -> bytes:
    """The 32 bytes that are signed: keccak(0x1901 || domainSeparator || hashStruct)."""
    return keccak(b"\x19\x01" + domain.separator + struct_hash)


def channel_state_digest(domain: Domain, state: ChannelState) -> bytes:
    return typed_data_digest(domain, channel_state_struct_hash(state))


def thread_state_digest(domain: Domain, state: ThreadState) -> bytes:
    return typed_data_digest(domain, thread_state_struct_hash(state))
