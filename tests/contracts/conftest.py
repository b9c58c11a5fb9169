"""Fixtures and helpers for the ChannelManager tests on the embedded chain.

One deployment per session (`deployment`); every test gets it inside a chain snapshot
(`d`), so tests never see each other's transactions. The helpers check what the brief of
these tests asks after every call: the stored record hash, exact balance changes of every
party and of the contract (gas included), the reserve, and the events.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
from web3 import Web3

from protocols.onchain import ChannelRecord, ThreadDispute, dispute_hash, record_hash
from protocols.thread_root import EMPTY_THREAD_ROOT, thread_leaf, thread_root
from protocols.types import NO_ASSETS, Address, Assets, ChannelState, ThreadState
from tests.contracts.harness import CHALLENGE_PERIOD, ETHER, Deployment, Party

# `action` codes of ChannelRecordChanged / ThreadDisputeChanged.
ACTION_HUB_UPDATE = 1
ACTION_USER_UPDATE = 2
ACTION_START_EXIT = 3
ACTION_CHALLENGE_EXIT = 4
ACTION_EMPTY_CHANNEL = 5
ACTION_START_THREAD_EXIT = 6
ACTION_CHALLENGE_THREAD = 7
ACTION_SETTLE_THREAD = 8

CP = CHALLENGE_PERIOD
ZERO = "0x" + "00" * 20
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

__all__ = [
    "ACTION_CHALLENGE_EXIT",
    "ACTION_CHALLENGE_THREAD",
    "ACTION_EMPTY_CHANNEL",
    "ACTION_HUB_UPDATE",
    "ACTION_SETTLE_THREAD",
    "ACTION_START_EXIT",
    "ACTION_START_THREAD_EXIT",
    "ACTION_USER_UPDATE",
    "CP",
    "ETHER",
    "LOCK_A",
    "LOCK_B",
    "SECP256K1_N",
    "ZERO",
    "Money",
    "Pair",
    "assert_dispute_stored",
    "assert_record_event",
    "assert_solvent",
    "assert_stored",
    "block_time",
    "build_pair",
    "catch_up",
    "chain_view",
    "exit_and_empty",
    "fund",
    "gas_cost",
    "next_block_at",
    "pay_thread",
    "reverts_unchanged",
    "stored_dispute_hash",
    "stored_hash",
    "thread",
    "with_threads",
]


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def deployment() -> Deployment:
    """The session's ChannelManager on TestToken: a hub, four users and an outsider."""
    return Deployment.create(n_users=4)


@pytest.fixture
def d(deployment: Deployment) -> Iterator[Deployment]:
    """The session deployment; everything a test does is undone afterwards."""
    with deployment.snapshot():
        catch_up(deployment)
        yield deployment


def catch_up(d: Deployment) -> None:
    """Mine a block, so that `d.now` is the chain's time again.

    eth-tester stamps a new block with the wall clock if that is later than its parent; after
    a snapshot is reverted the latest block can be far behind it, and the next transaction
    would not land at `d.now + 1`."""
    d.tester.mine_blocks()


# --- chain --------------------------------------------------------------------------------


def block_time(d: Deployment, receipt: Any = None) -> int:
    """Timestamp of the block that holds `receipt` (default: the last transaction)."""
    r = receipt or d.last_receipt
    return int(d.w3.eth.get_block(r["blockNumber"])["timestamp"])


def gas_cost(receipt: Any) -> int:
    return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])


def next_block_at(d: Deployment, timestamp: int) -> None:
    """Make the next transaction's block have exactly `timestamp`."""
    assert timestamp > d.now, "cannot go back in time"
    if timestamp > d.now + 1:
        d.tester.time_travel(timestamp)
    assert d.now + 1 == timestamp


# --- stored state -------------------------------------------------------------------------


def stored_hash(d: Deployment, user: Party | Address | str) -> bytes:
    who = user.hex if isinstance(user, Party) else str(user)
    return bytes(d.manager.functions.channelRecordHash(who).call())


def stored_dispute_hash(d: Deployment, leaf: bytes) -> bytes:
    return bytes(d.manager.functions.threadDisputeHash(leaf).call())


def assert_stored(d: Deployment, user: Party, expected: ChannelRecord) -> None:
    """The tracked record (from the events) is `expected` and the contract stores its hash."""
    assert d.record(user) == expected
    assert stored_hash(d, user) == record_hash(expected)


def assert_dispute_stored(d: Deployment, initial: ThreadState, expected: ThreadDispute) -> None:
    assert d.dispute(initial) == expected
    assert stored_dispute_hash(d, thread_leaf(initial)) == dispute_hash(expected)


def _addresses(d: Deployment, extra: Iterable[str] = ()) -> list[str]:
    parties = [d.hub, *d.users, d.outsider]
    out = [p.hex for p in parties] + [d.manager.address]
    out += [Web3.to_checksum_address(a) for a in extra]
    return list(dict.fromkeys(out))


def _key(who: Party | str) -> str:
    return who.hex if isinstance(who, Party) else Web3.to_checksum_address(who)


def chain_view(
    d: Deployment, users: Iterable[Party] = (), leaves: Iterable[bytes] = ()
) -> tuple[Any, ...]:
    """What a reverted call must leave alone. The latest block's hash and state root cover
    the whole chain (no block mined, no account, balance or storage slot touched, so the
    reserve and token balances too); the record hashes of `users`, the dispute hashes of
    `leaves` and every known ETH balance are read as well."""
    block = d.w3.eth.get_block("latest")
    return (
        bytes(block["hash"]),
        bytes(block["stateRoot"]),
        tuple(stored_hash(d, u) for u in users),
        tuple(stored_dispute_hash(d, leaf) for leaf in leaves),
        tuple(d.eth(a) for a in _addresses(d)),
    )


@contextlib.contextmanager
def reverts_unchanged(
    d: Deployment, reason: str, users: Iterable[Party] = (), leaves: Iterable[bytes] = ()
) -> Iterator[None]:
    """Expect a revert with exactly `reason`, and no change to the chain."""
    users, leaves = tuple(users), tuple(leaves)
    before = chain_view(d, users, leaves)
    with d.reverts(reason):
        yield
    assert chain_view(d, users, leaves) == before


def assert_solvent(d: Deployment) -> None:
    """What the contract holds is exactly the reserve, what its channels hold and what it
    owes as deferred payouts (over the channels the events have shown)."""
    held = NO_ASSETS
    for record in d.records.values():
        held = held + record.held
    f = d.manager.functions
    owed = NO_ASSETS
    for a in _addresses(d):
        owed = owed + Assets(f.unclaimedEth(a).call(), f.unclaimedToken(a).call())
    assert d.contract_holdings() == d.reserve() + held + owed


class Money:
    """ETH and token balances of every known address, to check exact changes.

    `check` compares against the balances when the object was made: each address changes
    by what `changes` says (keyed by checksum address, e.g. `party.hex`; 0 if not named),
    less the gas of the `receipts` it sent.
    """

    def __init__(self, d: Deployment, *extra: str) -> None:
        self.d = d
        self.addresses = _addresses(d, extra)
        self.before = self._read()
        self.reserve = d.reserve()

    def _read(self) -> dict[str, tuple[int, int]]:
        return {a: (self.d.eth(a), self.d.tokens(a)) for a in self.addresses}

    def check(
        self,
        changes: Mapping[str, tuple[int, int]] | None = None,
        reserve: tuple[int, int] = (0, 0),
        receipts: Sequence[Any] = (),
    ) -> None:
        wanted = {_key(k): v for k, v in (changes or {}).items()}
        assert set(wanted) <= set(self.addresses), "name every address when making Money"
        gas: dict[str, int] = {}
        for r in receipts:
            sender = Web3.to_checksum_address(r["from"])
            gas[sender] = gas.get(sender, 0) + gas_cost(r)
        after = self._read()
        for a in self.addresses:
            de, dt = wanted.get(a, (0, 0))
            eth0, tok0 = self.before[a]
            expected = (eth0 + de - gas.get(a, 0), tok0 + dt)
            assert after[a] == expected, f"{a}: {after[a]} != expected {expected}"
        expected_reserve = Assets(self.reserve.eth + reserve[0], self.reserve.token + reserve[1])
        assert self.d.reserve() == expected_reserve


# --- events -------------------------------------------------------------------------------


def assert_record_event(
    d: Deployment, receipt: Any, user: Party, action: int, caller: Party, record: ChannelRecord
) -> None:
    """The call logged exactly one ChannelRecordChanged, with these fields."""
    events = d.logs("ChannelRecordChanged", receipt)
    assert len(events) == 1
    args = events[0]["args"]
    assert args["user"] == user.hex
    assert args["action"] == action
    assert args["caller"] == caller.hex
    assert ChannelRecord.from_abi(tuple(args["record"].values())) == record


# --- channels and threads -------------------------------------------------------------------


def fund(
    d: Deployment,
    user: Party,
    user_deposit: Assets,
    hub_deposit: Assets = NO_ASSETS,
    *,
    tx_count_global: int = 1,
) -> ChannelState:
    """Deposit into `user`'s genesis channel with one userAuthorizedUpdate (the hub's share
    from the reserve, topped up first). Return the confirmed state both parties then hold
    (txCountGlobal + 1, deposits credited, nothing pending); it is not submitted."""
    if not hub_deposit.is_zero():
        d.hub_deposit(hub_deposit.eth, hub_deposit.token)
    pending = d.state(
        user,
        pending_deposit_user=user_deposit,
        pending_deposit_hub=hub_deposit,
        tx_count_global=tx_count_global,
        tx_count_onchain=1,
        timeout=d.now + 100,
    )
    d.user_update(pending)
    return d.state(
        user,
        balance_user=user_deposit,
        balance_hub=hub_deposit,
        tx_count_global=tx_count_global + 1,
        tx_count_onchain=1,
    )


def thread(
    sender: Party,
    receiver: Party,
    lock_sender: Assets,
    lock_receiver: Assets = NO_ASSETS,
    thread_id: int = 1,
) -> ThreadState:
    """An initial thread state (txCount 0)."""
    return ThreadState(
        thread_id=thread_id,
        sender=sender.address,
        receiver=receiver.address,
        balance_sender=lock_sender,
        balance_receiver=lock_receiver,
        tx_count=0,
    )


def pay_thread(state: ThreadState, amount: Assets, tx_count: int | None = None) -> ThreadState:
    """The thread state after the sender pays `amount` to the receiver."""
    return replace(
        state,
        balance_sender=state.balance_sender - amount,
        balance_receiver=state.balance_receiver + amount,
        tx_count=state.tx_count + 1 if tx_count is None else tx_count,
    )


def with_threads(base: ChannelState, threads: Sequence[ThreadState]) -> ChannelState:
    """`base` with `threads` open (DESIGN money flow): the user's balance drops by the user's
    side of each thread, the hub's by the other side; root and count set; txCountGlobal + 1."""
    user_lock = NO_ASSETS
    hub_lock = NO_ASSETS
    for t in threads:
        mine = t.balance_of(base.user)
        user_lock = user_lock + mine
        hub_lock = hub_lock + (t.total() - mine)
    return replace(
        base,
        balance_user=base.balance_user - user_lock,
        balance_hub=base.balance_hub - hub_lock,
        thread_root=thread_root(threads) if threads else EMPTY_THREAD_ROOT,
        thread_count=len(threads),
        tx_count_global=base.tx_count_global + 1,
    )


def exit_and_empty(d: Deployment, *states: ChannelState) -> None:
    """Start each channel's exit with its state, wait out the challenge period, empty each."""
    for s in states:
        d.start_exit_with(s)
    d.travel(CP)
    for s in states:
        d.empty_channel(d.party(s.user))


# --- a thread between two settling channels -------------------------------------------------

LOCK_A = Assets(ETHER, 100)
LOCK_B = Assets(ETHER // 2, 40)


@dataclass
class Pair:
    """A thread A -> B (A = users[0] locks LOCK_A, B = users[1] locks LOCK_B) open in both
    channels, and both channels exited at the states that lock it: both settle threads."""

    a: Party
    b: Party
    t: ThreadState
    state_a: ChannelState
    state_b: ChannelState

    def channel_of(self, who: str) -> Party:
        return self.a if who == "sender" else self.b


def build_pair(d: Deployment) -> Pair:
    a, b = d.users[0], d.users[1]
    conf_a = fund(d, a, Assets(5 * ETHER, 500), Assets(3 * ETHER, 300))
    conf_b = fund(d, b, Assets(4 * ETHER, 400), Assets(2 * ETHER, 200))
    t = thread(a, b, LOCK_A, LOCK_B)
    state_a, state_b = with_threads(conf_a, [t]), with_threads(conf_b, [t])
    exit_and_empty(d, state_a, state_b)
    return Pair(a, b, t, state_a, state_b)
