"""The chain worker (node.chain_worker): the watcher and the submitter on a real chain.

Each test runs on a fresh embedded py-evm chain and on an anvil process shared by this
module's tests (fresh keys and contracts per test), as in tests/node/test_chain.py, whose
`World` and `Key` helpers it reuses. Unlike there, nobody has approved the manager for
tokens: the submitter must do it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import trio

from node.chain import (
    Action,
    ChainService,
    ChannelRecordChangedLog,
    ManagerClient,
    ManagerLog,
    ReserveDepositedLog,
)
from node.chain_errors import ChainUnavailable
from node.chain_worker import (
    ChainStatus,
    ChainSubmitter,
    ChainUpdate,
    ChainWatcher,
    NotSubmittable,
    SubmitAlreadyExecuted,
    SubmitFailed,
    SubmitMined,
    WrongSubmitter,
)
from protocols.channel import SignedChannelState, genesis_state
from protocols.eip712 import Domain
from protocols.onchain import GENESIS_RECORD, ChannelRecord, executed_record, record_hash
from protocols.signing import Signer
from protocols.types import Address, Assets, ChannelState
from tests.node.test_chain import (  # with its fixtures: one anvil per session
    CHALLENGE_PERIOD,
    ETHER,
    TOKENS,
    Key,
    World,
)

HANG_GUARD = 60  # seconds; only against a hang, never a timing assertion


@pytest.fixture
async def world(chain: ChainService) -> AsyncIterator[World]:
    """Hub, user and another party funded with ETH; hub and user hold tokens (no
    allowances)."""
    hub, user, other = Key.new(), Key.new(), Key.new()
    for key in (hub, user, other):
        await chain.fund(key.address, 100 * ETHER)
    token = await chain.deploy_token("Weft Test Token", "WTT", sender_key=hub.key)
    manager = await chain.deploy_channel_manager(
        hub.address, token.address, CHALLENGE_PERIOD, sender_key=hub.key
    )
    for key in (hub, user):
        await token.mint(key.address, TOKENS, sender_key=hub.key)
    with trio.fail_after(HANG_GUARD):
        yield World(chain, hub, user, other, token, manager, await manager.domain())


def start_block(world: World) -> int:
    assert world.manager.deployed_block is not None
    return world.manager.deployed_block


class Node:
    """What a node holds of the chain: a watcher from deployment and a submitter."""

    def __init__(self, world: World, key: Key) -> None:
        self.watcher = ChainWatcher(world.manager, start_block(world))
        self.submitter = ChainSubmitter(world.manager, self.watcher, key.key)

    async def catch_up(self) -> ChainUpdate | None:
        """Poll and advance (as the engine does after persisting); the update, if any."""
        update = await self.watcher.poll()
        if update is not None:
            self.watcher.advance(update)
        return update


def signed(world: World, state: ChannelState, user: Key | None = None) -> SignedChannelState:
    """`state` signed by the hub and by `user` (default: the channel's user)."""
    signer = (user or world.user).signer
    return SignedChannelState(
        state,
        world.hub.signer.sign_channel_state(world.domain, state),
        signer.sign_channel_state(world.domain, state),
    )


async def pending(world: World, **fields: object) -> ChannelState:
    """A state of the user's channel with these fields and a timeout an hour ahead."""
    return world.state(timeout=await world.chain.timestamp() + 3600, **fields)


def record_logs(update: ChainUpdate) -> list[ChannelRecordChangedLog]:
    return [log for log in update.logs if isinstance(log, ChannelRecordChangedLog)]


async def deposit_by_user(world: World, user: Node, amount: Assets) -> ChannelState:
    """The user deposits `amount` into its genesis channel; the state it executed."""
    state = await pending(world, pending_deposit_user=amount, tx_count_global=1, tx_count_onchain=1)
    result = await user.submitter.submit_authorized_update(signed(world, state))
    assert isinstance(result, SubmitMined), result
    return state


# --- authorized updates, seen by the watcher -------------------------------------------------


async def test_user_deposit_is_sent_by_the_user_and_reported_executed(world: World) -> None:
    chain, u = world.chain, world.user.address
    user = Node(world, world.user)
    deposit = Assets(2 * ETHER, 700)
    nonce = await chain.pending_nonce(u)
    state = await pending(
        world, pending_deposit_user=deposit, tx_count_global=1, tx_count_onchain=1
    )
    result = await user.submitter.submit_authorized_update(signed(world, state))

    assert isinstance(result, SubmitMined)
    assert (result.user, result.tx_count_onchain) == (u, 1)
    assert result.gas_used > 0 and len(result.tx_hash) == 32
    # The token deposit needed an approval first, of exactly the amount, which it used up.
    assert await chain.pending_nonce(u) == nonce + 2
    assert await world.token.allowance(u, world.manager.address) == 0
    assert await chain.eth_balance(world.manager.address) == 2 * ETHER
    assert await world.token.balance_of(world.manager.address) == 700

    update = await user.watcher.poll()
    assert update is not None
    expected = executed_record(GENESIS_RECORD, state, update.timestamp)
    assert update.executed == ((u, 1),)
    assert update.records == {u: expected}
    (log,) = record_logs(update)
    assert (log.action, log.caller, log.block_number) == (
        Action.USER_UPDATE,
        u,
        result.block_number,
    )
    assert (update.from_cursor, update.cursor) == (
        start_block(world),
        await chain.block_number() + 1,
    )
    assert update.timestamp == await chain.timestamp()
    user.watcher.advance(update)
    assert user.watcher.record_of(u) == expected == user.watcher.records[u]
    assert await world.manager.channel_record_hash(u) == record_hash(expected)

    # A second deposit with an allowance that already covers it: no approval is sent.
    await world.token.approve(world.manager.address, 10**6, sender_key=world.user.key)
    nonce = await chain.pending_nonce(u)
    state2 = await pending(
        world,
        balance_user=deposit,
        pending_deposit_user=Assets(ETHER, 300),
        tx_count_global=2,
        tx_count_onchain=2,
    )
    result2 = await user.submitter.submit_authorized_update(signed(world, state2))
    assert isinstance(result2, SubmitMined) and result2.tx_count_onchain == 2
    assert await chain.pending_nonce(u) == nonce + 1
    update2 = await user.watcher.poll()
    assert update2 is not None and update2.executed == ((u, 2),)
    assert update2.records == {u: executed_record(expected, state2, update2.timestamp)}
    assert update2.records[u].held == Assets(3 * ETHER, 1_000)


async def test_hub_collateral_from_the_reserve(world: World) -> None:
    u = world.user.address
    hub = Node(world, world.hub)
    receipt = await hub.submitter.hub_deposit(Assets(3 * ETHER, 500))  # approves the token
    assert [type(log) for log in receipt.logs] == [ReserveDepositedLog]
    assert await hub.submitter.reserve() == Assets(3 * ETHER, 500)

    state = await pending(
        world, pending_deposit_hub=Assets(ETHER, 200), tx_count_global=1, tx_count_onchain=1
    )
    result = await hub.submitter.submit_authorized_update(signed(world, state))
    assert isinstance(result, SubmitMined) and (result.user, result.tx_count_onchain) == (u, 1)
    assert await hub.submitter.reserve() == Assets(2 * ETHER, 300)

    update = await hub.catch_up()
    assert update is not None
    assert update.executed == ((u, 1),)
    assert [type(log) for log in update.logs] == [ReserveDepositedLog, ChannelRecordChangedLog]
    (log,) = record_logs(update)
    assert (log.action, log.caller) == (Action.HUB_UPDATE, world.hub.address)
    expected = executed_record(GENESIS_RECORD, state, update.timestamp)
    assert hub.watcher.record_of(u) == expected
    assert expected.balance_hub == expected.held == Assets(ETHER, 200)


async def test_user_withdrawal_to_a_recipient(world: World) -> None:
    chain, recipient = world.chain, world.other.address
    user, hub = Node(world, world.user), Node(world, world.hub)
    await deposit_by_user(world, user, Assets(5 * ETHER, 7_000))
    await hub.catch_up()
    record1 = hub.watcher.record_of(world.user.address)

    eth_before = await chain.eth_balance(recipient)
    state2 = await pending(
        world,
        recipient=recipient,
        balance_user=Assets(3 * ETHER, 4_000),
        pending_withdrawal_user=Assets(2 * ETHER, 3_000),
        tx_count_global=2,
        tx_count_onchain=2,
    )
    result = await hub.submitter.submit_authorized_update(signed(world, state2))
    assert isinstance(result, SubmitMined) and result.tx_count_onchain == 2
    assert await chain.eth_balance(recipient) == eth_before + 2 * ETHER
    assert await world.token.balance_of(recipient) == 3_000

    update = await hub.catch_up()
    assert update is not None and update.executed == ((world.user.address, 2),)
    assert hub.watcher.record_of(world.user.address) == executed_record(
        record1, state2, update.timestamp
    )
    assert hub.watcher.record_of(world.user.address).held == Assets(3 * ETHER, 4_000)


# --- the watcher's cursor ----------------------------------------------------------------------


async def test_poll_is_idempotent_until_advance(world: World) -> None:
    u = world.user.address
    user, hub = Node(world, world.user), Node(world, world.hub)
    await hub.submitter.hub_deposit(Assets(ETHER, 0))
    state = await deposit_by_user(world, user, Assets(ETHER, 10))

    watcher = ChainWatcher(world.manager, start_block(world))
    first = await watcher.poll()
    again = await watcher.poll()
    assert first is not None and again == first
    assert watcher.cursor == start_block(world) and dict(watcher.records) == {}
    assert watcher.record_of(u) == GENESIS_RECORD
    assert first.executed == ((u, 1),)
    assert [type(log) for log in first.logs] == [ReserveDepositedLog, ChannelRecordChangedLog]

    watcher.advance(first)
    assert watcher.cursor == first.cursor
    assert watcher.record_of(u) == executed_record(GENESIS_RECORD, state, first.timestamp)
    assert await watcher.poll() is None  # no new block
    with pytest.raises(ValueError, match="cursor"):
        watcher.advance(first)  # read from a cursor it has left
    with pytest.raises(TypeError):
        watcher.records[u] = GENESIS_RECORD  # type: ignore[index]

    # A block without logs still moves the cursor and the time.
    await world.chain.mine()
    empty = await watcher.poll()
    assert empty is not None
    assert (empty.from_cursor, empty.cursor) == (first.cursor, first.cursor + 1)
    assert (empty.logs, empty.executed, dict(empty.records)) == ((), (), {})
    assert empty.timestamp == await world.chain.timestamp() >= first.timestamp


async def test_restart_from_a_persisted_cursor_and_records(world: World) -> None:
    u = world.user.address
    user, hub = Node(world, world.user), Node(world, world.hub)
    await deposit_by_user(world, user, Assets(4 * ETHER, 400))
    first = await hub.catch_up()
    assert first is not None and first.executed == ((u, 1),)
    persisted = (hub.watcher.cursor, dict(hub.watcher.records))

    state2 = await pending(
        world,
        balance_user=Assets(3 * ETHER, 400),
        pending_withdrawal_user=Assets(ETHER, 0),
        tx_count_global=2,
        tx_count_onchain=2,
    )
    assert isinstance(
        await hub.submitter.submit_authorized_update(signed(world, state2)), SubmitMined
    )

    continued = await hub.watcher.poll()
    restarted = ChainWatcher(world.manager, *persisted)
    assert restarted.record_of(u) == hub.watcher.record_of(u)
    after_restart = await restarted.poll()
    assert continued is not None and after_restart == continued
    assert after_restart.executed == ((u, 2),)  # the deposit is not reported again
    restarted.advance(after_restart)
    hub.watcher.advance(continued)
    assert restarted.records == hub.watcher.records
    assert restarted.cursor == hub.watcher.cursor
    assert await restarted.poll() is None

    # From scratch, one block per poll: the same logs, each batch timed by its last block.
    world.chain.log_batch_blocks = 1
    scratch = ChainWatcher(world.manager, start_block(world))
    logs: list[ManagerLog] = []
    executed: list[tuple[Address, int]] = []
    times: list[int] = []
    while (update := await scratch.poll()) is not None:
        assert update.cursor == update.from_cursor + 1
        logs.extend(update.logs)
        executed.extend(update.executed)
        times.append(update.timestamp)
        scratch.advance(update)
    assert logs == [*first.logs, *continued.logs]
    assert executed == [(u, 1), (u, 2)]
    assert times == sorted(times) and times[-1] == await world.chain.timestamp()
    assert scratch.records == hub.watcher.records


# --- submissions that do not execute ---------------------------------------------------------


async def test_resubmitting_an_executed_state_is_already_executed(world: World) -> None:
    chain, u = world.chain, world.user.address
    user, hub = Node(world, world.user), Node(world, world.hub)
    state = await deposit_by_user(world, user, Assets(ETHER, 50))
    latest = signed(world, state)

    # After a restart whose watcher had not seen the execution: its record is stale, so
    # the submitter reads the chain before approving and sends nothing.
    nonce = await chain.pending_nonce(u)
    assert user.watcher.record_of(u) == GENESIS_RECORD
    again = await user.submitter.submit_authorized_update(latest)
    assert again == SubmitAlreadyExecuted(u, 1, 1)
    assert await chain.pending_nonce(u) == nonce
    assert user.watcher.cursor == start_block(world)  # the submitter never advances it

    # With the watcher caught up it is known at once.
    await user.catch_up()
    assert await user.submitter.submit_authorized_update(latest) == SubmitAlreadyExecuted(u, 1, 1)

    # The hub's path: a withdrawal executed, then sent again by a hub whose watcher lags
    # (the contract refuses the stale record; the fresh one shows it executed).
    await hub.catch_up()
    state2 = await pending(
        world,
        balance_user=Assets(ETHER // 2, 50),
        pending_withdrawal_user=Assets(ETHER // 2, 0),
        tx_count_global=2,
        tx_count_onchain=2,
    )
    lagging = Node(world, world.hub)
    assert isinstance(
        await hub.submitter.submit_authorized_update(signed(world, state2)), SubmitMined
    )
    nonce = await chain.pending_nonce(world.hub.address)
    result = await lagging.submitter.submit_authorized_update(signed(world, state2))
    assert result == SubmitAlreadyExecuted(u, 2, 2)
    assert await chain.pending_nonce(world.hub.address) == nonce


async def test_a_stale_record_is_refreshed_and_the_update_sent_again(world: World) -> None:
    u = world.user.address
    user, hub = Node(world, world.user), Node(world, world.hub)
    await deposit_by_user(world, user, Assets(2 * ETHER, 0))
    assert hub.watcher.record_of(u) == GENESIS_RECORD  # the hub has not polled
    state2 = await pending(
        world,
        balance_user=Assets(ETHER, 0),
        pending_withdrawal_user=Assets(ETHER, 0),
        tx_count_global=2,
        tx_count_onchain=2,
    )
    result = await hub.submitter.submit_authorized_update(signed(world, state2))
    assert isinstance(result, SubmitMined) and result.tx_count_onchain == 2
    assert hub.watcher.cursor == start_block(world)
    update = await hub.catch_up()
    assert update is not None and update.executed == ((u, 1), (u, 2))
    assert hub.watcher.record_of(u).held == Assets(ETHER, 0)


async def test_a_bad_signature_fails_with_the_contract_reason_and_moves_nothing(
    world: World,
) -> None:
    chain, m, u = world.chain, world.manager, world.user.address
    user, hub = Node(world, world.user), Node(world, world.hub)
    await hub.submitter.hub_deposit(Assets(2 * ETHER, 0))
    await hub.catch_up()

    async def snapshot() -> tuple[object, ...]:
        return (
            await chain.eth_balance(world.hub.address),
            await chain.eth_balance(u),
            await chain.eth_balance(m.address),
            await world.token.balance_of(u),
            await world.token.balance_of(m.address),
            await m.reserve(),
            await m.channel_record_hash(u),
            await chain.pending_nonce(world.hub.address),
        )

    # Hub collateral signed by someone else than the user.
    before = await snapshot()
    state = await pending(
        world, pending_deposit_hub=Assets(ETHER, 0), tx_count_global=1, tx_count_onchain=1
    )
    result = await hub.submitter.submit_authorized_update(signed(world, state, user=world.other))
    assert result == SubmitFailed(u, 1, "bad user signature", revert=True)
    assert await snapshot() == before
    assert await hub.watcher.poll() is None

    # A user deposit whose hub signature is not the hub's: the approval is sent, no funds.
    deposit = await pending(
        world, pending_deposit_user=Assets(ETHER, 90), tx_count_global=1, tx_count_onchain=1
    )
    bad = replace(
        signed(world, deposit), sig_hub=world.other.signer.sign_channel_state(world.domain, deposit)
    )
    result = await user.submitter.submit_authorized_update(bad)
    assert result == SubmitFailed(u, 1, "bad hub signature", revert=True)
    after = await snapshot()
    assert after[2:7] == before[2:7]  # the contract, its reserve, the user's tokens, the record
    update = await hub.watcher.poll()
    assert update is None or record_logs(update) == []


async def test_the_wrong_party_is_a_typed_error_and_sends_nothing(world: World) -> None:
    chain, u = world.chain, world.user.address
    user, hub = Node(world, world.user), Node(world, world.hub)
    nonces = (await chain.pending_nonce(u), await chain.pending_nonce(world.hub.address))

    deposit = await pending(
        world, pending_deposit_user=Assets(ETHER, 1), tx_count_global=1, tx_count_onchain=1
    )
    with pytest.raises(WrongSubmitter) as caught:
        await hub.submitter.submit_authorized_update(signed(world, deposit))
    assert (caught.value.expected, caught.value.actual) == (u, world.hub.address)

    collateral = await pending(
        world, pending_deposit_hub=Assets(ETHER, 0), tx_count_global=1, tx_count_onchain=1
    )
    with pytest.raises(WrongSubmitter) as caught:
        await user.submitter.submit_authorized_update(signed(world, collateral))
    assert (caught.value.expected, caught.value.actual) == (world.hub.address, u)
    with pytest.raises(WrongSubmitter):
        await user.submitter.hub_deposit(Assets(ETHER, 0))

    with pytest.raises(NotSubmittable, match="double-signed"):
        await user.submitter.submit_authorized_update(replace(signed(world, deposit), sig_hub=None))
    settled = world.state(balance_user=Assets(ETHER, 0), tx_count_global=3, tx_count_onchain=1)
    with pytest.raises(NotSubmittable, match="pending"):
        await hub.submitter.submit_authorized_update(signed(world, settled))
    assert (await chain.pending_nonce(u), await chain.pending_nonce(world.hub.address)) == nonces


# --- the watcher's loop ----------------------------------------------------------------------


class FlakyManager(ManagerClient):
    """The real manager, whose log reads fail with ChainUnavailable while `down` is set
    (the watcher reads logs only once a new block is there)."""

    def __init__(self, manager: ManagerClient) -> None:
        super().__init__(manager.service, manager.address, deployed_block=manager.deployed_block)
        self.down = False
        self.failures = 0
        self.failed_often = trio.Event()

    async def events_since(
        self, cursor: int, *, max_blocks: int | None = None
    ) -> tuple[list[ManagerLog], int]:
        if self.down:
            self.failures += 1
            if self.failures >= 3:
                self.failed_often.set()
            raise ChainUnavailable("ConnectionRefusedError: the test took the chain away")
        return await super().events_since(cursor, max_blocks=max_blocks)


async def test_run_delivers_updates_and_reports_an_outage_once(world: World) -> None:
    u = world.user.address
    user, hub = Node(world, world.user), Node(world, world.hub)
    await deposit_by_user(world, user, Assets(ETHER, 0))
    flaky = FlakyManager(world.manager)
    watcher = ChainWatcher(flaky, start_block(world))
    delivered: list[ChainUpdate | ChainStatus] = []
    went_down, reserve_seen = trio.Event(), trio.Event()

    async def deliver(item: ChainUpdate | ChainStatus) -> None:
        delivered.append(item)  # "persisted"
        if isinstance(item, ChainUpdate):
            watcher.advance(item)
            if any(isinstance(log, ReserveDepositedLog) for log in item.logs):
                reserve_seen.set()
        elif not item.available:
            went_down.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: watcher.run(
                deliver, 0.01, max_backoff=0.05, task_status=task_status
            )
        )
        # Started once the first poll was delivered: the deposit is known.
        (first,) = delivered
        assert isinstance(first, ChainUpdate) and first.executed == ((u, 1),)

        flaky.down = True
        await hub.submitter.hub_deposit(Assets(ETHER, 0))  # mined during the outage
        await went_down.wait()  # a new block: the watcher reads logs, and fails
        await flaky.failed_often.wait()
        flaky.down = False
        await reserve_seen.wait()
        nursery.cancel_scope.cancel()

    statuses = [item for item in delivered if isinstance(item, ChainStatus)]
    assert [s.available for s in statuses] == [False, True]  # once each, for many failures
    assert flaky.failures >= 3
    assert "the test took the chain away" in statuses[0].detail
    down_at, up_at = delivered.index(statuses[0]), delivered.index(statuses[1])
    assert 0 < down_at < up_at < len(delivered) - 1  # the outage came and went between updates
    updates = [item for item in delivered if isinstance(item, ChainUpdate)]
    reserve_logs = [log for x in updates for log in x.logs if isinstance(log, ReserveDepositedLog)]
    assert len(reserve_logs) == 1  # every block delivered once: each was advanced
    assert [x.from_cursor for x in updates[1:]] == [x.cursor for x in updates[:-1]]


async def test_run_delivers_the_same_blocks_again_until_advanced(world: World) -> None:
    user = Node(world, world.user)
    await deposit_by_user(world, user, Assets(ETHER, 0))
    watcher = ChainWatcher(world.manager, start_block(world))
    delivered: list[ChainUpdate] = []
    twice = trio.Event()

    async def deliver(item: ChainUpdate | ChainStatus) -> None:
        assert isinstance(item, ChainUpdate)
        delivered.append(item)
        if len(delivered) == 2:  # persisting failed once; this time it succeeds
            watcher.advance(item)
            twice.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher.run, deliver, 0.01)
        await twice.wait()
        nursery.cancel_scope.cancel()
    assert delivered[0] == delivered[1]
    assert delivered[0].executed == ((world.user.address, 1),)
    assert watcher.cursor == delivered[1].cursor


# --- an unreachable chain ----------------------------------------------------------------------


async def test_an_unreachable_chain_is_a_failure_not_an_exception() -> None:
    service = ChainService.from_url("http://127.0.0.1:1", request_timeout=2.0)
    user, other = Key.new(), Key.new()
    manager = service.manager(Address(b"\x11" * 20))
    domain = Domain(1, manager.address)
    watcher = ChainWatcher(manager, 0)
    submitter = ChainSubmitter(manager, watcher, user.key)

    def sign(state: ChannelState) -> SignedChannelState:
        return SignedChannelState(
            state,
            other.signer.sign_channel_state(domain, state),
            user.signer.sign_channel_state(domain, state),
        )

    base = genesis_state(user.address)
    with trio.fail_after(HANG_GUARD):
        with pytest.raises(ChainUnavailable):
            await watcher.poll()
        for deposit in (Assets(ETHER, 0), Assets(ETHER, 5)):  # with and without approval
            state = replace(
                base, pending_deposit_user=deposit, tx_count_global=1, tx_count_onchain=1, timeout=9
            )
            result = await submitter.submit_authorized_update(sign(state))
            assert isinstance(result, SubmitFailed) and not result.revert
            assert "ConnectionError" in result.reason or "Unavailable" in result.reason, result
        # The hub's path cannot even learn who the hub is.
        state = replace(
            base,
            pending_withdrawal_user=Assets(1, 0),
            tx_count_global=2,
            tx_count_onchain=1,
            timeout=9,
        )
        result = await submitter.submit_authorized_update(sign(state))
        assert isinstance(result, SubmitFailed) and not result.revert
        with pytest.raises(ChainUnavailable):
            await submitter.reserve()
    service.close()


def test_records_of_a_fresh_watcher_are_at_genesis() -> None:
    service = ChainService.from_url("http://127.0.0.1:1")
    user = Signer(b"\x01" * 32).address
    known = ChannelRecord(held=Assets(1, 0), balance_user=Assets(1, 0), tx_count_global=1)
    watcher = ChainWatcher(service.manager(Address(b"\x11" * 20)), 7, {user: known})
    assert watcher.cursor == 7
    assert watcher.record_of(user) == known
    assert watcher.record_of(Address(b"\x22" * 20)) == GENESIS_RECORD
    assert dict(watcher.records) == {user: known}
    with pytest.raises(ValueError):
        ChainWatcher(service.manager(Address(b"\x11" * 20)), -1)
    service.close()
