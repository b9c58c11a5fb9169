"""Hypothesis strategies for the protocol's value types and wire messages.

Every strategy yields only valid values (they construct without `InvalidValue` and encode
without `LocalProtocolError`). Import them by full name:
`from tests.protocols.strategies import channel_states`.
"""

from __future__ import annotations

from hypothesis import strategies as st

from protocols.messages import (
    ChannelCountersign,
    ChannelProposal,
    ChannelReject,
    ChannelResume,
    ChannelSync,
    ChannelUpdate,
    CollateralNeeded,
    CollateralRequest,
    ErrorNotice,
    HubMessage,
    Message,
    PeerInfo,
    PeerLookup,
    RejectReason,
    SignedThreadState,
    ThreadCloseNotice,
    ThreadCloseRequest,
    ThreadCountersign,
    ThreadMessage,
    ThreadOpenProposal,
    ThreadOpenRefused,
    ThreadOpenRequest,
    ThreadProposal,
    ThreadReject,
    ThreadResume,
    ThreadSync,
    UpdateCloseThread,
    UpdateConfirmPending,
    UpdateInvalidatePending,
    UpdateOpenThread,
    UpdatePayment,
    UpdatePending,
)
from protocols.types import (
    SECP256K1_HALF_N,
    SECP256K1_N,
    UINT256_MAX,
    ZERO_ADDRESS,
    Address,
    Assets,
    ChannelState,
    Party,
    Signature,
    ThreadKey,
    ThreadState,
)

UINT256_EDGES = (0, 1, 2**64 - 1, 2**64, 2**128, 2**255, UINT256_MAX - 1, UINT256_MAX)


def uint256s() -> st.SearchStrategy[int]:
    """Any uint256, biased towards small values and the edges (0, 2**64 - 1, 2**64, max)."""
    return st.one_of(
        st.integers(0, 1000),
        st.sampled_from(UINT256_EDGES),
        st.integers(0, 2**64 - 1),
        st.integers(0, UINT256_MAX),
    )


def addresses() -> st.SearchStrategy[Address]:
    return st.one_of(
        st.binary(min_size=20, max_size=20).map(Address),
        st.just(ZERO_ADDRESS),
        st.just(Address(b"\xff" * 20)),
    )


def distinct_address_pairs() -> st.SearchStrategy[tuple[Address, Address]]:
    return st.tuples(addresses(), addresses()).filter(lambda pair: pair[0] != pair[1])


def assets() -> st.SearchStrategy[Assets]:
    return st.builds(Assets, uint256s(), uint256s())


def signatures() -> st.SearchStrategy[Signature]:
    """Well-formed signatures: 0 < r < N, 0 < s <= N/2, v in {27, 28} (not necessarily valid
    for any key or digest)."""
    return st.builds(
        lambda r, s, v: Signature(r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes((v,))),
        st.one_of(st.integers(1, SECP256K1_N - 1), st.sampled_from((1, SECP256K1_N - 1))),
        st.one_of(st.integers(1, SECP256K1_HALF_N), st.sampled_from((1, SECP256K1_HALF_N))),
        st.sampled_from((27, 28)),
    )


def parties() -> st.SearchStrategy[Party]:
    return st.sampled_from(Party)


def reject_reasons() -> st.SearchStrategy[RejectReason]:
    return st.sampled_from(RejectReason)


def details() -> st.SearchStrategy[str]:
    """Reject details: any text of at most 256 characters (so at most 1024 UTF-8 bytes)."""
    return st.text(max_size=256)


def channel_states() -> st.SearchStrategy[ChannelState]:
    return st.builds(
        ChannelState,
        user=addresses(),
        recipient=addresses(),
        balance_hub=assets(),
        balance_user=assets(),
        pending_deposit_hub=assets(),
        pending_deposit_user=assets(),
        pending_withdrawal_hub=assets(),
        pending_withdrawal_user=assets(),
        tx_count_global=uint256s(),
        tx_count_onchain=uint256s(),
        thread_root=st.binary(min_size=32, max_size=32),
        thread_count=uint256s(),
        timeout=uint256s(),
    )


def uint256s_up_to(limit: int) -> st.SearchStrategy[int]:
    """Any int in [0, limit], biased towards small values and both ends."""
    return st.one_of(
        st.integers(0, min(limit, 1000)),
        st.just(limit),
        st.integers(0, min(limit, 2**64 - 1)),
        st.integers(0, limit),
    )


@st.composite
def thread_states(draw: st.DrawFn) -> ThreadState:
    """Thread states with sender != receiver and a total that is still uint256."""
    sender, receiver = draw(distinct_address_pairs())
    balance_sender = draw(assets())
    balance_receiver = Assets(
        draw(uint256s_up_to(UINT256_MAX - balance_sender.eth)),
        draw(uint256s_up_to(UINT256_MAX - balance_sender.token)),
    )
    return ThreadState(
        thread_id=draw(uint256s()),
        sender=sender,
        receiver=receiver,
        balance_sender=balance_sender,
        balance_receiver=balance_receiver,
        tx_count=draw(uint256s()),
    )


def thread_keys() -> st.SearchStrategy[ThreadKey]:
    return st.builds(
        lambda pair, thread_id: ThreadKey(pair[0], pair[1], thread_id),
        distinct_address_pairs(),
        uint256s(),
    )


def signed_thread_states() -> st.SearchStrategy[SignedThreadState]:
    return st.builds(SignedThreadState, thread_states(), signatures(), signatures())


# ---------------------------------------------------------------- channel updates


def update_payments() -> st.SearchStrategy[UpdatePayment]:
    return st.builds(UpdatePayment, parties(), assets(), addresses())


def update_pendings() -> st.SearchStrategy[UpdatePending]:
    return st.builds(UpdatePending, assets(), assets(), assets(), assets(), addresses(), uint256s())


def update_confirm_pendings() -> st.SearchStrategy[UpdateConfirmPending]:
    return st.builds(UpdateConfirmPending, uint256s())


def update_invalidate_pendings() -> st.SearchStrategy[UpdateInvalidatePending]:
    return st.builds(UpdateInvalidatePending, uint256s())


def update_open_threads() -> st.SearchStrategy[UpdateOpenThread]:
    return st.builds(UpdateOpenThread, thread_states(), signatures(), signatures())


def update_close_threads() -> st.SearchStrategy[UpdateCloseThread]:
    return st.builds(UpdateCloseThread, thread_states(), signatures(), signatures())


UPDATE_STRATEGIES: dict[type, st.SearchStrategy[ChannelUpdate]] = {
    UpdatePayment: update_payments(),
    UpdatePending: update_pendings(),
    UpdateConfirmPending: update_confirm_pendings(),
    UpdateInvalidatePending: update_invalidate_pendings(),
    UpdateOpenThread: update_open_threads(),
    UpdateCloseThread: update_close_threads(),
}


def channel_updates() -> st.SearchStrategy[ChannelUpdate]:
    return st.one_of(*UPDATE_STRATEGIES.values())


# ---------------------------------------------------------------- messages

HUB_STRATEGIES: dict[type, st.SearchStrategy[HubMessage]] = {
    ChannelProposal: st.builds(
        ChannelProposal, channel_updates(), channel_states(), uint256s(), signatures()
    ),
    ChannelCountersign: st.builds(ChannelCountersign, addresses(), uint256s(), signatures()),
    ChannelReject: st.builds(
        ChannelReject, addresses(), uint256s(), reject_reasons(), uint256s(), details()
    ),
    ChannelResume: st.builds(ChannelResume, addresses(), uint256s()),
    ChannelSync: st.builds(
        ChannelSync,
        channel_states(),
        signatures(),
        signatures(),
        st.lists(signed_thread_states(), max_size=3).map(tuple),
    ),
    ThreadOpenRequest: st.builds(ThreadOpenRequest, signed_thread_states()),
    ThreadCloseRequest: st.builds(ThreadCloseRequest, signed_thread_states()),
    CollateralRequest: st.builds(CollateralRequest, assets()),
    CollateralNeeded: st.builds(CollateralNeeded, addresses(), assets()),
    ThreadOpenRefused: st.builds(
        ThreadOpenRefused, thread_keys(), reject_reasons(), assets(), details()
    ),
    PeerLookup: st.builds(PeerLookup, addresses()),
    PeerInfo: st.builds(
        PeerInfo,
        addresses(),
        st.binary(max_size=128),
        st.lists(st.text(max_size=64), max_size=16).map(tuple),
    ),
    ErrorNotice: st.builds(ErrorNotice, reject_reasons(), details()),
}

THREAD_STRATEGIES: dict[type, st.SearchStrategy[ThreadMessage]] = {
    ThreadOpenProposal: st.builds(ThreadOpenProposal, thread_states(), signatures()),
    ThreadProposal: st.builds(ThreadProposal, thread_states(), uint256s(), signatures()),
    ThreadCountersign: st.builds(ThreadCountersign, thread_keys(), uint256s(), signatures()),
    ThreadReject: st.builds(
        ThreadReject, thread_keys(), uint256s(), reject_reasons(), uint256s(), details()
    ),
    ThreadResume: st.builds(ThreadResume, thread_keys(), uint256s()),
    ThreadCloseNotice: st.builds(ThreadCloseNotice, thread_keys(), uint256s()),
    ThreadSync: st.builds(ThreadSync, signed_thread_states()),
    ErrorNotice: st.builds(ErrorNotice, reject_reasons(), details()),
}

MESSAGE_STRATEGIES: dict[type, st.SearchStrategy[Message]] = {
    **HUB_STRATEGIES,
    **THREAD_STRATEGIES,
}
"""One strategy per message class."""


def hub_messages() -> st.SearchStrategy[HubMessage]:
    return st.one_of(*HUB_STRATEGIES.values())


def thread_messages() -> st.SearchStrategy[ThreadMessage]:
    return st.one_of(*THREAD_STRATEGIES.values())


def messages() -> st.SearchStrategy[Message]:
    return st.one_of(*MESSAGE_STRATEGIES.values())
